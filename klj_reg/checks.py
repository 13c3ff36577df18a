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
from .divergence import _float32, _per_sample_sum, log_det_of
from .errors import AdapterMismatchError, NonFiniteScaleError
from .records import LayerRecord
from .registry import framework_version

NONTRIVIAL = 1e-2
"""A check only counts once some |log d| exceeds this: at identity any formula agrees."""


def _tolerance(record: LayerRecord, expected: Tensor) -> Tensor:
    dtypes = [f.source.dtype for f in record.factors] + [expected.dtype]
    eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
    magnitude = sum(
        f.repeat * _per_sample_sum(_float32(f.log_abs_d()).abs()) for f in record.factors
    )
    return 256 * eps * (magnitude + expected.abs() + 1.0)


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
    if not pending:
        if finite and not math.isfinite(float(value.detach().sum())):  # one sync
            _raise_non_finite(records)
        return
    rows = []
    for r in pending:
        assert r.log_det is not None
        expected = _float32(torch.as_tensor(r.log_det)).detach()
        implied = log_det_of(r).detach()
        error = (implied - expected).abs().amax()
        excess = (error - _tolerance(r, expected).detach()).amax()
        size = max(_float32(f.log_abs_d()).detach().abs().amax() for f in r.factors)
        rows.append(torch.stack([error, excess, size]).to(value.device))
    flags = torch.cat([*rows, torch.isfinite(value.detach()).all().reshape(1).float()])
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
