r"""FrEIA: coupling blocks, AllInOneBlock, ActNorm and friends.

FrEIA maps data to latent with ``rev=False``. Each block's scale ``s`` (the log of its Jacobian
diagonal) is a local variable, so hooks on the block's subnetworks keep a reference to their
outputs, and the block's own forward hook turns them into factors with the block's own
clamping function, only for ``rev=False`` calls:

- two-sided blocks (GLOW, RNVP, GIN) are two triangular factors, one per half;
- AllInOneBlock is :math:`P \cdot \mathrm{diag}(g) \cdot C`: the coupling factor and the
  global scale :math:`g` are separate factors, the permutation contributes zero.

FrEIA 0.2 (PyPI) scales AllInOneBlock's subnet output in place (``a *= 0.1``) and clamps with
``clamp * tanh(a)``; later versions compute ``a = a * 0.1`` and, on master, ``clamp *
tanh(a / clamp)``. Which one runs is found by probing each block's ``_affine`` once.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import FrEIA.framework as Ff
import FrEIA.modules as Fm
import torch
from torch import Tensor, nn

from ..capture import Site
from ..errors import AdapterMismatchError
from ..records import Factor
from ..registry import (
    Handle,
    framework_version,
    register_flow_base,
    register_installer,
    register_neutral,
    register_runner,
)


def _rev_reader(block: Any) -> Callable[[tuple[Any, ...], dict[str, Any]], bool]:
    """Reads ``rev`` from a call's arguments, wherever this block's signature puts it."""
    names = list(inspect.signature(block.forward).parameters)
    index = names.index("rev") if "rev" in names else None

    def is_rev(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        if "rev" in kwargs:
            return bool(kwargs["rev"])
        return index is not None and len(args) > index and bool(args[index])

    return is_rev


def _log_det(output: Any) -> Tensor | None:
    log_det = output[1]
    return log_det if isinstance(log_det, Tensor) else None


def _stash(site: Site, subnet: nn.Module, key: str) -> Handle:
    def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
        site.state[key] = output

    return site.forward_hook(subnet, hook)


def _install_stashing(
    block: Any, site: Site, subnets: dict[str, nn.Module], factors: Callable[[], list[Factor]]
) -> list[Handle]:
    """Stash subnet outputs; on a data-to-latent call of the block, record its factors."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not is_rev(args, kwargs) and len(site.state) == len(subnets):
            site.record(factors(), _log_det(output), args[0][0].shape[1:].numel())
        site.state.clear()

    site.add_subnets(*subnets.values())
    handles = [_stash(site, net, key) for key, net in subnets.items()]
    return [*handles, site.forward_hook(block, hook, with_kwargs=True)]


def _clamped(block: Any, width: int, gin: bool) -> Callable[[Tensor], Tensor]:
    """The block's own soft clamp of the first ``width`` channels; GIN removes the mean."""

    def log_abs(a: Tensor) -> Tensor:
        s = block.clamp * block.f_clamp(a[:, :width])
        return s - s.mean(1, keepdim=True) if gin else s

    return log_abs


def _first(width: int) -> Callable[[Tensor], Tensor]:
    return lambda a: a[:, :width]


def install_two_sided(block: Any, site: Site) -> list[Handle]:
    """GLOW / GIN: subnet2 scales the first half, then subnet1 scales the second."""
    gin = isinstance(block, Fm.GINCouplingBlock)
    l1, l2 = block.split_len1, block.split_len2

    def factors() -> list[Factor]:
        return [
            Factor(site.state["a2"], _clamped(block, l1, gin), 1, _first(l1)),
            Factor(site.state["a1"], _clamped(block, l2, gin), 1, _first(l2)),
        ]

    return _install_stashing(block, site, {"a2": block.subnet2, "a1": block.subnet1}, factors)


def install_rnvp(block: Any, site: Site) -> list[Handle]:
    """RNVP: separate scale subnets ``subnet_s2`` (first half) and ``subnet_s1`` (second)."""
    l1, l2 = block.split_len1, block.split_len2

    def factors() -> list[Factor]:
        return [
            Factor(site.state["s2"], _clamped(block, l1, False), 1, _first(l1)),
            Factor(site.state["s1"], _clamped(block, l2, False), 1, _first(l2)),
        ]

    subnets = {"s2": block.subnet_s2, "s1": block.subnet_s1}
    site.add_subnets(block.subnet_t1, block.subnet_t2)
    return _install_stashing(block, site, subnets, factors)


