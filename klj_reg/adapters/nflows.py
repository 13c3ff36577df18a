r"""nflows: coupling, autoregressive, spline, normalisation and linear transforms.

nflows maps data to noise with ``Transform.forward``; ``Flow.log_prob`` runs
``flow._transform(x, context=embedding_net(context))`` and containers call their children
through ``Module.__call__``. ``inverse`` (sampling) is called directly, so it fires no forward
hook. ``InverseTransform`` flips the direction: its ``forward`` runs the inner ``inverse``.

A captured layer is read as *pieces*, the nflows transforms it consists of, each with the
direction the data-to-noise pass runs it in (an ``InverseTransform`` flips its contents). Each
piece's Jacobian is triangular up to a fixed permutation; its diagonal :math:`d` comes from
tensors the layer computes anyway:

- ``AffineCouplingTransform``: :math:`d` = the scale of the layer's own ``_scale_and_shift``
  on its ``transform_net`` output (``sigmoid(u + 2) + 1e-3`` in nflows 0.14, the configurable
  ``scale_activation`` on master); ``AdditiveCouplingTransform``: :math:`d = 1`. Identity
  features have :math:`d = 1`, or the ``unconditional_transform``'s (a piece of its own).
- ``MaskedAffineAutoregressiveTransform``: :math:`d = \mathrm{softplus}(u) + \epsilon`, with
  :math:`u` from the layer's ``_unconstrained_scale_and_shift`` on its MADE output.
- Spline couplings: the elementwise :math:`\log|dy/dx|` returned by ``_piecewise_cdf``.
  Autoregressive splines and spline CDFs sum it before returning, so the spline functions are
  wrapped where these layers look them up (``kit.FunctionTap``) while such a layer is attached.
- ``ActNorm`` (per channel, shared by pixels), ``BatchNorm`` (per feature, with the batch
  variance in training as nflows' own log-det), ``PointwiseAffineTransform``.
- ``LULinear`` / ``OneByOneConvolution``: :math:`W = LU`, :math:`L` unit-diagonal, so
  :math:`d = \mathrm{diag}(U)` (per pixel); ``QRLinear``: :math:`\mathrm{diag}(R)`;
  ``SVDLinear``: the singular values.

In the inverse direction a piece's factor is the inverse map's, :math:`1/d` at the inverse's
point: the log is negated, or the spline's own inverse log-derivative is taken. An
autoregressive inverse runs its MADE :math:`D` times; the last call is the exact one and the
one kept. Permutations, ``SqueezeTransform``, ``HouseholderSequence`` and
``IdentityTransform`` contribute zero. ``NaiveLinear`` (dense, not triangular) and the
elementwise nonlinearities (``Tanh``, ``Sigmoid``, ``Logit``, ``LeakyReLU``, ...) are not
captured; attach warns about them.

Sampling passes (``attach(flow, direction="sample")`` or ``"both"``): ``Flow.sample`` and
``sample_and_log_prob`` run ``flow._transform.inverse(noise)``, which calls each layer's
``inverse`` directly. Each captured layer's ``inverse`` is then watched too and records the
pieces as run in the other direction (the same readers, ``inverse`` flipped: a coupling's
``transform_net`` output is the same on both directions, an autoregressive inverse's last
MADE output is on the sample, and the splines' own elementwise log-derivative is the inverse
spline's), checked against the log-det nflows' ``inverse`` returns (the sampling map's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import nflows.flows.base as nflows_flows
import nflows.transforms as T
import nflows.transforms.autoregressive as nflows_autoregressive
import nflows.transforms.coupling as nflows_coupling
import nflows.transforms.splines as nflows_splines
import nflows.utils.torchutils as nflows_torchutils
import torch
from torch import Tensor, nn

from ..errors import AdapterMismatchError
from ..kit import (
    Door,
    FunctionTap,
    Handle,
    Site,
    begin_on_first_tensor,
    direction_sign,
    log_sigmoid_plus_2_eps,
    log_softplus_plus,
    mismatch,
    module_entry,
    warn_left_out,
    watch_method,
)
from ..records import Factor, as_row
from ..registry import Registrar, is_neutral

framework = Registrar("nflows", T, nflows_coupling, nflows_autoregressive, nflows_flows)

Stash = dict[str, Any]
"""What one piece computed during the latest call: ``input``, ``training``, ``net``, ``lad``."""

SPLINE_FUNCTIONS = (
    "linear_spline",
    "unconstrained_linear_spline",
    "quadratic_spline",
    "unconstrained_quadratic_spline",
    "cubic_spline",
    "unconstrained_cubic_spline",
    "rational_quadratic_spline",
    "unconstrained_rational_quadratic_spline",
)
SPLINE_NAMESPACES = (nflows_splines, nflows_autoregressive)
"""Where nflows' layers look the spline functions up (``splines.x`` and module globals)."""

