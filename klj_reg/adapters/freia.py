r"""FrEIA: coupling blocks, AllInOneBlock, ActNorm and friends.

FrEIA maps data to latent with ``rev=False``. Each block's scale ``s`` (the log of its Jacobian
diagonal) is a local variable, so hooks on the block's subnetworks keep a reference to their
outputs, and the block's own forward hook turns them into factors with the block's own
clamping function, only for ``rev=False`` calls:

- two-sided blocks (GLOW, RNVP, GIN) are two triangular factors, one per half;
- AllInOneBlock is :math:`P \cdot \mathrm{diag}(g) \cdot C`: the coupling factor and the
  global scale :math:`g` are separate factors, the permutation contributes zero.

Attached with ``direction="sample"`` (or ``"both"``), ``rev=True`` calls record too: a
coupling's scale is a function of its conditioning half, computed by the same subnetwork on
both directions, so the sampling map's factors are the same tensors with
:math:`\log e = -\log d`; FrEIA's ``rev=True`` log-det is already that map's.

FrEIA 0.2 (PyPI) scales AllInOneBlock's subnet output in place (``a *= 0.1``) and clamps with
``clamp * tanh(a)``; later versions compute ``a = a * 0.1`` and, on master, ``clamp *
tanh(a / clamp)``. Which one runs is found by probing each block's ``_affine`` once.
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

from ..kit import Door, Handle, Site, inverted, mismatch, module_entry, returned_log_det
from ..records import Factor
from ..registry import Registrar

framework = Registrar("FrEIA", Fm, Ff)


def _rev_reader(block: Any) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    """Reads ``rev`` from a call's arguments, wherever this block's signature puts it."""
    names = list(inspect.signature(block.forward).parameters)
    index = names.index("rev") if "rev" in names else None

    def is_rev(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if "rev" in kwargs:
            return bool(kwargs["rev"])
        return index is not None and len(args) > index and bool(args[index])

    return is_rev


def _install_stashing(
    block: Any, site: Site, subnets: dict[str, nn.Module], factors: Callable[[], list[Factor]]
) -> list[Handle]:
    """Stash subnet outputs; on a data-to-latent call of the block, record its factors."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if len(site.state) == len(subnets):
            dim = args[0][0].shape[1:].numel()
            if not is_rev(args, kwargs):
                site.record(factors(), returned_log_det(output), dim)
            elif site.sampling:
                site.record(inverted(factors()), returned_log_det(output), dim, sampling=True)
        site.state.clear()

    site.add_subnets(*subnets.values())
    handles = [site.stash(net, key) for key, net in subnets.items()]
    return [*handles, site.on_forward(block, hook)]


def _soft_clamp(block: Any, width: int, gin: bool) -> dict[str, Any]:
    """Factor fields of the block's own soft clamp ``clamp * f_clamp(a[:, :width])`` (GIN
    then removes the per-sample mean, which is not elementwise)."""
    if gin:

        def centred(a: Tensor) -> Tensor:
            s = block.clamp * block.f_clamp(a[:, :width])
            return s - s.mean(1, keepdim=True)

        return {"log_abs": centred}
    return {"log_abs": _first(width), "activation": block.f_clamp, "scale": float(block.clamp)}


def _first(width: int) -> Callable[[Tensor], Tensor]:
    return lambda a: a[:, :width]


@framework.layers("GLOWCouplingBlock", "GINCouplingBlock")
def install_two_sided(block: Any, site: Site) -> list[Handle]:
    """GLOW / GIN: subnet2 scales the first half, then subnet1 scales the second."""
    gin = isinstance(block, Fm.GINCouplingBlock)
    l1, l2 = block.split_len1, block.split_len2
    first, second = _soft_clamp(block, l1, gin), _soft_clamp(block, l2, gin)
    raw1, raw2 = _first(l1), _first(l2)

    def factors() -> list[Factor]:
        return [
            Factor(source=site.state["a2"], raw=raw1, **first),
            Factor(source=site.state["a1"], raw=raw2, **second),
        ]

    return _install_stashing(block, site, {"a2": block.subnet2, "a1": block.subnet1}, factors)


@framework.layers("RNVPCouplingBlock")
def install_rnvp(block: Any, site: Site) -> list[Handle]:
    """RNVP: separate scale subnets ``subnet_s2`` (first half) and ``subnet_s1`` (second)."""
    l1, l2 = block.split_len1, block.split_len2
    first, second = _soft_clamp(block, l1, False), _soft_clamp(block, l2, False)
    raw1, raw2 = _first(l1), _first(l2)

    def factors() -> list[Factor]:
        return [
            Factor(source=site.state["s2"], raw=raw1, **first),
            Factor(source=site.state["s1"], raw=raw2, **second),
        ]

    subnets = {"s2": block.subnet_s2, "s1": block.subnet_s1}
    site.add_subnets(block.subnet_t1, block.subnet_t2)
    return _install_stashing(block, site, subnets, factors)


