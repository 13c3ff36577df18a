"""Presets: how big, how long, how much data, for the CIFAR-10 benchmarks.

- ``smoke``: seconds per backend (tiny flows, a few hundred images, one epoch, small OoD
  sets): the tests run it end to end for every installed backend.
- ``cpu``: the six rows of one backend in about 20 minutes on 2 CPU cores (small flows,
  a class-balanced training subset, Adam + cosine).
- ``converged``: the paper's regime shrunk, not its training: images box-downsampled to 16x16
  (ID and OoD alike) so a small flow trains to a plateau on 2 CPU cores, with the paper's
  optimiser and learning-rate drops scaled to the epoch count; learning curves recorded.
- ``overfit``: ``converged``'s flow, resolution and optimiser on a class-balanced 4,000
  images for 150 epochs: the same number of steps on a set small enough to overfit (the
  calibrated experiment's regime B); ``overfit2k``: 2,000 images for 300 epochs, without
  augmentation (its fallback, should 4,000 images not overfit).
- ``gpu``: the whole table, four backends, in about 8 minutes on one H200 with parallel runs.
- ``paper``: the authors' protocol: IB-INN architecture (FrEIA; the other backends at their
  largest size), SGD lr 0.07 momentum 0.9, batch 128, 450 epochs, lr x0.1 at 150/250/350.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .train import TrainConfig

PRESETS = ("smoke", "cpu", "converged", "overfit", "overfit2k", "gpu", "paper")


@dataclass(frozen=True)
class Preset:
    """Everything a benchmark run needs besides backend, row and seed."""

    name: str
    sizes: dict[str, str]  # backend -> image-flow size
    train: TrainConfig
    train_limit: int | None  # training images (class-balanced subset); None: all 50,000
    test_limit: int | None  # ID test images; None: all available (1,000 lossless)
    ood_limit: int | None  # images per OoD set; None: all
    seeds: tuple[int, ...] = (0,)
    parallel: int = 1
    eval_batch: int = 500
    notes: str = ""
    resolution: int = 32  # images (ID and OoD) box-downsampled to this side
    curves: bool = False  # test accuracy and L_x after every epoch (learning curves)
    select_epochs: int | None = None  # epochs of the alpha-selection runs (None: train.epochs)
    extra: dict[str, object] = field(default_factory=dict)

    def size_of(self, backend: str, arch: str | None = None) -> str:
        """Flow size of ``backend``; ``arch="paper"`` forces the IB-INN model for FrEIA."""
        if arch == "paper" and backend == "freia":
            return "paper"
        return self.sizes[backend]


def _all(size: str) -> dict[str, str]:
    return {b: size for b in ("freia", "nflows", "normflows", "zuko")}


ADAM = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=1e-4, clip=8.0)

_CONVERGED = Preset(
    name="converged",
    sizes=_all("small"),
    train=TrainConfig(epochs=30, batch_size=64, bn_refresh=5000),
    train_limit=20000,
    test_limit=None,
    ood_limit=1000,
    parallel=2,
    seeds=(0, 1),
    eval_batch=500,
    resolution=16,
    curves=True,
    select_epochs=15,
    notes="CIFAR-10 and every OoD set box-downsampled to 16x16; the paper's optimiser (SGD "
    "lr 0.07, momentum 0.9, weight decay 1e-4, lr x0.1 at 1/3, 5/9, 7/9 of the epochs) "
    "over 30 epochs of a class-balanced 20,000 images (alpha chosen on 15-epoch runs); "
    "~8 min per run on one free core",
)

_OVERFIT = replace(
    _CONVERGED,
    name="overfit",
    train=replace(_CONVERGED.train, epochs=150, bn_refresh=4000),
    train_limit=4000,
    seeds=(0, 1, 2),
    select_epochs=None,
    notes="converged's flow, 16x16 images and SGD schedule on a class-balanced 4,000 images "
    "for 150 epochs: the same ~9,300 steps as converged on a set small enough to overfit",
)

_PRESETS = {
    "smoke": Preset(
        name="smoke",
        sizes=_all("tiny"),
        train=replace(ADAM, epochs=1, batch_size=32, bn_refresh=64),
        train_limit=256,
        test_limit=128,
        ood_limit=64,
        eval_batch=128,
        notes="plumbing check: numbers are meaningless",
    ),
    "cpu": Preset(
        name="cpu",
        sizes=_all("small"),
        train=replace(ADAM, epochs=4, batch_size=64, bn_refresh=2000),
        train_limit=10000,
        test_limit=None,
        ood_limit=1000,
        parallel=2,
        eval_batch=250,
        notes="one backend, six rows as 2 single-thread processes, <= 20 min on 2 free cores; "
        "short training (4 epochs of 10,000 images): far from converged",
    ),
    "converged": _CONVERGED,
    "overfit": _OVERFIT,
    "overfit2k": replace(
        _OVERFIT,
        name="overfit2k",
        train=replace(_OVERFIT.train, epochs=300, bn_refresh=2000, augment=False),
        train_limit=2000,
        notes="the overfit preset's fallback: a class-balanced 2,000 images for 300 epochs "
        "without augmentation (the same ~9,300 steps)",
    ),
    "gpu": Preset(
        name="gpu",
        sizes=_all("medium"),
        train=replace(ADAM, epochs=8, batch_size=256, lr=2e-3, bn_refresh=10000),
        train_limit=None,
        test_limit=None,
        ood_limit=None,
        parallel=12,
        eval_batch=1000,
        notes="all four backends, 24 runs as 12 parallel processes on one H200; 8 epochs at "
        "batch 256 estimated at ~8 min (not yet measured on the device)",
    ),
    "paper": Preset(
        name="paper",
        sizes={"freia": "paper", "nflows": "medium", "normflows": "medium", "zuko": "medium"},
        train=TrainConfig(epochs=450, batch_size=128, bn_refresh=250000),
        train_limit=None,
        test_limit=None,
        ood_limit=None,
        parallel=4,
        eval_batch=1000,
        notes="the authors' protocol (IB-INN architecture for FrEIA, SGD schedule, 450 epochs)",
    ),
}


def get(name: str) -> Preset:
    """The preset called ``name``."""
    if name not in _PRESETS:
        raise SystemExit(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return _PRESETS[name]