SUBNETS = ("transform_net", "autoregressive_net")
"""Attributes holding a layer's coupling/MADE network (for ``tau``)."""


TAP = FunctionTap(
    "nflows", lambda: [(ns, name) for ns in SPLINE_NAMESPACES for name in SPLINE_FUNCTIONS]
)
"""The spline functions' own log-derivatives (the call inside ``unconstrained_*`` splines
resolves in the spline's own module and is not seen)."""


def _summed(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> tuple[Any, Tensor]:
    """``sum_except_batch(x)``'s call: ``x``, the tensor the layer summed."""
    x = args[0] if args else kwargs["x"]
    return x, x


SUMS = FunctionTap("nflows", lambda: [(nflows_torchutils, "sum_except_batch")], keep=_summed)
"""The tensor a layer sums into its log-det: ``MaskedAffineAutoregressiveTransform``'s own
``log_scale``, a local of its ``_elementwise_forward``, read rather than computed again from
the MADE output (no ``log(softplus(u) + eps)`` in the penalty and its backward)."""

Read = Callable[[Stash], list[Factor]]
"""The factors of one call of a piece, from what it stashed."""

Reader = Callable[[Any, bool], Read]
"""``(layer, inverse) -> read``, called once per piece at attach (outside any traced forward
pass), so that what does not change between calls (maps, probes) is built once."""


@dataclass(frozen=True)
class Kind:
    """How to read one nflows transform class.

    Attributes:
        reader: Builds the piece's ``read(stash) -> factors``.
        net: A subnetwork attribute whose latest output the factors need.
        method: A method returning ``(outputs, elementwise log|dy/dx|)`` to keep.
        spline: Whether the factors need the layer's last spline call.
        sums: Whether the factors read, on forward calls, the tensor the layer summed into its
            log-det (:data:`SUMS`; they fall back to ``net`` without it).
    """

    reader: Reader
    net: str | None = None
    method: str | None = None
    spline: bool = False
    sums: bool = False

    def needs(self) -> tuple[str, ...]:
        """What a call of the piece must have stashed for its factors."""
        return (
            "input",
            *(("net",) if self.net is not None else ()),
            *(("lad",) if self.method is not None or self.spline else ()),
        )


@dataclass(frozen=True)
class Piece:
    """One nflows transform inside a captured layer, run ``inverse`` or not by the pass."""

    layer: Any
    kind: Kind
    inverse: bool
    name: str


def _is_default_scale(layer: Any) -> bool:
    """Whether the layer's own ``_scale_and_shift`` is nflows' default scale of the second
    half, ``sigmoid(u + 2) + 1e-3``, on a range of ``u``."""
    n = layer.num_transform_features
    like = next(layer.parameters(), torch.empty(0))
    probe = torch.linspace(-8.0, 8.0, 2 * n, dtype=like.dtype, device=like.device)
    probe = probe.reshape(1, 2 * n)
    with torch.no_grad():
        own = layer._scale_and_shift(probe)[0]
        default = torch.sigmoid(probe[:, n:] + 2.0) + 1e-3
        return own.shape == default.shape and bool(torch.allclose(own, default))


def _affine_coupling(layer: Any, inverse: bool) -> Read:
    """Scale of the layer's own ``_scale_and_shift`` (when it is nflows' default, probed
    here, the unconstrained half through one shared activation); raw: the unconstrained
    half."""
    n, sign = layer.num_transform_features, direction_sign(inverse)

    def half(p: Tensor) -> Tensor:
        return p[:, n:]

    def scale(p: Tensor) -> Tensor:
        return layer._scale_and_shift(p)[0]

    log_abs, activation = (half, log_sigmoid_plus_2_eps) if _is_default_scale(layer) else (
        scale, torch.log
    )  # fmt: skip

    def read(stash: Stash) -> list[Factor]:
        params = stash["net"]
        raw = half if params.shape[1] > n else None
        return [Factor(source=params, log_abs=log_abs, raw=raw, activation=activation, scale=sign)]

    return read


def _affine_autoregressive(layer: Any, inverse: bool) -> Read:
    """``softplus(u) + eps`` with ``u`` from the layer's ``_unconstrained_scale_and_shift``."""
    sign = direction_sign(inverse)

    def unconstrained(p: Tensor) -> Tensor:
        return layer._unconstrained_scale_and_shift(p)[0]  # a view of the MADE output

    activation = log_softplus_plus(layer._epsilon)  # shared by the layers: one expression

    def read(stash: Stash) -> list[Factor]:
        net, summed = stash["net"], stash.get("summed")
        if summed is not None and summed.shape == (net.shape[0], layer.features):
            # the layer's own log_scale; raw (released-code only) from this call's output
            return [Factor(source=summed, raw=lambda _: unconstrained(net), scale=sign)]
        return [
            Factor(
                source=net,
                log_abs=unconstrained,
                raw=unconstrained,
                activation=activation,
                scale=sign,
            )
        ]

    return read


def _elementwise(layer: Any, inverse: bool) -> Read:
    """The layer's own elementwise log|dy/dx|, already of the direction it ran in."""

    def read(stash: Stash) -> list[Factor]:
        return [Factor(source=stash["lad"])]

    return read


def _per_channel(stash: Stash, channels: int) -> int:
    """How many entries share each per-channel value (pixels for images, else 1)."""
    return stash["input"].shape[1:].numel() // channels


def _act_norm(layer: Any, inverse: bool) -> Read:
    sign = direction_sign(inverse)

    def read(stash: Stash) -> list[Factor]:
        scale = layer.log_scale
        repeat = _per_channel(stash, scale.numel())
        return [Factor(source=scale, log_abs=as_row, repeat=repeat, scale=sign)]

    return read


def _batch_norm(layer: Any, inverse: bool) -> Read:
    """``weight / sqrt(var + eps)``, var the batch's (training) or the running one."""

    def log_abs(var: Tensor) -> Tensor:
        log = torch.log(layer.weight).unsqueeze(0) - 0.5 * torch.log(var + layer.eps)
        return -log if inverse else log

    def batch_log_abs(source: Tensor) -> Tensor:
        return log_abs(source.var(0, keepdim=True))

    def read(stash: Stash) -> list[Factor]:
        if stash["training"]:
            return [Factor(source=stash["input"], log_abs=batch_log_abs)]
        return [Factor(source=layer.running_var.unsqueeze(0), log_abs=log_abs)]

    return read


def _pointwise_affine(layer: Any, inverse: bool) -> Read:
    def log_abs(s: Tensor) -> Tensor:
        return -torch.log(s) if inverse else torch.log(s)

    def read(stash: Stash) -> list[Factor]:
        shape = stash["input"].shape[1:]
        scale = layer._scale
        if scale.numel() == 1:
            return [Factor(source=scale.reshape(1, 1), log_abs=log_abs, repeat=shape.numel())]
        return [Factor(source=scale.expand(shape).unsqueeze(0), log_abs=log_abs)]

    return read


def _linear(diagonal: str, log_diagonal: Callable[[Any], Tensor]) -> Reader:
    """A linear layer with one triangular/diagonal factor besides orthogonal/unit ones."""

    def reader(layer: Any, inverse: bool) -> Read:
        def log_abs(_: Tensor) -> Tensor:
            log = log_diagonal(layer).unsqueeze(0)
            return -log if inverse else log

        def read(stash: Stash) -> list[Factor]:
            source = getattr(layer, diagonal).unsqueeze(0)
            repeat = _per_channel(stash, layer.features)
            return [Factor(source=source, log_abs=log_abs, repeat=repeat)]

        return read

    return reader


def _lu_linear(layer: Any, inverse: bool) -> Read:
    """``LULinear``: :math:`U`'s diagonal ``softplus(u) + eps``, through one activation
    shared by every ``LULinear`` (no operators per layer before it)."""
    activation = log_softplus_plus(layer.eps)
    sign = direction_sign(inverse)

    def read(stash: Stash) -> list[Factor]:
        source = layer.unconstrained_upper_diag
        repeat = _per_channel(stash, layer.features)
        return [
            Factor(source=source, log_abs=as_row, repeat=repeat, activation=activation, scale=sign)
        ]

    return read


def _find(name: str) -> type | None:
    found = framework.classes(name)
    return found[0] if found else None


def _spec() -> dict[str, Kind]:
    """How to read each supported nflows class, by name."""
    spec: dict[str, Kind] = {
        "AffineCouplingTransform": Kind(_affine_coupling, net="transform_net"),
        "PiecewiseCouplingTransform": Kind(_elementwise, method="_piecewise_cdf"),
        "MaskedAffineAutoregressiveTransform": Kind(
            _affine_autoregressive, net="autoregressive_net", sums=True
        ),
        "ActNorm": Kind(_act_norm),
        "BatchNorm": Kind(_batch_norm),
        "PointwiseAffineTransform": Kind(_pointwise_affine),
        "LULinear": Kind(_lu_linear),
        "QRLinear": Kind(_linear("log_upper_diag", lambda layer: layer.log_upper_diag)),
        "SVDLinear": Kind(_linear("unconstrained_diagonal", lambda layer: layer.log_diagonal)),
    }
    for name in (
        "MaskedPiecewiseLinearAutoregressiveTransform",
        "MaskedPiecewiseQuadraticAutoregressiveTransform",
        "MaskedPiecewiseCubicAutoregressiveTransform",
        "MaskedPiecewiseRationalQuadraticAutoregressiveTransform",
        "PiecewiseLinearCDF",
        "PiecewiseQuadraticCDF",
        "PiecewiseCubicCDF",
        "PiecewiseRationalQuadraticCDF",
    ):
        spec[name] = Kind(_elementwise, spline=True)
    return spec


SPEC = _spec()
KINDS = {cls: kind for name, kind in SPEC.items() if (cls := _find(name)) is not None}
CONTAINERS = (T.CompositeTransform, T.MultiscaleCompositeTransform)


def kind_of(cls: type) -> Kind | None:
    """The reading of ``cls`` or its nearest supported base class."""
    for base in cls.__mro__:
        if base in KINDS:
            return KINDS[base]
    return None


def collect(layer: Any, inverse: bool, name: str, pieces: list[Piece], left: list[str]) -> None:
    """The pieces of ``layer`` run ``inverse`` or not; unsupported transforms go to ``left``."""
    if isinstance(layer, T.InverseTransform):
        collect(layer._transform, not inverse, f"{name}._transform", pieces, left)
        return
    kind = kind_of(type(layer))
    if kind is not None:
        pieces.append(Piece(layer, kind, inverse, name))
        extra = getattr(layer, "unconditional_transform", None)
        if isinstance(extra, nn.Module):
            collect(extra, inverse, f"{name}.unconditional_transform", pieces, left)
        return
    if isinstance(layer, CONTAINERS):
        for child_name, child in layer._transforms.named_children():
            collect(child, inverse, f"{name}._transforms.{child_name}", pieces, left)
        return
    if not is_neutral(type(layer)):
        left.append(f"{name} ({type(layer).__name__})")


def _call_input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["inputs"]


def _tap(piece: Piece, key: str, site: Site, direct: bool) -> list[Handle]:
    """Stash what ``piece`` computes, on its calls in the direction the pass runs it (and,
    where the site records sampling passes, in the other one).

    ``direct``: the piece is the captured module itself, run forward, whose own forward hook
    stashes the call's input (so no hook of its own here)."""
    layer, kind = piece.layer, piece.kind

    def stash() -> Stash:
        found: Stash = site.state.setdefault(key, {})
        return found

    def keep_net(module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Tensor) -> None:
        stash()["net"] = output

    def keep_lad(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        stash()["lad"] = out[1]

    def called(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        found = stash()
        found["input"] = _call_input(args, kwargs)
        found["training"] = module.training
        if kind.spline:
            found["lad"] = TAP.latest()

    def called_forward(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        called(module, args, kwargs, out)
        if kind.sums:
            stash()["summed"] = SUMS.latest()

    handles: list[Handle] = []
    site.add_subnets(*(n for a in SUBNETS if isinstance(n := getattr(layer, a, None), nn.Module)))
    if kind.net is not None:
        handles.append(site.on_forward(getattr(layer, kind.net), keep_net))
    if kind.method is not None:
        handles.extend(site.watch_method(layer, kind.method, after=keep_lad))
    if piece.inverse:
        handles.extend(site.watch_method(layer, "inverse", after=called))
    elif not direct:
        handles.append(site.on_forward(layer, called_forward))
    if site.sampling:  # the sampling pass runs the piece the other way
        if piece.inverse:
            handles.append(site.on_forward(layer, called))
        else:
            handles.extend(site.watch_method(layer, "inverse", after=called))
    return handles


def _mismatch(piece: Piece, needs: tuple[str, ...], stash: Stash | None) -> AdapterMismatchError:
    """The error for a call of ``piece`` that did not compute what its factors need."""
    absent = ", ".join(n for n in needs if stash is None or stash.get(n) is None)
    direction = "inverse" if piece.inverse else "forward"
    return mismatch(
        "nflows",
        f"{piece.name} ({type(piece.layer).__name__}) did not compute what klj-reg reads "
        f"({absent}) during its {direction} call",
    )


def install(module: nn.Module, site: Site) -> list[Handle]:
    """Capture every supported piece of ``module``; record them after its forward call."""
    pieces: list[Piece] = []
    left: list[str] = []
    collect(module, False, site.name or "<model>", pieces, left)
    warn_left_out(left)
    if not pieces:
        return []
    spline = any(p.kind.spline for p in pieces)
    # The usual layer is one piece, the module itself, run forward: its forward hook reads the
    # call's input and records. The pre-hook clears what other hooks stashed (a subnetwork's
    # output, which sampling also computes), so that a call never reads another's; a direct
    # piece that stashes nothing elsewhere (ActNorm, BatchNorm, ...) needs none.
    sums = any(p.kind.sums and not p.inverse for p in pieces)
    direct = (
        len(pieces) == 1 and pieces[0].layer is module and not (pieces[0].inverse or spline or sums)
    )
    elsewhere = any(p.kind.net is not None or p.kind.method is not None for p in pieces)
    keys = [str(i) for i in range(len(pieces))]
    reads = [piece.kind.reader(piece.layer, piece.inverse) for piece in pieces]
    needs = [piece.kind.needs() for piece in pieces]
    handles: list[Handle] = [TAP.acquire()] if spline else []
    if sums:
        handles.append(SUMS.acquire())
    for key, piece in zip(keys, pieces, strict=True):
        handles.extend(_tap(piece, key, site, direct))

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        site.state.clear()
        if spline:
            TAP.listen(True)
        if sums:
            SUMS.listen(True)

    def after(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if spline:
            TAP.listen(False)
        if sums:
            SUMS.listen(False)
        state, x = site.state, _call_input(args, kwargs)
        if direct:
            own = state.setdefault(keys[0], {})
            own["input"], own["training"] = x, mod.training
        found = [state.get(key) for key in keys]
        state.clear()
        factors: list[Factor] = []
        for piece, need, read, stash in zip(pieces, needs, reads, found, strict=True):
            if stash is None or any(stash.get(n) is None for n in need):
                raise _mismatch(piece, need, stash)
            factors.extend(read(stash))
        site.record(factors, output[1], x.shape[1:].numel())

    if not direct or elsewhere:
        handles.append(site.on_pre(module, before))
    handles.append(site.on_forward(module, after))
    if site.sampling:
        handles.extend(_install_sampling(module, site, pieces, keys, spline))
    return handles


def _install_sampling(
    module: nn.Module, site: Site, pieces: list[Piece], keys: list[str], spline: bool
) -> list[Handle]:
    """Record the sampling map's factors after ``module.inverse`` (a sampling pass calls it
    directly): each piece read as run in the other direction."""
    reads = [piece.kind.reader(piece.layer, not piece.inverse) for piece in pieces]
    needs = [piece.kind.needs() for piece in pieces]
    flipped = [Piece(p.layer, p.kind, not p.inverse, p.name) for p in pieces]

    def before(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        site.state.clear()
        if spline:
            TAP.listen(True)

    def after(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if spline:
            TAP.listen(False)
        found = [site.state.get(key) for key in keys]
        site.state.clear()
        factors: list[Factor] = []
        for piece, need, read, stash in zip(flipped, needs, reads, found, strict=True):
            if stash is None or any(stash.get(n) is None for n in need):
                raise _mismatch(piece, need, stash)
            factors.extend(read(stash))
        x = _call_input(args, kwargs)
        site.record(factors, output[1], x.shape[1:].numel(), sampling=True)

    return site.watch_method(module, "inverse", before=before, after=after)


@framework.entry("Flow")
def entry(model: Any, door: Door) -> list[Handle]:
    """A ``Flow``'s pass is its ``_transform`` call (``log_prob``); sampling runs the
    transform's ``inverse``, not a call, which opens a sampling pass where the door opens
    them."""
    handles = module_entry(model._transform, door)
    if door.sampling:

        def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            begin_on_first_tensor(door, args, kwargs, sampling=True)

        def end(module: nn.Module) -> None:
            door.end()

        handles.extend(watch_method(model._transform, "inverse", before=begin, final=end))
    return handles


@framework.runner("Flow")
def run_flow(model: Any, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A ``Flow``'s data-to-noise pass: ``(noise, logabsdet)`` of its transform."""
    noise, log_det = model._transform(x, context=model._embedding_net(context))
    return noise, log_det


def run_transform(model: Any, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A ``Transform``'s data-to-noise pass (its ``forward``)."""
    noise, log_det = model(x, context)
    return noise, log_det


framework.flow_base("Transform")
framework.runner("Transform")(run_transform)
framework.layers(*SPEC, "InverseTransform")(install)
framework.neutral(
    "CompositeTransform",
    "MultiscaleCompositeTransform",
    "Permutation",
    "SqueezeTransform",
    "HouseholderSequence",
    "IdentityTransform",
)
