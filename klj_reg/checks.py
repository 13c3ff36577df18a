"""Self-checks of captured records: against the layer's own log-det, and for finiteness.

Both need the values on the host, so both share one synchronisation, made only while some
layer is still being checked (its first batches) or when finiteness checking is on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .capture import Capture
from .divergence import _float32, _per_sample_sum
from .errors import AdapterMismatchError, NonFiniteScaleError
from .records import LayerRecord
from .registry import framework_version

NONTRIVIAL = 1e-2
"""A check only counts once some |log d| exceeds this: at identity any formula agrees."""


def _offenders(records: Sequence[LayerRecord]) -> list[str]:
    bad = []
    for r in records:
        for i, f in enumerate(r.factors):
            if not bool(torch.isfinite(f.log_abs_d()).all()):
                bad.append(f"{r.name or '<model>'} ({r.kind}, factor {i})")
    return bad


def _raise_non_finite(records: Sequence[LayerRecord]) -> None:
    bad = _offenders(records)
    raise NonFiniteScaleError(
        "KLJ penalty is not finite; non-finite Jacobian diagonal in "
        + (", ".join(bad) if bad else "no single layer (overflow in the sum)")
        + ". Lower the learning rate, clamp the scales, or check the input for NaN."
    )


def check(records: Sequence[LayerRecord], capture: Capture, value: Tensor, finite: bool) -> None:
    """Check unverified layers' records against their log-det, and ``value`` for finiteness."""
    pending = [
        r for r in records if r.log_det is not None and capture.sites[r.name].checks_left > 0
    ]
    total = value.detach() if value.dim() == 0 else value.detach().sum()
    if not pending:
        if finite and not math.isfinite(total.item()):  # one sync
            _raise_non_finite(records)
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
    if not host[-1]:
        _raise_non_finite(records)
    for i, r in enumerate(pending):
        error, excess, size = host[3 * i : 3 * i + 3]
        site = capture.sites[r.name]
        if excess > 0:
            raise AdapterMismatchError(
                f"captured scales of {r.name or '<model>'} ({r.kind}, "
                f"{framework_version(site.framework)}) do not match the layer's own "
                f"log-determinant (max error {error:.3g}): this version of the framework "
                "computes the layer differently from what its klj-reg adapter expects. "
                "Please report it with the version above; meanwhile use "
                "estimator='hutchinson'."
            )
        site.checks_left = 0 if size > NONTRIVIAL else site.checks_left - 1
