"""What a capture stores: each layer's triangular factors, as tensors the flow already made.

A layer's Jacobian is a product of triangular factors (one for a one-sided coupling or an
elementwise map, two for a two-sided coupling, coupling and scale for Glow-style blocks).
Each factor is described by its diagonal d through ``log|d|``; entries not listed are 1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import torch
from torch import Tensor

Map = Callable[[Tensor], Tensor]
_T = TypeVar("_T", bound=tuple[Any, ...])


def _by_constructor(cls: type[_T], values: tuple[Any, ...]) -> _T:
    return cls(*values)


make: Callable[[type[_T], tuple[Any, ...]], _T] = (
    tuple.__new__
    if tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 6)
    else _by_constructor
)
"""``make(cls, values)``: a NamedTuple from a tuple of all its fields, in the hot path of
every captured call: ``tuple.__new__`` (no Python frame); with torch < 2.6 the constructor,
whose dynamo cannot trace ``tuple.__new__`` of a NamedTuple."""


def as_row(t: Tensor) -> Tensor:
    """``log_abs`` of a factor shared by the batch whose ``source`` is a tensor without a
    batch dimension (a parameter such as ActNorm's ``(C,)`` log-scale): ``source`` as one row
    ``(1, ...)``. The penalty concatenates such sources flat and adds no row dimension, so a
    layer pays no view operator forward and backward for it."""
    return t.unsqueeze(0)


class Factor(NamedTuple):
    r"""One triangular factor of a layer's Jacobian (built by keyword), with diagonal
    :math:`\log|d| = \text{scale} \cdot \text{activation}(\text{log\_abs}(\text{source}))`.

    Attributes:
        source: A tensor the layer computed during its forward pass, of shape ``(B, ...)``,
            or ``(1, ...)`` when the factor is shared by the whole batch (ActNorm); with
            ``log_abs=as_row``, a shared tensor of any shape without the batch dimension.
        log_abs: Maps ``source`` to :math:`\log|d|` (or to the activation's input); ``None``
            for the identity. Evaluated lazily, in :func:`klj_reg.penalty`. Prefer views
            (slices) here and put elementwise work in ``activation``.
        repeat: How many diagonal entries each element of ``log|d|`` stands for (e.g. the
            number of pixels sharing a per-channel scale).
        raw: Maps ``source`` to the scale's pre-activation (subnet output before clamping),
            used only by ``form="released-code"``; ``None`` if the factor has none.
        activation: An elementwise function applied after ``log_abs`` (``None``: identity).
            Factors of different layers with equal (hashable) activations are concatenated
            and the activation runs once on them all, so pass one shared object (e.g.
            ``torch.tanh``), not a new closure per layer.
        scale: A constant factor of :math:`\log|d|` (e.g. a clamp, or -1 for a layer run in
            its inverse direction); folded into the penalty's own multiplication.
    """

    source: Tensor
    log_abs: Map | None = None
    repeat: int = 1
    raw: Map | None = None
    activation: Map | None = None
    scale: float = 1.0

    @property
    def batch(self) -> int:
        """The batch size of :meth:`selected` (1 for a factor shared by the batch)."""
        return 1 if self.log_abs is as_row else self.source.shape[0]

    def selected(self) -> Tensor:
        """``log_abs(source)``: the input of the activation, shape ``(B, ...)`` or ``(1, ...)``."""
        return self.source if self.log_abs is None else self.log_abs(self.source)

    def log_abs_d(self) -> Tensor:
        r""":math:`\log|d|`, shape ``(B, ...)`` or ``(1, ...)``."""
        t = self.selected()
        if self.activation is not None:
            t = self.activation(t)
        return t if self.scale == 1.0 else self.scale * t

    def pre_activation(self) -> Tensor | None:
        """The raw pre-activation, or ``None``."""
        return None if self.raw is None else self.raw(self.source)


class LayerRecord(NamedTuple):
    """The factors of one layer, from one data-to-latent call (built by keyword).

    Attributes:
        name: The layer's path in the model (``named_modules``), e.g. ``"module_list.3"``.
        kind: The layer's class name, for error messages.
        factors: Its triangular factors.
        log_det: The log-determinant the layer itself returned, shape ``(B,)`` or scalar,
            used to check the adapter; ``None`` if the layer returns none.
        dim: The length of the layer's Jacobian diagonal per sample (numel of one input).
    """

    name: str
    kind: str
    factors: tuple[Factor, ...]
    log_det: Tensor | None
    dim: int


def flow_dim(records: list[LayerRecord]) -> int:
    """The flow's dimension :math:`D` as its captured layers see it: the longest Jacobian
    diagonal of any layer (a multi-scale flow's later layers see part of it), whatever
    module the flow sits in and whatever else (a condition) the model's call takes."""
    return max([r.dim for r in records], default=1)
