r"""FrEIA: coupling blocks, AllInOneBlock, ActNorm and friends.

FrEIA maps data to latent with ``rev=False``. Each block's scale ``s`` (the log of its Jacobian
diagonal) is a local variable, so each block's reader keeps its subnetworks' outputs during
its call and turns them into factors with the block's own clamping function:

- two-sided blocks (GLOW, RNVP, GIN) are two triangular factors, one per half;
- AllInOneBlock is :math:`P \cdot \mathrm{diag}(g) \cdot C`: the coupling factor and the
  global scale :math:`g` are separate factors, the permutation contributes zero.

Attached with ``direction="sample"`` (or ``"both"``), ``rev=True`` calls (``sample_when=rev``)
record too: a coupling's scale is a function of its conditioning half, computed by the same
subnetwork on both directions, so the sampling map's factors are the same tensors with
:math:`\log e = -\log d` (the core's default); FrEIA's ``rev=True`` log-det is already that
map's.

FrEIA 0.2 (PyPI) scales AllInOneBlock's subnet output in place (``a *= 0.1``) and clamps with
``clamp * tanh(a)``; later versions compute ``a = a * 0.1`` and, on master, ``clamp *
tanh(a / clamp)``. Which one runs is found by probing each block's ``_affine`` once
(``prepare``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kit import Door, Handle, member, module_entry
from ..reader import Call, Mismatch
from ..records import Factor
from ..registry import Registrar

framework = Registrar("FrEIA", Fm, Ff)


_REV_INDEX: dict[type, int | None] = {}


def _rev_index(cls: Any) -> int | None:
    """Where ``cls.forward``'s signature puts ``rev`` among the positional arguments."""
    if cls not in _REV_INDEX:
        names = list(inspect.signature(cls.forward).parameters)[1:]  # without self
        _REV_INDEX[cls] = names.index("rev") if "rev" in names else None
    return _REV_INDEX[cls]


def is_rev(block: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call of ``block`` runs ``rev=True`` (latent to data)."""
    if "rev" in kwargs:
        return bool(kwargs["rev"])
    index = _rev_index(type(block))
    return index is not None and len(args) > index and bool(args[index])


def rev(block: Any, call: Call) -> bool:
    """``sample_when`` of every FrEIA block: its ``rev=True`` calls map latent to data."""
    kwargs = call.kwargs
    if "rev" in kwargs:
        return bool(kwargs["rev"])
    index = _REV_INDEX.get(type(block), -1)
    if index == -1:
        index = _rev_index(type(block))
    args = call.args
    return index is not None and len(args) > index and bool(args[index])


def _soft_clamp(block: Any, width: int, gin: bool) -> dict[str, Any]:
    """Factor fields of the block's own soft clamp ``clamp * f_clamp(a[:, :width])`` (GIN
    then removes the per-sample mean, which is not elementwise); raw: ``a[:, :width]``."""
    first = _first(width)
    if gin:

        def centred(a: Tensor) -> Tensor:
            s = block.clamp * block.f_clamp(a[:, :width])
            return s - s.mean(1, keepdim=True)

        return {"log_abs": centred, "raw": first}
    return {
        "log_abs": first,
        "activation": block.f_clamp,
        "scale": float(block.clamp),
        "raw": first,
    }


def _first(width: int) -> Callable[[Tensor], Tensor]:
    return lambda a: a[:, :width]


def _halves(block: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The two halves' factor fields (the first half is scaled by subnet2's output)."""
    gin = isinstance(block, Fm.GINCouplingBlock)
    return (
        _soft_clamp(block, block.split_len1, gin),
        _soft_clamp(block, block.split_len2, gin),
    )


def two_sided(block: Any, call: Call) -> list[Factor]:
    r"""GLOW / GIN / RNVP: the first half is scaled by one subnetwork's output, then the second
    by the other's. On ``rev=True`` the same subnetworks give the same scales: the sampling
    map's factors are these with :math:`\log e = -\log d` (the core's default)."""
    first, second = call.setup
    return [
        Factor(source=call.kept["first"], **first),
        Factor(source=call.kept["second"], **second),
    ]


framework.adapter(
    "GLOWCouplingBlock",
    "GINCouplingBlock",
    read=two_sided,
    keep={"first": "subnet2", "second": "subnet1"},
    prepare=_halves,
    sample_when=rev,
)
framework.adapter(
    "RNVPCouplingBlock",  # separate scale and shift subnetworks
    read=two_sided,
    keep={"first": "subnet_s2", "second": "subnet_s1"},
    subnets=lambda b: [b.subnet_s1, b.subnet_s2, b.subnet_t1, b.subnet_t2],
    prepare=_halves,
    sample_when=rev,
)


