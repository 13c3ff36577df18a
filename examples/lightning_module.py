"""PyTorch Lightning with klj-reg: the penalty in ``training_step``, the monitor's per-layer
values logged through Lightning's logger.

The ``LightningModule`` holds a zuko flow, attached in ``__init__`` (before the Trainer
wraps or moves anything); ``training_step`` adds the penalty after the NLL on the same
batch, and a ``klj_reg.Monitor`` whose ``log=`` callable is ``self.log_dict`` sends each
layer's KLJ to whichever logger the Trainer has (TensorBoard, CSV, W&B, ...). Run:
``python examples/lightning_module.py``.
"""

from __future__ import annotations

import tempfile

import lightning as L
import torch
import zuko
from lightning.pytorch.loggers import CSVLogger

import klj_reg


class FlowModule(L.LightningModule):
    def __init__(self, features: int = 4, alpha: float = 0.1, every: int = 10) -> None:
        super().__init__()
        self.flow = zuko.flows.NSF(features=features, transforms=3, hidden_features=(32, 32))
        self.alpha = alpha
        klj_reg.attach(self.flow)
        # the monitor is fed by each penalty (inside training_step), so self.log works there
        self.monitor = klj_reg.Monitor(self.flow, log=self.log_layers, every=every)
        self.penalties: list[torch.Tensor] = []  # kept for the tests: one per step

    def log_layers(self, values: dict[str, torch.Tensor], step: int) -> None:
        self.log_dict({f"klj/{layer}": value for layer, value in values.items()})

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (x,) = batch
        nll = -self.flow().log_prob(x).mean()
        klj = klj_reg.penalty(self.flow, x, alpha=self.alpha)
        self.penalties.append(klj.detach())
        self.log_dict({"nll": nll, "klj": klj})
        return nll + klj

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def data(n: int = 1024, features: int = 4) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(n, features) @ torch.randn(features, features) * 0.5


def main(
    steps: int = 300,
    alpha: float = 0.1,
    root: str | None = None,
    shuffle: bool = True,
    log_every: int = 10,
) -> FlowModule:
    torch.manual_seed(0)
    module = FlowModule(alpha=alpha, every=log_every)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data()), batch_size=64, shuffle=shuffle
    )
    root = root or tempfile.mkdtemp()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(root),
        log_every_n_steps=log_every,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(module, loader)
    module.monitor.close()
    print(f"logged to {trainer.logger.log_dir}: {sorted(trainer.logged_metrics)}")
    return module


if __name__ == "__main__":
    main()
