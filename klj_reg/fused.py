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
                name=name,
                kind=kind,
                factors=tuple(
                    Factor(
                        source=next(it),
                        log_abs=log_abs,
                        repeat=repeat,
                        raw=raw,
                        activation=activation,
                        scale=scale,
                    )
                    for log_abs, repeat, raw, activation, scale in factors
                ),
                log_det=None,
                dim=dim,
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
_PER_CALL = (Tensor, list, dict, set)
"""Captured objects that hold one call's state (an input, a per-call cache): a map capturing
one is not the same function on the next call."""


class _PerCall(Exception):
    """A map captures per-call state: its layer cannot be cached as a compiled function."""


def _map_key(fn: Map | None) -> object:
    """What a map computes, for the cache: adapters may build a new closure per call, so a
    function is keyed by its code and captured values (identity for captured objects such as
    modules). A cached compiled function built with an earlier, equal closure computes the
    same. Raises :class:`_PerCall` where it captures per-call state."""
    code = getattr(fn, "__code__", None)
    if code is None:
        return id(fn) if fn is not None else None
    captured: list[object] = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        if isinstance(value, _PER_CALL):
            raise _PerCall
        if isinstance(value, _VALUES):
            captured.append(value)
        elif callable(value) and hasattr(value, "__code__"):
            captured.append(_map_key(value))
        else:
            captured.append(id(value))
    return code, tuple(captured)


def _record_key(record: LayerRecord) -> object | None:
    """The cache key of one layer's structure, or ``None`` if a map holds per-call state."""
    try:
        factors = tuple(
            (_map_key(f.log_abs), f.repeat, _map_key(f.raw), _map_key(f.activation), f.scale)
            for f in record.factors
        )
    except _PerCall:
        return None
    return record.name, record.dim, factors


def fused_divergence(records: Sequence[LayerRecord], form: str, mean: bool, cache: Cache) -> Tensor:
    """:func:`klj_reg.divergence` (optionally its batch mean) through a compiled function,
    cached in ``cache`` (the model's capture, so it lives and dies with the model); layers
    whose maps hold per-call state are computed eagerly and added."""
    keys = [_record_key(r) for r in records]
    rest = [r for r, k in zip(records, keys, strict=True) if k is not None]
    eager = [r for r, k in zip(records, keys, strict=True) if k is None]
    value = None
    if rest:
        key = (form, mean, *(k for k in keys if k is not None))
        value = _compiled(rest, form, mean, key, cache)
    if eager:
        term = mean_divergence(eager, form) if mean else divergence(eager, form)
        value = term if value is None else value + term
    if value is None:
        raise ValueError("no layer records to compute the divergence from")
    return value


def _compiled(
    records: Sequence[LayerRecord], form: str, mean: bool, key: tuple[object, ...], cache: Cache
) -> Tensor:
    fn = cache.get(key)
    if fn is None:
        structure: _Structure = tuple(
            (
                r.name,
                r.kind,
                r.dim,
                tuple((f.log_abs, f.repeat, f.raw, f.activation, f.scale) for f in r.factors),
            )
            for r in records
        )
        fn = cache[key] = _build(structure, form, mean)
    # Donated buffers would forbid backward(retain_graph=True) on the user's loss.
    with torch._functorch.config.patch(donated_buffer=False):
        return fn([f.source for r in records for f in r.factors])