def _one_side(block: Any) -> dict[str, Any]:
    one = isinstance(block, Fm.ConditionalAffineTransform)
    return _soft_clamp(block, block.channels if one else block.split_len2, False)


@framework.reads(
    "AffineCouplingOneSided",
    "ConditionalAffineTransform",
    keep={"a": "subnet"},
    prepare=_one_side,
    sample_when=rev,
)
def one_sided(block: Any, call: Call) -> Factor:
    """AffineCouplingOneSided (second half scaled) and ConditionalAffineTransform (all)."""
    return Factor(source=call.kept["a"], **call.setup)


def _all_in_one_variant(block: Any) -> tuple[bool, bool]:
    """Probe ``_affine`` once: (scales the subnet output in place, clamps tanh(a / clamp))."""
    ch = block.splits[1]
    ref = block.global_scale
    shape = (1, 2 * ch) + (1,) * block.input_rank
    a = torch.linspace(-25.0, 25.0, 2 * ch, dtype=ref.dtype, device=ref.device).reshape(shape)
    probe = a.clone()
    gin, block.GIN = block.GIN, False
    try:
        with torch.no_grad():
            _, log_det = block._affine(torch.zeros_like(probe[:, :ch]), probe)
    finally:
        block.GIN = gin
    in_place = not torch.equal(probe, a)
    pre = 0.1 * a[:, :ch]
    for over_clamp in (False, True):
        s = block.clamp * torch.tanh(pre / block.clamp if over_clamp else pre)
        if torch.allclose(s.sum(), log_det.sum(), rtol=1e-4, atol=1e-4):
            return in_place, over_clamp
    raise Mismatch(
        "AllInOneBlock computes its coupling scale in a way klj-reg does not know (neither "
        "clamp*tanh(0.1 a) nor clamp*tanh(0.1 a / clamp))",
    )


def _log_sigmoid_global(g: Tensor) -> Tensor:
    """``log(10 sigmoid(g - 2))``: FrEIA's ``global_affine_type="SIGMOID"``."""
    return F.logsigmoid(g - 2.0) + math.log(10.0)


def _log_softplus_global(g: Tensor) -> Tensor:
    """``log(0.1 softplus(g; beta=0.5))``: FrEIA's ``global_affine_type="SOFTPLUS"``."""
    return torch.log(F.softplus(g, beta=0.5)) - math.log(10.0)


