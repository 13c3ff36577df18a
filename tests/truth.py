"""Independent truth for adapter tests: exact per-sample Jacobians from torch.func."""

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


def diagonal(fn: Callable[..., Tensor], x: Tensor, *batched: Tensor) -> Tensor:
    """Diagonal of the per-sample Jacobian, ``(B, D)``."""
    return torch.diagonal(jacobian(fn, x, *batched), dim1=1, dim2=2)


def records(model: torch.nn.Module, forward: Callable[[], object]) -> dict[str, LayerRecord]:
    """Attach, run ``forward``, and return the captured records by layer name."""
    capture = klj_reg.attach(model)
    capture.records.clear()
    forward()
    return {r.name: r for r in capture.take()}


def assert_triangular(jac: Tensor, lower: bool = True) -> None:
    """Check a factor's Jacobian really is triangular (its diagonal is its determinant)."""
    tri = torch.tril(jac) if lower else torch.triu(jac)
    torch.testing.assert_close(jac, tri, atol=1e-6, rtol=0)


def log_abs(factor_values: Tensor) -> Tensor:
    """Flatten a factor's log|d| per sample."""
    return factor_values.reshape(factor_values.shape[0], -1)