def install_one_sided(block: Any, site: Site) -> list[Handle]:
    """AffineCouplingOneSided (second half scaled) and ConditionalAffineTransform (all)."""
    width = block.channels if isinstance(block, Fm.ConditionalAffineTransform) else block.split_len2

    def factors() -> list[Factor]:
        return [Factor(site.state["a"], _clamped(block, width, False), 1, _first(width))]

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
    raise AdapterMismatchError(
        f"AllInOneBlock of {framework_version('FrEIA')} computes its coupling scale in a way "
        "klj-reg does not know (neither clamp*tanh(0.1 a) nor clamp*tanh(0.1 a / clamp)). "
        "Please report it; meanwhile use estimator='hutchinson'."
    )


def install_all_in_one(block: Any, site: Site) -> list[Handle]:
    """AllInOneBlock: coupling factor on the second half, then the global scale."""
    in_place, over_clamp = _all_in_one_variant(block)
    ch, clamp, dims = block.splits[1], block.clamp, block.sum_dims

    def pre(a: Tensor) -> Tensor:  # 0.1 * subnet output, first ``ch`` channels
        return a[:, :ch] if in_place else 0.1 * a[:, :ch]

    def coupling(a: Tensor) -> Tensor:
        s = clamp * torch.tanh(pre(a) / clamp if over_clamp else pre(a))
        return s - s.mean(dim=dims, keepdim=True) if block.GIN else s

    def raw(a: Tensor) -> Tensor:
        return 10.0 * pre(a)

    def global_log(g: Tensor) -> Tensor:
        return torch.log(block.global_scale_activation(g))

    def factors() -> list[Factor]:
        out = [Factor(site.state["a"], coupling, 1, raw)]
        if not block.GIN:
            pixels = int(torch.Size(block.dims_in[0][1:]).numel())
            out.append(Factor(block.global_scale, global_log, pixels))
        return out

    return _install_stashing(block, site, {"a": block.subnet}, factors)


def install_act_norm(block: Any, site: Site) -> list[Handle]:
    """ActNorm: per-channel factor ``exp(scale)``, shared by every pixel and sample."""
    is_rev = _rev_reader(block)
    pixels = int(torch.Size(block.dims_in[1:]).numel())

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not is_rev(args, kwargs):
            factor = Factor(block.scale, None, pixels)
            site.record([factor], _log_det(output), args[0][0].shape[1:].numel())

    return [site.forward_hook(block, hook, with_kwargs=True)]


def install_uniform(block: Any, site: Site) -> list[Handle]:
    """Layers that are a uniform scale times an orthogonal map (Haar wavelets): the factor
    is ``log_det / D`` on every entry, read from the layer's own log-det."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not is_rev(args, kwargs):
            x = args[0][0]
            dim = x.shape[1:].numel()
            log_det = torch.as_tensor(output[1], dtype=x.dtype, device=x.device)
            per_entry = (log_det / dim).reshape(-1, 1)
            site.record([Factor(per_entry, None, dim)], log_det, dim)

    return [site.forward_hook(block, hook, with_kwargs=True)]


def install_orthogonal(block: Any, site: Site) -> list[Handle]:
    """OrthogonalTransform: ``diag(exp(log_e(scaling))) R``; R contributes zero."""
    is_rev = _rev_reader(block)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not is_rev(args, kwargs):
            factor = Factor(block.scaling, block._log_e)
            site.record([factor], _log_det(output), args[0][0].shape[1:].numel())

    return [site.forward_hook(block, hook, with_kwargs=True)]


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


def _classes(*names: str) -> list[type]:
    """FrEIA classes by name, skipping those this FrEIA version does not have."""
    found = [getattr(Fm, n, None) or getattr(Ff, n, None) for n in names]
    return [c for c in found if isinstance(c, type)]


register_flow_base(Fm.InvertibleModule, "FrEIA")
register_runner(Fm.InvertibleModule, run)
for cls in _classes("GLOWCouplingBlock", "GINCouplingBlock"):
    register_installer(cls, install_two_sided)
for cls in _classes("RNVPCouplingBlock"):
    register_installer(cls, install_rnvp)
for cls in _classes("AffineCouplingOneSided", "ConditionalAffineTransform"):
    register_installer(cls, install_one_sided)
for cls in _classes("AllInOneBlock"):
    register_installer(cls, install_all_in_one)
for cls in _classes("ActNorm"):
    register_installer(cls, install_act_norm)
for cls in _classes("HaarDownsampling", "HaarUpsampling"):
    register_installer(cls, install_uniform)
for cls in _classes("OrthogonalTransform"):
    register_installer(cls, install_orthogonal)
register_neutral(
    *_classes(
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
)
