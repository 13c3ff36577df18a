"""The divergence as one compiled function: a fused kernel forward and one backward.

In eager mode every captured factor costs a handful of small elementwise kernels (and as many
in the backward), which for small models is a visible share of a step. With ``fused=True``
:func:`klj_reg.penalty` compiles, once per model structure, a function of the captured source
tensors that recomputes every factor's ``log|d|`` and the divergence, so ``torch.compile``
fuses them. The first call pays the compilation (seconds); shapes that change (e.g. the last,
smaller batch of an epoch) recompile once. A factor whose maps hold one call's state (a
captured tensor, e.g. the layer's input, or a per-call cache) would be a new function every
step: its layer's divergence is computed eagerly and added to the compiled rest.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .divergence import divergence, mean_divergence
from .records import Factor, LayerRecord, Map

_Factors = tuple[tuple[Map | None, int, Map | None, Map | None, float], ...]
_Structure = tuple[tuple[str, str, int, _Factors], ...]
Cache = dict[tuple[object, ...], Callable[[list[Tensor]], Tensor]]


def _build(structure: _Structure, form: str, mean: bool) -> Callable[[list[Tensor]], Tensor]:
    def compute(sources: list[Tensor]) -> Tensor:
        it = iter(sources)
        records = [
            LayerRecord(
                name,
                kind,
                tuple(Factor(next(it), *rest) for rest in factors),
                None,
                dim,
            )
            for name, kind, dim, factors in structure
        ]
        per_sample = divergence(records, form)
        return per_sample.mean() if mean else per_sample

    return torch.compile(_own_code(compute), dynamic=None)


_serial = itertools.count()


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps compiled graphs, its recompile limit
    (8) and its automatic-dynamic decisions per code object: structures sharing one would
    recompile as floats turn dynamic and, past the limit, run eagerly without telling."""
    code = fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{next(_serial)}")
    own = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    own.__qualname__ = f"{fn.__qualname__}_{code.co_name}"
    return own


_VALUES = (int, float, bool, str, type(None))


def _map_key(fn: Map | None) -> object:
    """What a map computes, for the cache: adapters may build a new closure per call, so a
    function is keyed by its code and captured values (identity for captured objects). A
    cached compiled function built with an earlier, equal closure computes the same."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return id(fn) if fn is not None else None
    cells = getattr(fn, "__closure__", None) or ()
    captured: list[object] = []
    for cell in cells:
        value = cell.cell_contents
        if isinstance(value, _VALUES):
            captured.append(value)
        elif callable(value) and hasattr(value, "__code__"):
            captured.append(_map_key(value))
        else:
            captured.append(id(value))
    return code, tuple(captured)


_PER_CALL = (Tensor, list, dict, set)
"""Captured objects that hold one call's state: a map capturing one is not the same function
on the next call."""


def _per_call(fn: Map | None) -> bool:
    """Whether ``fn`` (or a function it captures) captures a tensor or a mutable container."""
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, _PER_CALL) or (
            callable(value) and hasattr(value, "__code__") and _per_call(value)
        ):
            return True
    return False


def _eager(record: LayerRecord) -> bool:
    return any(_per_call(m) for f in record.factors for m in (f.log_abs, f.raw, f.activation))


def fused_divergence(records: Sequence[LayerRecord], form: str, mean: bool, cache: Cache) -> Tensor:
    """:func:`klj_reg.divergence` (optionally its batch mean) through a compiled function,
    cached in ``cache`` (the model's capture, so it lives and dies with the model); layers
    whose maps hold per-call state are computed eagerly and added."""
    flags = [_eager(r) for r in records]
    if not any(flags):
        return _compiled(records, form, mean, cache)
    eager = [r for r, e in zip(records, flags, strict=True) if e]
    rest = [r for r, e in zip(records, flags, strict=True) if not e]
    value = mean_divergence(eager, form) if mean else divergence(eager, form)
    return value + _compiled(rest, form, mean, cache) if rest else value


def _compiled(records: Sequence[LayerRecord], form: str, mean: bool, cache: Cache) -> Tensor:
    structure: _Structure = tuple(
        (
            r.name,
            r.kind,
            r.dim,
            tuple((f.log_abs, f.repeat, f.raw, f.activation, f.scale) for f in r.factors),
        )
        for r in records
    )
    key = (form, mean) + tuple(
        (
            name,
            dim,
            tuple((_map_key(a), n, _map_key(b), _map_key(c), k) for a, n, b, c, k in factors),
        )
        for name, _, dim, factors in structure
    )
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = _build(structure, form, mean)
    # Donated buffers would forbid backward(retain_graph=True) on the user's loss.
    with torch._functorch.config.patch(donated_buffer=False):
        return fn([f.source for r in records for f in r.factors])
