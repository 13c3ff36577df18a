"""Self-checks of captured records: against the layer's own log-det, and for finiteness.

The log-det check needs values on the host: it shares one synchronisation with the finiteness
check, made only while some layer is still being checked (its first batches). After that, a
penalty on the CPU is checked for finiteness at once (no synchronisation to pay); on CUDA the
flag is copied to pinned memory without blocking and read by a later penalty once it has
arrived, so no step waits for the device.

A non-finite penalty never stops a run by default: it is returned as it is (so that the
loop's own skip-the-batch logic and ``GradScaler`` see it, as they would see a non-finite
NLL) with a :class:`NonFiniteScaleWarning` naming the first layers whose Jacobian diagonal is
not finite. ``check_finite=True`` raises :class:`NonFiniteScaleError` instead.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Sequence
from operator import attrgetter
from typing import Any

import torch
from torch import Tensor

from .divergence import _float32, _per_sample_sum
from .errors import AdapterMismatchError, NonFiniteScaleError, NonFiniteScaleWarning
from .kit import Site
from .records import LayerRecord

_LEFT = {False: attrgetter("checks_left"), True: attrgetter("sample_checks_left")}
_NAME = attrgetter("name")

NONTRIVIAL = 1e-2
"""A check only counts once some |log d| exceeds this: at identity any formula agrees."""

NAMED = 3
"""Layers named in a non-finite message."""


def _describe(records: Sequence[LayerRecord]) -> str:
    """The first layers with a non-finite Jacobian diagonal, or, if every entry is finite
    (the sum overflowed), the layers with the largest scales."""
    bad, sizes = [], []
    for r in records:
        for i, f in enumerate(r.factors):
            s = f.log_abs_d().detach()
            if s.numel() == 0:
                continue
            if not bool(torch.isfinite(s).all()):
                bad.append(f"{r.name or '<model>'} ({r.kind}, factor {i})")
            else:
                sizes.append((float(s.abs().amax()), f"{r.name or '<model>'} ({r.kind})"))
    if bad:
        more = f" and {len(bad) - NAMED} more" if len(bad) > NAMED else ""
        return "non-finite Jacobian diagonal in " + ", ".join(bad[:NAMED]) + more
    sizes.sort(reverse=True)
    largest = ", ".join(f"{name} (max |log d| = {size:.3g})" for size, name in sizes[:NAMED])
    return "every Jacobian diagonal is finite but their sum overflowed; largest: " + largest


def report_non_finite(records: Sequence[LayerRecord], raise_error: bool) -> None:
    """Raise or warn that the penalty is not finite, naming the layers."""
    message = (
        f"KLJ penalty is not finite: {_describe(records)}. Lower the learning rate, clamp the "
        "scales, clip gradients, or check the input for NaN."
    )
    if raise_error:
        raise NonFiniteScaleError(message)
    message += " (Returned as it is; check_finite=True raises.)"
    warnings.warn(message, NonFiniteScaleWarning, stacklevel=4)


class FiniteWatch:
    """Non-blocking finiteness flags of earlier penalties on CUDA, read once they arrive."""

    def __init__(self) -> None:
        self.pending: deque[tuple[Tensor, Any, Sequence[LayerRecord]]] = deque(maxlen=8)

    def submit(self, total: Tensor, records: Sequence[LayerRecord]) -> None:
        flag = torch.isfinite(total.detach())
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((host, event, records))

    def poll(self, raise_error: bool) -> None:
        while self.pending and self.pending[0][1].query():
            host, _, records = self.pending.popleft()
            if not bool(host):
                report_non_finite(records, raise_error)


def _mismatch(r: LayerRecord, site: Site, error: float) -> AdapterMismatchError:
    return site.mismatch(
        f"captured scales of {r.name or '<model>'} ({r.kind}) do not match the layer's own "
        f"log-determinant (max error {error:.3g})",
    )


def check(
    records: Sequence[LayerRecord],
    sites: dict[str, Site],
    value: Tensor,
    finite: bool | None,
    watch: FiniteWatch | None,
    sampling: bool = False,
) -> None:
    """Check unverified layers' records against their log-det, and ``value`` for finiteness
    (``finite``: ``None`` warns, ``True`` raises, ``False`` skips). ``sampling``: the records
    of a sampling pass, checked on batches of their own (``Site.sample_checks_left``)."""
    raise_error = finite is True
    left = "sample_checks_left" if sampling else "checks_left"
    # Once every layer is verified (the steady state), one pass at C level finds it.
    lefts = map(_LEFT[sampling], map(sites.__getitem__, map(_NAME, records)))
    pending = (
        [r for r in records if r.log_det is not None and getattr(sites[r.name], left) > 0]
        if any(lefts)
        else []
    )
    total = value.detach() if value.dim() == 0 else value.detach().sum()
    if not pending:
        if finite is False:
            return
        if value.device.type == "cuda" and watch is not None:
            watch.poll(raise_error)
            watch.submit(total, records)
        elif not math.isfinite(total.item()):  # on the CPU: no synchronisation to pay
            report_non_finite(records, raise_error)
        return
    rows = []
    for r in pending:
        assert r.log_det is not None
        raw_logs = [f.log_abs_d().detach() for f in r.factors]
        raw_expected = torch.as_tensor(r.log_det).detach()
        eps = max(torch.finfo(t.dtype).eps for t in [*raw_logs, raw_expected])  # before upcast
        logs, expected = [_float32(t) for t in raw_logs], _float32(raw_expected)
        implied = sum(f.repeat * _per_sample_sum(s) for f, s in zip(r.factors, logs, strict=True))
        magnitude = sum(
            f.repeat * _per_sample_sum(s.abs()) for f, s in zip(r.factors, logs, strict=True)
        )
        error = (implied - expected).abs()
        excess = (error - 256 * eps * (magnitude + expected.abs() + 1.0)).amax()
        size = torch.stack([s.abs().amax() for s in logs]).amax()
        rows.append(torch.stack([error.amax(), excess, size]).to(value.device))
    flags = torch.cat([*rows, torch.isfinite(total).reshape(1).float()])
    host = flags.tolist()  # the one synchronisation
    for i, r in enumerate(pending):
        error, excess, size = host[3 * i : 3 * i + 3]
        site = sites[r.name]
        if excess > 0:
            raise _mismatch(r, site, error)
        if math.isfinite(size):
            setattr(site, left, 0 if size > NONTRIVIAL else getattr(site, left) - 1)
    if not host[-1] and finite is not False:
        report_non_finite(records, raise_error)