@framework.layers("AffineCouplingOneSided", "ConditionalAffineTransform")
def install_one_sided(block: Any, site: Site) -> list[Handle]:
    """AffineCouplingOneSided (second half scaled) and ConditionalAffineTransform (all)."""
    width = block.channels if isinstance(block, Fm.ConditionalAffineTransform) else block.split_len2
    fields, raw = _soft_clamp(block, width, False), _first(width)

    def factors() -> list[Factor]:
        return [Factor(source=site.state["a"], raw=raw, **fields)]

    return _install_stashing(block, site, {"a": block.subnet}, factors)


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
    raise mismatch(
        "FrEIA",
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


@framework.layers("AllInOneBlock")
def install_all_in_one(block: Any, site: Site) -> list[Handle]:
    """AllInOneBlock: coupling factor on the second half, then the global scale."""
    in_place, over_clamp = _all_in_one_variant(block)
    ch, clamp, dims = block.splits[1], block.clamp, block.sum_dims
    inner = (1.0 if in_place else 0.1) / (clamp if over_clamp else 1.0)  # tanh's argument / a

    def pre(a: Tensor) -> Tensor:  # tanh's argument from the subnet output
        return a[:, :ch] if inner == 1.0 else inner * a[:, :ch]

    def centred(a: Tensor) -> Tensor:  # GIN: s minus its per-sample mean (not elementwise)
        s = clamp * torch.tanh(pre(a))
        return s - s.mean(dim=dims, keepdim=True)

    coupling: dict[str, Any] = (
        {"log_abs": centred}
        if block.GIN
        else {"log_abs": pre, "activation": torch.tanh, "scale": float(clamp)}
    )
    global_fields = _global_log(block)

    def raw(a: Tensor) -> Tensor:  # the subnet's output: in place, ``a`` holds 0.1 times it
        return 10.0 * a[:, :ch] if in_place else a[:, :ch]

    pixels = int(torch.Size(block.dims_in[0][1:]).numel())

    def factors() -> list[Factor]:
        out = [Factor(source=site.state["a"], raw=raw, **coupling)]
        if not block.GIN:
            out.append(Factor(source=block.global_scale, repeat=pixels, **global_fields))
        return out

    return _install_stashing(block, site, {"a": block.subnet}, factors)


@framework.layers("ActNorm")
def install_act_norm(block: Any, site: Site) -> list[Handle]:
    """ActNorm: per-channel factor, shared by every pixel and sample: ``exp(scale)`` in FrEIA
    0.2 (``x * exp(scale) + bias``), ``exp(-log_scale)`` on master (``(x - loc) / scale``, where
    ``scale`` is ``exp(log_scale)``)."""
    is_rev = _rev_reader(block)
    log_scale = getattr(block, "log_scale", None)
    source, sign = (log_scale, -1.0) if isinstance(log_scale, nn.Parameter) else (block.scale, 1.0)
    dims = block.dims_in[0] if isinstance(block.dims_in, list) else block.dims_in  # master: [dims]
    pixels = int(torch.Size(dims[1:]).numel())

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rev = is_rev(args, kwargs)
        if not rev or site.sampling:
            factor = Factor(source=source, repeat=pixels, scale=-sign if rev else sign)
            dim = args[0][0].shape[1:].numel()
            site.record([factor], returned_log_det(output), dim, sampling=rev)

    return [site.on_forward(block, hook)]


@framework.layers("HaarDownsampling", "HaarUpsampling")
def install_uniform(block: Any, site: Site) -> list[Handle]:
    """Layers that are a uniform scale times an orthogonal map (Haar wavelets): the factor
    is ``log_det / D`` on every entry, read from the layer's own log-det."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rev = is_rev(args, kwargs)  # rev=True: the log-det is already the sampling map's
        if not rev or site.sampling:
            x = args[0][0]
            dim = x.shape[1:].numel()
            log_det = torch.as_tensor(output[1], dtype=x.dtype, device=x.device)
            per_entry = (log_det / dim).reshape(-1, 1)
            site.record([Factor(source=per_entry, repeat=dim)], log_det, dim, sampling=rev)

    return [site.on_forward(block, hook)]


@framework.layers("OrthogonalTransform")
def install_orthogonal(block: Any, site: Site) -> list[Handle]:
    """OrthogonalTransform: ``diag(exp(log_e(scaling))) R``; R contributes zero."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        rev = is_rev(args, kwargs)
        if not rev or site.sampling:
            factor = Factor(source=block.scaling, log_abs=block._log_e, scale=-1.0 if rev else 1.0)
            dim = args[0][0].shape[1:].numel()
            site.record([factor], returned_log_det(output), dim, sampling=rev)

    return [site.on_forward(block, hook)]


@framework.entry("InvertibleModule")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A FrEIA model's pass begins at its own call with ``rev=False``; its sampling pass (where
    the door opens them), at a call with ``rev=True``."""
    is_rev = _rev_reader(model)
    return module_entry(model, door, lambda args, kwargs: not is_rev(args, kwargs), is_rev)


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
