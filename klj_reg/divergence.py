r"""The KL-Jacobian divergence of captured triangular factors.

For a layer whose Jacobian is triangular with diagonal :math:`d`, the KL divergence between
the Gaussian it maps a unit Gaussian to and the unit Gaussian (the paper's Eq. 8 restricted to
the diagonal) is

.. math:: \mathrm{KLJ} = \sum_j d_j^2 - 1 - 2 \log|d_j| \;\ge\; 0,

zero iff every :math:`d_j = 1`. Diagonal entries equal to one (the pass-through half of a
coupling) contribute nothing, so only the entries a layer actually scales need storing. With
:math:`u = 2\log|d|` one term is :math:`f(u) = e^u - 1 - u`, computed as ``expm1(u) - u`` to
keep precision near :math:`u = 0`.

Absurd scales (:math:`|d| > e^{20}`, where :math:`e^{2s}` would overflow float32 at
:math:`s \approx 44`, long before the flow's own :math:`e^{s}` at :math:`s \approx 88`) use
the tangent continuation of :math:`f` at :math:`u_c = 40`,

.. math:: f(u) = f(u_c) + f'(u_c)\,(u - u_c) = \operatorname{expm1}(u_c) - u_c
    + \operatorname{expm1}(u_c)\,(u - u_c), \qquad u > u_c,

which stays finite for every finite scale, is convex and increasing, and keeps pushing the
scale down with the constant gradient :math:`f'(u_c) = \operatorname{expm1}(40)`.

The authors' released code (``form="released-code"``) instead adds, per block,
:math:`\sum_j a_j^2 + n_{\text{ones}} - 2 \log|\det J|`, with :math:`a` the scale subnet's raw
output before clamping and :math:`n_{\text{ones}}` the pass-through entries filled with ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .records import Factor, LayerRecord, Map, as_row

FORMS = ("jacobian", "released-code")


U_CONTINUED = 40.0
r"""Above :math:`u = 2\log|d| = 40` the term continues along its tangent (see above)."""
SLOPE_CONTINUED = math.expm1(U_CONTINUED)


def klj_terms(log_abs_d: Tensor, scale: float = 1.0) -> Tensor:
    r"""Elementwise :math:`d^2 - 1 - 2\log|d|` from :math:`s = \text{scale} \cdot
    \text{log\_abs\_d}`: ``expm1(2s) - 2s``, continued along its tangent above
    :math:`2s = 40` (the scale costs no extra operator)."""
    two_s = (2.0 * scale) * log_abs_d
    t = two_s.clamp_max(U_CONTINUED)
    # Each branch's gradient is exactly zero outside it (no cancellation of huge slopes).
    return torch.expm1(t) - t + SLOPE_CONTINUED * (two_s - U_CONTINUED).clamp_min(0.0)


class _KLJGroups(torch.autograd.Function):
    r""":math:`\sum_k w_k \sum \text{klj\_terms}(s_k, \text{scale}_k)` over groups of factors
    as one autograd node. Forward, term by term with few temporaries (nothing cancels near the
    identity); backward, one expression per group saving only each ``s_k`` (which the
    activation before it usually saves already), where a chain of autograd operators would
    allocate a tensor per step both ways and save ``expm1``'s result besides; no node,
    weighting or addition per group. ``specs[k]`` is ``(2 scale_k, w_k, continued_k)``;
    ``continued_k`` False skips the tangent continuation where ``2 scale_k s_k`` cannot exceed
    its threshold."""

    @staticmethod
    def forward(ctx: Any, specs: tuple[tuple[float, float, bool], ...], *s: Tensor) -> Tensor:
        ctx.save_for_backward(*s)
        ctx.specs = specs
        return _klj_groups(specs, s)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _klj_groups_backward(ctx, grad)


class _KLJGroupsFunc(torch.autograd.Function):
    """:class:`_KLJGroups` for ``torch.func`` transforms (``grad``, ``vmap``), which need
    ``setup_context`` apart from ``forward``; torch binds the arguments of such a function
    through ``inspect`` at every call, so eager calls use :class:`_KLJGroups`."""

    generate_vmap_rule = True  # its forward and backward are torch operators

    @staticmethod
    def forward(specs: tuple[tuple[float, float, bool], ...], *s: Tensor) -> Tensor:
        return _klj_groups(specs, s)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[1:])
        ctx.specs = inputs[0]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        return _klj_groups_backward(ctx, grad)


def _apply_groups(specs: tuple[tuple[float, float, bool], ...], *s: Tensor) -> Tensor:
    """The weighted sum of :func:`klj_terms` over groups, as one autograd node."""
    functional = torch._C._are_functorch_transforms_active()
    result: Tensor = (_KLJGroupsFunc if functional else _KLJGroups).apply(specs, *s)
    return result


def _klj_groups(specs: tuple[tuple[float, float, bool], ...], s: tuple[Tensor, ...]) -> Tensor:
    """The forward of :class:`_KLJGroups`."""
    total: Tensor | None = None
    for (k, weight, continued), t in zip(specs, s, strict=True):
        two_s = t * k
        if continued:
            u = two_s.clamp_max(U_CONTINUED)
            terms = torch.expm1(u).sub_(u).add_(two_s.sub_(u), alpha=SLOPE_CONTINUED)
        else:
            terms = torch.expm1(two_s).sub_(two_s)
        value = terms.sum()
        if weight != 1.0:
            value = value.mul_(weight)
        total = value if total is None else total + value
    assert total is not None
    return total


def _klj_groups_backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The backward of :class:`_KLJGroups`."""
    grads: list[Tensor | None] = [None]
    graph = torch.is_grad_enabled()  # create_graph: out of place, so that it differentiates
    for (k, weight, continued), t, needed in zip(
        ctx.specs, ctx.saved_tensors, ctx.needs_input_grad[1:], strict=True
    ):
        if not needed:
            grads.append(None)
        elif graph:
            u = k * t
            grads.append(grad * (k * weight) * torch.expm1(u.clamp_max(U_CONTINUED)))
        else:
            u = t * k
            if continued:
                u.clamp_max_(U_CONTINUED)
            grads.append(u.expm1_().mul_(grad * (k * weight)))
    return tuple(grads)