def _global_log(block: Any) -> dict[str, Any]:
    """Factor fields of ``log(global_scale_activation(g))``: a shared module-level function
    when the block's activation is one of FrEIA's (probed once), so that all blocks' global
    scales are one expression; otherwise the block's own activation."""
    ref = block.global_scale
    g = torch.linspace(-8.0, 8.0, 33, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        own = torch.log(block.global_scale_activation(g))
        known: list[Callable[[Tensor], Tensor] | None] = [
            None,
            _log_softplus_global,
            _log_sigmoid_global,
        ]
        for fn in known:
            if torch.allclose(own, g if fn is None else fn(g), rtol=1e-5, atol=1e-5):
                return {"activation": fn}

    def own_log(t: Tensor) -> Tensor:
        return torch.log(block.global_scale_activation(t))

    return {"log_abs": own_log}


def _all_in_one(block: Any) -> tuple[dict[str, Any], dict[str, Any] | None, int]:
    """The coupling factor's fields, the global scale's (``None`` for GIN) and the pixels
    sharing each global scale, from one probe of the block's ``_affine``."""
    in_place, over_clamp = _all_in_one_variant(block)
    ch, clamp, dims = block.splits[1], block.clamp, block.sum_dims
    inner = (1.0 if in_place else 0.1) / (clamp if over_clamp else 1.0)  # tanh's argument / a

    def pre(a: Tensor) -> Tensor:  # tanh's argument from the subnet output
        return a[:, :ch] if inner == 1.0 else inner * a[:, :ch]

    def centred(a: Tensor) -> Tensor:  # GIN: s minus its per-sample mean (not elementwise)
        s = clamp * torch.tanh(pre(a))
        return s - s.mean(dim=dims, keepdim=True)

    def raw(a: Tensor) -> Tensor:  # the subnet's output: in place, ``a`` holds 0.1 times it
        return 10.0 * a[:, :ch] if in_place else a[:, :ch]

    coupling: dict[str, Any] = (
        {"log_abs": centred, "raw": raw}
        if block.GIN
        else {"log_abs": pre, "activation": torch.tanh, "scale": float(clamp), "raw": raw}
    )
    pixels = int(torch.Size(block.dims_in[0][1:]).numel())
    return coupling, None if block.GIN else _global_log(block), pixels


@framework.reads("AllInOneBlock", keep={"a": "subnet"}, prepare=_all_in_one, sample_when=rev)
def all_in_one(block: Any, call: Call) -> list[Factor]:
    """AllInOneBlock: coupling factor on the second half, then the global scale."""
    coupling, global_fields, pixels = call.setup
    out = [Factor(source=call.kept["a"], **coupling)]
    if global_fields is not None:
        out.append(Factor(source=member(block, "global_scale"), repeat=pixels, **global_fields))
    return out


def _act_norm(block: Any) -> tuple[str, float, int]:
    """The name of the parameter holding the log-scale (read in each call: a parameter
    replaced since attach, or swapped in by ``torch.func.functional_call``, is the one the
    call used), its sign, and the pixels sharing each channel's scale."""
    name, sign = (
        ("log_scale", -1.0)
        if isinstance(getattr(block, "log_scale", None), nn.Parameter)
        else ("scale", 1.0)
    )
    dims = block.dims_in[0] if isinstance(block.dims_in, list) else block.dims_in  # master: [dims]
    return name, sign, int(torch.Size(dims[1:]).numel())


@framework.reads("ActNorm", prepare=_act_norm, sample_when=rev)
def act_norm(block: Any, call: Call) -> Factor:
    """ActNorm: per-channel factor, shared by every pixel and sample: ``exp(scale)`` in FrEIA
    0.2 (``x * exp(scale) + bias``), ``exp(-log_scale)`` on master (``(x - loc) / scale``, where
    ``scale`` is ``exp(log_scale)``)."""
    name, sign, pixels = call.setup
    return Factor(source=member(block, name), repeat=pixels, scale=sign)


def _uniform_log_det(block: Any, call: Call) -> Tensor:
    x = call.x
    assert x is not None
    return torch.as_tensor(call.output[1], dtype=x.dtype, device=x.device)


def uniform(block: Any, call: Call) -> Factor:
    """Layers that are a uniform scale times an orthogonal map (Haar wavelets): the factor
    is ``log_det / D`` on every entry, read from the layer's own log-det (on ``rev=True``,
    already the sampling map's)."""
    dim = call.x.shape[1:].numel() if call.x is not None else 1
    per_entry = (_uniform_log_det(block, call) / dim).reshape(-1, 1)
    return Factor(source=per_entry, repeat=dim)


framework.adapter(
    "HaarDownsampling",
    "HaarUpsampling",
    read=uniform,
    read_sample=uniform,
    log_det=_uniform_log_det,
    sample_when=rev,
)


@framework.reads("OrthogonalTransform", sample_when=rev)
def orthogonal(block: Any, call: Call) -> Factor:
    """OrthogonalTransform: ``diag(exp(log_e(scaling))) R``; R contributes zero."""
    return Factor(source=member(block, "scaling"), log_abs=block._log_e)


@framework.entry("InvertibleModule")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A FrEIA model's pass begins at its own call with ``rev=False``; its sampling pass (where
    the door opens them), at a call with ``rev=True``."""
    return module_entry(
        model,
        door,
        lambda args, kwargs: not is_rev(model, args, kwargs),
        lambda args, kwargs: is_rev(model, args, kwargs),
    )


@framework.runner("InvertibleModule")
def run(model: nn.Module, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """FrEIA's data-to-latent pass (``rev=False``): ``(z, log_det)``."""
    kwargs: dict[str, Any] = {}
    if context is not None:
        kwargs["c"] = list(context) if isinstance(context, (list, tuple)) else [context]
    containers = (Ff.SequenceINN, Ff.GraphINN)
    out, log_det = model(x, **kwargs) if isinstance(model, containers) else model((x,), **kwargs)
    if isinstance(out, (list, tuple)):
        out = torch.cat([o.reshape(o.shape[0], -1) for o in out], dim=1) if len(out) > 1 else out[0]
    return out, log_det


framework.flow_base("InvertibleModule")
framework.neutral(
    "SequenceINN",
    "GraphINN",
    "ReversibleGraphNet",
    "ReversibleSequential",
    "NICECouplingBlock",
    "PermuteRandom",
    "HouseholderPerm",
    "IRevNetDownsampling",
    "IRevNetUpsampling",
    "Flatten",
    "Reshape",
    "Split",
    "Concat",
    "SplitChannel",
    "ConcatChannel",
)
