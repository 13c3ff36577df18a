"""The phase clock: marks at the boundaries of a step's phases."""

from __future__ import annotations

import itertools
import time

import torch


def no_mark() -> None:
    """The mark of a step timed without a clock."""


PHASES = ("forward", "penalty", "backward", "optimiser")
"""The parts of a step a :class:`PhaseClock` times: ``zero_grad`` and the NLL forward pass,
the penalty (and the loss's sum), ``loss.backward()``, ``optimiser.step()``."""


class PhaseClock:
    """The durations of a step's :data:`PHASES`, from marks at their boundaries: host time
    on CPU; on CUDA, events recorded in the stream (no synchronisation inside the step; read
    after the step's own synchronisation), so the phases are the device's time. With
    ``clock="cpu"``, the thread's CPU time (``time.thread_time``) instead."""

    def __init__(self, device: torch.device, clock: str = "wall") -> None:
        self.cuda = device.type == "cuda" and clock == "wall"
        self.cpu = clock == "cpu"
        self.events = (
            [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
            if self.cuda
            else []
        )
        self.marks: list[float] = []
        self.count = 0

    def mark(self) -> None:
        if self.cuda:
            self.events[self.count].record()
        else:
            self.marks.append(time.thread_time() if self.cpu else time.perf_counter())
        self.count += 1

    def durations(self) -> list[float]:
        """Seconds per phase of the step just marked (after the device is synchronised);
        resets the clock."""
        if self.count != len(PHASES) + 1:
            raise RuntimeError(f"a step made {self.count} marks, not {len(PHASES) + 1}")
        if self.cuda:
            spans = [1e-3 * a.elapsed_time(b) for a, b in itertools.pairwise(self.events)]
        else:
            spans = [b - a for a, b in itertools.pairwise(self.marks)]
        self.marks, self.count = [], 0
        return spans


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