def klj_sum(
    log_abs_d: Tensor, scale: float = 1.0, bounds: tuple[float, float] | None = None
) -> Tensor:
    r""":math:`\sum (d^2 - 1 - 2\log|d|)` over every element, :math:`\log|d| = \text{scale}
    \cdot \text{log\_abs\_d}`: ``klj_terms(log_abs_d, scale).sum()`` in fewer passes.
    ``bounds``: the range of ``log_abs_d`` when known (a bounded activation), which spares
    the continuation's operators when ``2 scale log_abs_d`` stays below its threshold."""
    continued = True
    if bounds is not None:
        lo, hi = bounds
        continued = 2.0 * scale * (hi if scale >= 0 else lo) > U_CONTINUED
    result: Tensor = _apply_groups(((2.0 * scale, 1.0, continued),), log_abs_d)
    return result


RANGES: dict[object, tuple[float, float]] = {torch.tanh: (-1.0, 1.0)}
r"""Output ranges of elementwise activations that bound :math:`\log|d|` (adapters' own
activations carry theirs as a ``klj_range`` attribute instead)."""


def activation_range(activation: Map | None) -> tuple[float, float] | None:
    """The range of an activation's output, if it is known to be bounded."""
    if activation is None:
        return None
    try:
        found = RANGES.get(activation)
    except TypeError:  # unhashable
        found = None
    return found if found is not None else getattr(activation, "klj_range", None)


def _float32(t: Tensor) -> Tensor:
    """Accumulate low-precision (bf16/fp16) tensors in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _per_sample_sum(t: Tensor) -> Tensor:
    """Sum over every dimension but the first: ``(B, ...) -> (B,)`` without copying."""
    return t.sum(dim=tuple(range(1, t.dim()))) if t.dim() > 1 else t


def _rows(t: Tensor) -> Tensor:
    """``(B, ...) -> (B, n)``; a 2-D tensor as it is (no operator)."""
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


def _unscaled(factor: Factor) -> Tensor:
    r"""``activation(log_abs(source))`` in float32 (or wider): :math:`\log|d|` / scale."""
    t = _float32(factor.selected())
    return t if factor.activation is None else factor.activation(t)


def record_divergence(record: LayerRecord, form: str = "jacobian") -> Tensor:
    """One layer's divergence per sample, shape ``(B,)`` (or ``(1,)`` if batch-independent)."""
    total: Tensor | None = None
    for factor in record.factors:
        s = _unscaled(factor)
        if form == "jacobian":
            term = _per_sample_sum(klj_terms(s, factor.scale))
            if factor.repeat != 1:
                term = term * factor.repeat
        else:
            term = (-2.0 * factor.repeat * factor.scale) * _per_sample_sum(s)
            raw = factor.pre_activation()
            if raw is not None:
                raw = _float32(raw)
                ones = record.dim - raw.shape[1:].numel()
                term = term + _per_sample_sum(raw.square()) + ones
        total = term if total is None else total + term
    if total is None:
        raise ValueError(f"layer {record.name!r} ({record.kind}) recorded no factor")
    return total


