"""Settings of a run and the names of its variants and models."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

VARIANTS = (
    "plain",
    "plain-again",
    "dispatch",
    "hooks",
    "floor",
    "capture",
    "capture+check",
    "fused",
    "second-pass",
    "hutchinson",
    "exact",
    "compiled",
    "compiled+capture",
)
MODELS = ("tabular", "image")
"""Model kinds run by default."""
ALL_MODELS = (*MODELS, "reverse-kl", "zoo")
ZOO_VARIANTS = ("plain", "plain-again", "dispatch", "hooks", "floor", "capture")
"""Variants of ``--models zoo``: the capture and the references beside it."""
COMPILED_VARIANTS = ("compiled", "compiled+capture")
"""``--variants`` may add these to a zoo run: the flow's forward through ``torch.compile``,
without klj-reg and attached before compiling (+ the penalty)."""
ZOO_TARGET = 0.02
"""The capture's excess over the floor, (capture - floor) / plain in the same rounds."""
CLOCKS = ("wall", "cpu")
"""``wall``: ``time.perf_counter`` (CUDA events for the phases on a GPU); ``cpu``: the timing
thread's CPU time, ``time.thread_time`` (with one torch thread), much less sensitive to other
processes on a loaded machine."""
REVERSE_VARIANTS = ("plain", "plain-again", "hooks", "capture", "second-pass")
"""Variants of the reverse-KL step (``--models reverse-kl``)."""
TARGET = 1.02
"""The capture path should cost at most this many plain steps."""
REFERENCE = (
    "first reference implementation (hooks recomputing the scales from each subnet's output), "
    "FrEIA Glow on an H200: 2000 -> 1720 images/s, i.e. 1.16x the step time"
)
DEFAULT_OUT = Path("benchmarks/results/overhead")
IMAGE_SHAPE = (3, 32, 32)


@dataclass
class Settings:
    """What a run measured, recorded with its results."""

    device: str
    reps: int = 20
    tabular_reps: int = 100
    warmup: int = 5
    batch: int = 256
    image_batch: int = 8
    dim: int = 64
    layers: int = 8
    hidden: int = 64
    lr: float = 1e-3
    alpha: float = 1e-2
    seed: int = 0
    quick: bool = False
    backends: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    clock: str = "wall"
    zoo: list[str] = field(default_factory=list)
    """Substrings of the zoo models to run (all where empty)."""
    zoo_reps: int = 40
    """Timed rounds of each zoo model, fewer where a round would exceed ``zoo_seconds``."""
    zoo_seconds: float = 20.0
    """Budget of timed seconds per zoo model (long steps: down to 8 rounds)."""
