"""Hugging Face Accelerate with klj-reg: attach before ``accelerator.prepare``, the penalty
after the forward pass.

``accelerator.prepare`` may wrap the model (DDP on several processes, mixed precision): the
flow is attached first, as before ``torch.compile`` or DDP, and the penalty is given the
prepared model and the batch the forward ran on. A ``klj_reg.Monitor`` logs the per-layer
values through ``accelerator.log`` (recorded by the trackers of ``Accelerator(log_with=...)``
after ``accelerator.init_trackers``; none here). Run: ``python examples/accelerate_loop.py``
(or ``accelerate launch examples/accelerate_loop.py``).
"""

from __future__ import annotations

import torch
import zuko
from accelerate import Accelerator

import klj_reg


def data(n: int = 1024, features: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, features) @ torch.randn(features, features) * 0.5


def make_flow() -> zuko.flows.Flow:
    return zuko.flows.NSF(features=4, transforms=3, hidden_features=(32, 32))


def main(steps: int = 300, alpha: float = 0.1, every: int = 10, shuffle: bool = True) -> dict:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(0)
    flow = make_flow()
    klj_reg.attach(flow)  # before prepare
    monitor = klj_reg.Monitor(
        flow,
        log=lambda values, step: accelerator.log(
            {f"klj/{k}": float(v) for k, v in values.items()}, step=step
        ),
        every=every,
    )
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data()), batch_size=64, shuffle=shuffle
    )
    flow, optimizer, loader = accelerator.prepare(flow, optimizer, loader)
    penalties = []
    step = 0
    while step < steps:
        for (x,) in loader:
            nll = -flow().log_prob(x).mean()
            klj = klj_reg.penalty(flow, x, alpha=alpha)  # after the forward, same batch
            penalties.append(klj.detach())
            optimizer.zero_grad()
            accelerator.backward(nll + klj)
            optimizer.step()
            step += 1
            if step == steps:
                break
    monitor.close()
    accelerator.print(f"{steps} steps: last NLL {nll.item():.3f}, penalty {klj.item():.4f}")
    return {"flow": accelerator.unwrap_model(flow), "penalties": penalties, "monitor": monitor}


if __name__ == "__main__":
    main()