def divergence(records: Sequence[LayerRecord], form: str = "jacobian") -> Tensor:
    """Sum of :func:`record_divergence` over layers, per sample: shape ``(B,)``."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    total: Tensor | None = None
    for record in records:
        term = record_divergence(record, form)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no layer records to compute the divergence from")
    return total


def _compact(t: Tensor) -> Tensor:
    """A tensor expanded over the batch (stride 0, e.g. a per-feature scale broadcast to
    every sample) as its single row ``(1, ...)``: the batch mean of a shared term is itself."""
    return t[:1] if t.dim() > 0 and t.shape[0] > 1 and t.stride(0) == 0 else t


Group = tuple[int, int, torch.dtype, object, float]
"""Factors whose terms are one expression: batch (1 if shared, 0 for ``as_row`` sources),
repeat, dtype, activation (itself, or its id if it is not hashable), scale."""


def _key(activation: Map | None) -> object:
    """Equal (hashable) activations share a group; an unhashable one is its own."""
    if activation is None:  # torch.compile before torch 2.13 cannot trace hash(None)
        return None
    try:
        hash(activation)
    except TypeError:
        return id(activation)
    return activation


def mean_divergence(records: Sequence[LayerRecord], form: str = "jacobian") -> Tensor:
    """Batch mean of :func:`divergence` without per-sample sums.

    Factors with the same batch size, ``repeat``, dtype, ``activation`` and ``scale`` are
    flattened and concatenated before their activation, so that the elementwise work is one
    expression per group rather than one per factor (fewer operators forward and backward);
    factors expanded over the batch count once. The groups' terms, weighted by
    ``repeat / batch`` (shared factors, batch 1: by ``repeat``), are one autograd node.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")
    groups: dict[Group, list[Tensor]] = {}
    activations: dict[object, Map] = {}  # group key of an activation -> the activation
    extra: list[Tensor] = []  # released-code: the raw pre-activations' mean squares
    ones = 0  # released-code: pass-through entries filled with ones, per sample
    low = (torch.float16, torch.bfloat16)
    released = form != "jacobian"
    for record in records:
        for factor in record.factors:
            log_abs = factor.log_abs
            if log_abs is as_row:  # shared, no batch dimension: flat, batch 0 in the key
                t = factor.source if factor.source.dim() == 1 else factor.source.reshape(-1)
                batch = 0
            else:
                t = factor.source if log_abs is None else log_abs(factor.source)
                if t.dim() and t.shape[0] > 1 and t.stride(0) == 0:
                    t = t[:1]  # expanded over the batch: compact first, .float() would expand
                batch = t.shape[0]
            if t.dtype in low:
                t = t.float()
            activation = factor.activation
            which = None if activation is None else _key(activation)
            key = (batch, factor.repeat, t.dtype, which, factor.scale)
            if activation is not None:
                activations.setdefault(which, activation)
            found = groups.get(key)
            if found is None:
                groups[key] = [t]
            else:
                found.append(t)
            if released and factor.raw is not None:
                raw = _float32(factor.raw(factor.source))
                extra.append(raw.square().sum() / raw.shape[0])
                ones += record.dim - raw.shape[1:].numel()
    if not groups:
        raise ValueError("no layer records to compute the divergence from")
    specs: list[tuple[float, float, bool]] = []
    inputs: list[Tensor] = []
    for (batch, repeat, _, which, scale), tensors in groups.items():
        if len(tensors) == 1:
            s = tensors[0]
        else:
            s = torch.cat(tensors if batch == 0 else [_rows(t) for t in tensors], dim=-1)
        activation = activations.get(which)
        if activation is not None:
            s = activation(s)
        weight = repeat / batch if batch > 1 else float(repeat)
        if form == "jacobian":
            bounds = activation_range(activation)
            continued = (
                bounds is None
                or 2.0 * scale * (bounds[1] if scale >= 0 else bounds[0]) > U_CONTINUED
            )
            specs.append((2.0 * scale, weight, continued))
            inputs.append(s)
        else:
            extra.append(s.sum() * (-2.0 * scale * weight))
    total: Tensor | None = _apply_groups(tuple(specs), *inputs) if inputs else None
    for term in extra:
        total = term if total is None else total + term
    assert total is not None
    return total + ones if ones else total


def log_det_of(record: LayerRecord) -> Tensor:
    """The log-determinant the captured factors imply, per sample: sum of repeat * log|d|."""
    total: Tensor | None = None
    for factor in record.factors:
        term = factor.repeat * _per_sample_sum(_float32(factor.log_abs_d()))
        total = term if total is None else total + term
    assert total is not None
    return total
