"""DistributedDataParallel with klj-reg: attach, then wrap; the penalty after the DDP forward.

A FrEIA flow trained on several processes (``gloo`` on CPU, ``nccl`` on GPUs). Attach
before wrapping in DDP (as before ``torch.compile``): the penalty then reads the pass the DDP
forward ran and never runs one of its own, which would desynchronise the gradient reduction
(without a captured pass it raises instead). Run:

    torchrun --nproc_per_node 2 examples/ddp.py

or ``python examples/ddp.py``, which starts 2 CPU processes itself.
"""

from __future__ import annotations

import math
import os
import socket

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import klj_reg


def subnet(c_in: int, c_out: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(c_in, 32), torch.nn.ReLU(), torch.nn.Linear(32, c_out)
    )


def make_flow(features: int = 4) -> Ff.SequenceINN:
    inn = Ff.SequenceINN(features)
    for _ in range(3):
        inn.append(Fm.AllInOneBlock, subnet_constructor=subnet)
    return inn


def train(steps: int, alpha: float, out: str | None = None) -> None:
    """One process's training loop (the process group is already up)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        f"cuda:{rank % torch.cuda.device_count()}" if dist.get_backend() == "nccl" else "cpu"
    )
    torch.manual_seed(0)  # the same initial parameters on every rank (DDP broadcasts them too)
    flow = make_flow().to(device)
    klj_reg.attach(flow)  # before DDP
    model = DistributedDataParallel(flow)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(1 + rank)  # each rank its own batches
    for step in range(steps):
        x = (torch.randn(64, 4, generator=generator) * torch.tensor([2.0, 1.0, 0.5, 0.1])).to(
            device
        )
        z, log_det = model(x)  # the DDP forward
        nll = (0.5 * z.square().sum(1) - log_det).mean() + 2 * math.log(2 * math.pi)
        loss = nll + klj_reg.penalty(model, x, alpha=alpha)  # reads that pass
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients of NLL and penalty alike
        optimizer.step()
        if rank == 0 and step % 100 == 0:
            print(f"step {step}: loss {loss.item():.3f} on rank 0 of {world}")
    if out is not None:  # for the tests: each rank's final parameters
        torch.save([p.detach().cpu() for p in flow.parameters()], f"{out}/rank{rank}.pt")


def _worker(rank: int, world: int, port: int, steps: int, alpha: float, out: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        train(steps, alpha, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(steps: int = 300, alpha: float = 0.1, world: int = 2, out: str | None = None) -> None:
    if "RANK" in os.environ:  # started by torchrun: one process of the group
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        try:
            train(steps, alpha, out)
        finally:
            dist.destroy_process_group()
    else:  # started by hand: spawn `world` CPU processes
        mp.spawn(_worker, args=(world, _free_port(), steps, alpha, out), nprocs=world)


if __name__ == "__main__":
    main()
