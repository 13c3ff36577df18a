"""Independent truth for adapter tests: exact per-sample Jacobians (torch.func, or autograd
one sample at a time), the log-determinant a record's factors imply compared with the
framework's, and the helpers that attach models for a test (detached at its teardown by
tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import klj_reg
from klj_reg.records import LayerRecord


def jacobian(fn: Callable[..., Tensor], x: Tensor, *batched: Tensor) -> Tensor:
    """Per-sample Jacobian with respect to ``x`` of a batched map ``fn(x, *batched)`` that
    treats samples independently (``batched``: per-sample conditions), shape
    ``(B, D_out, D_in)`` over flattened dimensions."""

    def single(xi: Tensor, *ci: Tensor) -> Tensor:
        return fn(xi.unsqueeze(0), *(c.unsqueeze(0) for c in ci)).reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(single))(x, *batched)
    return jac.reshape(x.shape[0], -1, x[0].numel())


def jacobian_each(fn: Callable[..., Tensor], x: Tensor, *batched: Tensor) -> Tensor:
    """Like :func:`jacobian`, one sample at a time with ``torch.autograd``: for layers that
    ``vmap`` cannot batch (spline code branches on data and indexes by boolean masks;
    normflows accumulates log-dets in place). ``fn`` gets a batch of one."""
    rows = []
    for i in range(x.shape[0]):
        cs = tuple(c[i : i + 1] for c in batched)
        jac = torch.autograd.functional.jacobian(
            lambda xi, cs=cs: fn(xi, *cs).reshape(-1), x[i : i + 1]
        )
        rows.append(jac.reshape(-1, x[0].numel()))
    return torch.stack(rows)


def diagonal(fn: Callable[..., Tensor], x: Tensor, *batched: Tensor) -> Tensor:
    """Diagonal of the per-sample Jacobian, ``(B, D)``."""
    return torch.diagonal(jacobian(fn, x, *batched), dim1=1, dim2=2)


_ATTACHED: list[torch.nn.Module] = []


def attach(model: torch.nn.Module, direction: str = "data") -> klj_reg.Capture:
    """``klj_reg.attach``, remembered: the test's teardown detaches the model (an attached
    layer keeps framework-wide patches in place for the tests that run after it)."""
    detach_later(model)
    return klj_reg.attach(model, direction=direction)


def detach_later(model: torch.nn.Module) -> None:
    """Detach ``model`` after the test (one attached another way, e.g. by ``penalty``)."""
    _ATTACHED.append(model)


def detach_all() -> None:
    """Detach every model :func:`attach` attached (tests/conftest.py, after each test)."""
    while _ATTACHED:
        klj_reg.detach(_ATTACHED.pop())


def records(
    model: torch.nn.Module, forward: Callable[[], object], detach: bool = False
) -> dict[str, LayerRecord]:
    """Attach, run ``forward``, and return the captured records by layer name; with
    ``detach``, detach the model at once (so that the test's truth runs uncaptured)."""
    capture = attach(model)
    capture.records.clear()
    forward()
    found = {r.name: r for r in capture.take()}
    if detach:
        klj_reg.detach(model)
    return found


def only(recs: dict[str, LayerRecord]) -> LayerRecord:
    """The one record of ``recs``."""
    assert len(recs) == 1, recs.keys()
    return next(iter(recs.values()))


def implied_log_det(record: LayerRecord) -> Tensor:
    """The log-determinant a record's factors imply, per sample (``(1,)`` where every factor
    is shared by the batch): the sum over factors of ``repeat * sum(log|d|)``, computed here
    rather than by the library's ``log_det_of``."""
    return sum(  # type: ignore[return-value]
        f.repeat * f.log_abs_d().reshape(f.log_abs_d().shape[0], -1).sum(1) for f in record.factors
    )


def assert_log_det(record: LayerRecord, log_det: Tensor | float, own: bool = False) -> None:
    """The record's factors imply ``log_det`` (the framework's, broadcast over the batch);
    with ``own``, also the log-determinant the layer returned to the capture
    (``record.log_det``, which the core checks the factors against on the first batch)."""
    implied = implied_log_det(record)
    expected = torch.as_tensor(log_det, dtype=implied.dtype)
    shape = torch.broadcast_shapes(implied.shape, expected.shape)
    torch.testing.assert_close(implied.expand(shape), expected.expand(shape))
    if own:
        assert record.log_det is not None
        torch.testing.assert_close(implied.expand(shape), record.log_det.expand(shape))


def assert_triangular(jac: Tensor, lower: bool = True) -> None:
    """Check a factor's Jacobian really is triangular (its diagonal is its determinant)."""
    tri = torch.tril(jac) if lower else torch.triu(jac)
    torch.testing.assert_close(jac, tri, atol=1e-6, rtol=0)


def log_abs(factor_values: Tensor) -> Tensor:
    """Flatten a factor's log|d| per sample."""
    return factor_values.reshape(factor_values.shape[0], -1)
