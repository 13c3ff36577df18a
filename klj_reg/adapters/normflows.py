r"""normflows: affine and spline couplings, autoregressive flows, ActNorm, LU mixing.

normflows' ``Flow.forward`` maps latent to data; training (``forward_kld``, ``log_prob``,
``inverse_and_log_det``) calls each layer's ``.inverse`` directly, never through
``Module.__call__``, so module hooks on the layers never fire. Each captured layer's
``inverse`` is watched with :meth:`klj_reg.kit.Site.watch_method` (class patch,
per-instance dispatch) and records the layer from what it returned and what its subnetworks returned
(these are called through ``__call__``, so forward hooks on them stash their outputs). Its
``forward`` is watched only to drop whatever a latent-to-data (sampling) call stashed.

The factors, as the diagonal :math:`d` of the data-to-latent map (the layer's ``.inverse``):

- AffineCoupling (inside AffineCouplingBlock and GlowBlock): ``p = param_map(z1)``, scale
  pre-activation :math:`s` = ``p[:, 1::2]`` (shift ``p[:, 0::2]``). ``scale_map='exp'``:
  :math:`e^{-s}`; ``'sigmoid'`` (GlowBlock's default): :math:`\sigma(s + 2)`, no epsilon;
  ``'sigmoid_inv'``: :math:`1 / \sigma(s + 2)`. One factor on z2.
- MaskedAffineFlow: :math:`e^{-(1 - b) s}`, :math:`s` from the ``s`` net.
- MaskedAffineAutoregressive: :math:`1 / (\sigma(u + 2) + 10^{-3})`. ``.inverse`` runs the
  MADE D times; the last output is the exact one (each call replaces the stash).
- ActNorm, AffineConstFlow: :math:`e^{-s}` shared by the batch (source ``(1, ...)``, repeated
  over the broadcast dimensions); CCAffineConst: the same per sample, :math:`s` from the class.
- Invertible1x1Conv / InvertibleAffine with ``use_lu=True``: the map is
  :math:`W = P L U` per pixel (``z @ W``, i.e. :math:`U^T L^T P^T`, for InvertibleAffine):
  a permutation, a unit-triangular factor (diagonal 1, KLJ term 0) and the triangular factor
  :math:`U`, whose diagonal :math:`\pm e^{\log S}` is recorded, shared and repeated per pixel.
  With ``use_lu=False`` the matrix is free (not triangular in any basis the layer keeps), so
  it is left out with a warning.
- LULinearPermute: permutation, then :math:`L U`; :math:`U`'s diagonal
  ``softplus(u) + eps`` is recorded.
- CoupledRationalQuadraticSpline (and Circular...): the wrapped nflows-style coupling's
  forward is the data-to-latent map. Its ``_piecewise_cdf`` returns the elementwise
  :math:`\log|dy/dx|` of the transformed features (tapped); the unconditional elementwise
  spline on the identity features returns only a sum, so its elementwise derivative is read
  from the spline function's own result (:class:`~klj_reg.kit.FunctionTap`, which wraps
  ``normflows.utils.splines``' functions while a spline layer is captured; where it saw no
  call, evaluated again lazily from the spline's parameters and the input it received).
  Identity features first, the layer is triangular with diagonal [g', h'].
- AutoregressiveRationalQuadraticSpline (and Circular...): the elementwise spline derivative
  of its data-to-latent call, read from the spline function's own result (``kit.FunctionTap``);
  on sampling passes, evaluated lazily from the last MADE pass's parameters (stashed; the
  layer may divide them in place first, which the tensor's version counter tells).
- ``Reverse(layer)`` swaps directions: the affine layers above (not the splines or
  containers) are then recorded from their ``forward`` with the reciprocal diagonal.

Sampling passes (``attach(model, direction="sample")`` or ``"both"``): the layers'
``forward`` (latent to data: ``sample``, ``reverse_kld``, ``forward_and_log_det``) records
the sampling map's factors, :math:`\log e = -\log d` from the same tensors (a coupling's
``param_map`` output is the same on both directions; an autoregressive layer's last MADE output
is the exact one either way); its log-det, which normflows' ``forward`` returns for the
sampling map, is checked against them. Coupled splines read the inverse spline's elementwise
derivative from ``_piecewise_cdf``, and the unconditional spline on their identity features
(called as ``.inverse`` there) from the identity features it returns.

Neutral (KLJ exactly 0): Permute, Split, Merge, Squeeze, PeriodicWrap, PeriodicShift, Shift,
the LU layers' internal permutation, and the containers. ``transforms.Logit`` is left out (with
the core's warning): it is a fixed, parameter-free preprocessing whose term is not zero but
has no gradient.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import normflows as nf
import normflows.flows.mixing as normflows_mixing
import torch
import torch.nn.functional as F
from normflows.flows.base import Flow
from normflows.utils import splines
from torch import Tensor, nn

from ..errors import CaptureError, UnsupportedModelError
from ..kit import (
    Door,
    FunctionTap,
    Handle,
    Site,
    begin_on_first_tensor,
    direction_sign,
    framework_version,
    inverted,
    log_sigmoid_plus_2_eps,
    log_softplus_plus,
    mismatch,
    returned_log_det,
    watch_method,
)
from ..records import Factor, Map, as_row
from ..registry import Registrar, is_neutral

framework = Registrar("normflows", nf, nf.flows, normflows_mixing, nf.transforms)

Build = Callable[[tuple[Any, ...], dict[str, Any], Any], list[Factor]]
"""Builds a layer's factors from its data-to-latent call: ``(args, kwargs, output)``."""

Install = Callable[[Any, Site, bool], list[Handle]]
"""An installer taking ``reverse``: True when the layer's ``forward`` maps data to latent."""


def _dim(z: Any) -> int:
    """Jacobian diagonal length per sample: numel of one input (or of a [z1, z2] pair)."""
    if isinstance(z, (list, tuple)):
        return sum(t.shape[1:].numel() for t in z)
    return z.shape[1:].numel()


def _watch(
    layer: Any,
    site: Site,
    reverse: bool,
    build: Build,
    stashed: int = 0,
    sample_build: Build | None = None,
    before: Callable[..., Any] | None = None,
) -> list[Handle]:
    r"""Record after the layer's data-to-latent method (``before``: called before it); clear
    the stash after the other one, or (where the site records sampling passes) record the
    sampling map's factors from it: ``sample_build``'s, or by default ``build``'s inverted
    (:math:`\log e = -\log d`).

    ``stashed``: how many subnet outputs either call must have stashed.
    """
    to_latent, to_data = ("forward", "inverse") if reverse else ("inverse", "forward")

    def on_latent(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        try:
            if len(site.state) < stashed:
                # A subclass calling super().inverse: the inner call already recorded.
                if not site.recorded():
                    raise CaptureError(
                        f"{site.name or '<model>'} ({site.kind}) ran its data-to-latent "
                        "pass without calling its subnetwork through Module.__call__, so "
                        "klj-reg did not see its scales. Call subnetworks as net(x), not "
                        "net.forward(x), or use estimator='hutchinson'."
                    )
                return
            z = args[0] if args else next(iter(kwargs.values()))
            site.record(build(args, kwargs, out), returned_log_det(out), _dim(z))
        finally:
            site.state.clear()

    def on_data(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        site.state.clear()

    def on_sample(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        try:
            if len(site.state) < stashed:
                if not site.recorded():
                    raise CaptureError(
                        f"{site.name or '<model>'} ({site.kind}) ran its sampling pass "
                        "without calling its subnetwork through Module.__call__, so klj-reg "
                        "did not see its scales. Call subnetworks as net(x), not "
                        "net.forward(x)."
                    )
                return
            z = args[0] if args else next(iter(kwargs.values()))
            factors = (
                inverted(build(args, kwargs, out))
                if sample_build is None
                else sample_build(args, kwargs, out)
            )
            site.record(factors, returned_log_det(out), _dim(z), sampling=True)
        finally:
            site.state.clear()

    return [
        *site.watch_method(layer, to_latent, before=before, after=on_latent),
        *site.watch_method(layer, to_data, after=on_sample if site.sampling else on_data),
    ]


def _once(fn: Map) -> Map:
    """Evaluate a (costly) lazy map once per record: checks and penalty reuse it."""
    result: list[Tensor] = []

    def call(t: Tensor) -> Tensor:
        if not result:
            result.append(fn(t))
        return result[0]

    return call


# Affine couplings -------------------------------------------------------------------------


def _odd(p: Tensor) -> Tensor:
    """AffineCoupling's scale half of its interleaved ``param_map`` output."""
    return p[:, 1::2]


def _log_sigmoid_plus_2(u: Tensor) -> Tensor:
    return F.logsigmoid(u + 2.0)


def _coupling_activation(layer: Any, site: Site) -> tuple[Map | None, float]:
    r"""``(activation, sign)`` of AffineCoupling.inverse's log|d| of ``p[:, 1::2]``, by
    ``scale_map`` (``exp``: :math:`e^{-u}`; ``sigmoid``: :math:`\sigma(u+2)`;
    ``sigmoid_inv``: :math:`1/\sigma(u+2)`)."""
    maps: dict[str, tuple[Map | None, float]] = {
        "exp": (None, -1.0),
        "sigmoid": (_log_sigmoid_plus_2, 1.0),
        "sigmoid_inv": (_log_sigmoid_plus_2, -1.0),
    }
    if layer.scale_map not in maps:
        raise UnsupportedModelError(
            f"{site.name or '<model>'} (AffineCoupling) uses scale_map={layer.scale_map!r}, "
            f"which klj-reg does not know ({framework_version('normflows')}; known: "
            f"{', '.join(maps)}). Use estimator='hutchinson'."
        )
    return maps[layer.scale_map]


def install_affine_coupling(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """AffineCoupling: one factor on z2, from the param_map output of the same call."""
    site.add_subnets(layer.param_map)
    if not layer.scale:
        return []  # additive: diagonal 1
    activation, sign = _coupling_activation(layer, site)
    scale = -sign if reverse else sign

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        params = site.state["params"]
        return [Factor(source=params, log_abs=_odd, raw=_odd, activation=activation, scale=scale)]

    return [site.stash(layer.param_map, "params"), *_watch(layer, site, reverse, build, 1)]


def install_masked_affine(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """MaskedAffineFlow: factor :math:`e^{-(1-b)s}` on the unmasked entries."""
    nets = [n for n in (layer.s, layer.t) if isinstance(n, nn.Module)]
    site.add_subnets(*nets)
    if not isinstance(layer.s, nn.Module):
        return []  # no scale net: volume preserving, diagonal 1
    sign = -direction_sign(reverse)

    def log_abs(s: Tensor) -> Tensor:
        return sign * (1 - layer.b) * s

    def raw(s: Tensor) -> Tensor:  # masked entries count as pass-through ones
        return (1 - layer.b) * s + layer.b

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        return [Factor(source=site.state["s"], log_abs=log_abs, raw=raw)]

    return [site.stash(layer.s, "s"), *_watch(layer, site, reverse, build, 1)]


def install_maf(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """MaskedAffineAutoregressive: :math:`1/(\\sigma(u+2) + 10^{-3})`, last MADE output."""
    site.add_subnets(layer.autoregressive_net)
    sign = -direction_sign(reverse)

    def raw(p: Tensor) -> Tensor:
        return layer._unconstrained_scale_and_shift(p)[0]

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        params = site.state["params"]
        return [
            Factor(
                source=params, log_abs=raw, raw=raw, activation=log_sigmoid_plus_2_eps, scale=sign
            )
        ]

    net = layer.autoregressive_net
    return [site.stash(net, "params"), *_watch(layer, site, reverse, build, 1)]


# Elementwise and linear layers --------------------------------------------------------------


def install_affine_const(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """ActNorm / AffineConstFlow: :math:`e^{-s}`, one per element of ``s``, shared."""
    sign = -direction_sign(reverse)

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        s = layer.s
        repeat = args[0].shape[1:].numel() // s.shape[1:].numel()
        return [Factor(source=s, repeat=repeat, scale=sign)]

    return _watch(layer, site, reverse, build)


def install_cc_affine_const(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """CCAffineConst: :math:`e^{-s(y)}` per sample, ``s(y) = s + y @ s_cc``."""
    sign = -direction_sign(reverse)
    shape = tuple(layer.shape)

    def log_abs(y: Tensor) -> Tensor:
        return sign * (layer.s + (y @ layer.s_cc).view(-1, *shape))

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        y = args[1] if len(args) > 1 else kwargs["y"]
        repeat = args[0].shape[1:].numel() // math.prod(shape)
        return [Factor(source=y, log_abs=log_abs, repeat=repeat)]

    return _watch(layer, site, reverse, build)


def _free_matrix(site: Site) -> list[Handle]:
    warnings.warn(
        f"klj-reg does not regularise {site.name or '<model>'} ({site.kind} with "
        "use_lu=False): a free mixing matrix has no triangular factor the layer keeps. Build "
        "it with use_lu=True (its P L U diagonal is then captured), or use "
        "estimator='hutchinson'.",
        stacklevel=4,
    )
    return []


def install_lu_mixing(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """Invertible1x1Conv / InvertibleAffine (``use_lu``): :math:`U`'s diagonal
    :math:`\\pm e^{\\log S}`, shared, repeated over pixels."""
    if not layer.use_lu:
        return _free_matrix(site)
    sign = direction_sign(reverse)

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        log_s = layer.log_S
        repeat = args[0].shape[1:].numel() // log_s.numel()
        return [Factor(source=log_s, log_abs=as_row, repeat=repeat, scale=sign)]

    return _watch(layer, site, reverse, build)


def install_lu_linear_permute(layer: Any, site: Site, reverse: bool = False) -> list[Handle]:
    """LULinearPermute: permutation, then :math:`L U`, :math:`U`'s diagonal
    ``softplus(u) + eps`` (the layer's own ``upper_diag``)."""
    linear = layer.linear
    sign = direction_sign(reverse)
    activation = log_softplus_plus(linear.eps)  # shared by the layers: one expression

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        source = linear.unconstrained_upper_diag
        return [Factor(source=source, log_abs=as_row, activation=activation, scale=sign)]

    return _watch(layer, site, reverse, build)


# Splines ----------------------------------------------------------------------------------


TAP = FunctionTap(
    "normflows",
    lambda: [
        (splines, "rational_quadratic_spline"),
        (splines, "unconstrained_rational_quadratic_spline"),
    ],
)
"""The spline functions' own log-derivatives: normflows' layers look them up in
``normflows.utils.splines`` at each call, and so does the unconstrained spline's call of the
constrained one."""


def _listen(*args: Any, **kwargs: Any) -> None:
    TAP.listen(True)


def _spline_log_abs(
    owner: Any, x: Tensor, widths: Tensor, heights: Tensor, derivs: Tensor
) -> Tensor:
    """Elementwise log|dy/dx| of the data-to-latent (``inverse=False``) spline, with the
    spline function and settings ``owner`` (the normflows transform) uses."""
    if owner.tails is None:
        fn: Any = splines.rational_quadratic_spline
        kwargs: dict[str, Any] = {}
    else:
        fn = splines.unconstrained_rational_quadratic_spline
        kwargs = {"tails": owner.tails, "tail_bound": owner.tail_bound}
    _, log_abs = fn(
        inputs=x,
        unnormalized_widths=widths,
        unnormalized_heights=heights,
        unnormalized_derivatives=derivs,
        inverse=False,
        min_bin_width=owner.min_bin_width,
        min_bin_height=owner.min_bin_height,
        min_derivative=owner.min_derivative,
        **kwargs,
    )
    return log_abs


def _cdf_log_abs(cdf: Any) -> Map:
    """Elementwise derivative of a PiecewiseRationalQuadraticCDF at its input ``x``."""

    def log_abs(x: Tensor) -> Tensor:
        params = (cdf.unnormalized_widths, cdf.unnormalized_heights, cdf.unnormalized_derivatives)
        w, h, d = (p.unsqueeze(0).expand(x.shape[0], *p.shape) for p in params)
        return _spline_log_abs(cdf, x, w, h, d)

    return _once(log_abs)


def install_coupled_spline(layer: Any, site: Site) -> list[Handle]:
    """Coupled RQ splines: transformed features from ``_piecewise_cdf``, identity features
    from the unconditional spline (evaluated lazily)."""
    coupling = layer.prqct
    cdf = coupling.unconditional_transform
    site.add_subnets(coupling.transform_net)

    def tap(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        site.state["transformed"] = out[1]

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        TAP.listen(False)
        factors = [Factor(source=site.state["transformed"])]
        if "identity" in site.state:  # the unconditional spline's own log-derivative
            factors.append(Factor(source=site.state["identity"]))
        elif "identity input" in site.state:  # not seen (a call outside a listened pass)
            source = site.state["identity input"]
            factors.append(Factor(source=source, log_abs=_cdf_log_abs(cdf)))
        return factors

    def sample_build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        factors = [Factor(source=site.state["transformed"])]  # the inverse spline's own
        if "identity" in site.state:  # the identity features x1 the inverse CDF returned
            source = site.state["identity"]
            factors.append(Factor(source=source, log_abs=_cdf_log_abs(cdf), scale=-1.0))
        return factors

    def identity_out(
        module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
    ) -> None:
        site.state["identity"] = out[0]

    def identity_lad(module: nn.Module, args: tuple[Any, ...], kwargs: Any, out: Any) -> None:
        lad = TAP.latest(args[0])
        if lad is not None and lad.shape == out[0].shape:
            site.state["identity"] = lad
        else:  # evaluated again, lazily, from the call's input
            site.state["identity input"] = args[0]

    handles = site.watch_method(coupling, "_piecewise_cdf", after=tap)
    if cdf is not None:
        handles.append(TAP.acquire())
        handles.append(site.on_forward(cdf, identity_lad))
        if site.sampling:  # the sampling direction calls cdf.inverse directly
            handles.extend(site.watch_method(cdf, "inverse", after=identity_out))
    stashed = 1 if cdf is None else 2
    listen = _listen if cdf is not None else None
    return [*handles, *_watch(layer, site, False, build, stashed, sample_build, listen)]


def install_autoregressive_spline(layer: Any, site: Site) -> list[Handle]:
    """Autoregressive RQ splines: one MADE pass; the spline derivative is evaluated lazily."""
    ar = layer.mprqat
    net = ar.autoregressive_net
    site.add_subnets(net)
    hidden = getattr(net, "hidden_features", None)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: Any, output: Tensor) -> None:
        site.state["params"] = (output, output._version)

    def build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        x = args[0]
        lad = TAP.latest(x)
        TAP.listen(False)
        if lad is None or lad.shape != x.shape:
            raise mismatch(
                "normflows",
                f"{type(layer).__name__} did not compute its elementwise log-derivative "
                "through normflows.utils.splines, where klj-reg reads it",
            )
        return [Factor(source=lad)]  # the layer's own: no second spline evaluation

    def lazy_build(
        args: tuple[Any, ...], kwargs: dict[str, Any], out: Any, x: Tensor | None = None
    ) -> list[Factor]:
        params, version = site.state["params"]
        x = args[0] if x is None else x
        divided = params._version != version  # the layer scaled widths/heights in place

        def log_abs(p: Tensor) -> Tensor:
            q = p.view(x.shape[0], x.shape[1], ar._output_dim_multiplier())
            nb = ar.num_bins
            w, h, d = q[..., :nb], q[..., nb : 2 * nb], q[..., 2 * nb :]
            if hidden is not None and not divided:
                w, h = w / math.sqrt(hidden), h / math.sqrt(hidden)
            return _spline_log_abs(ar, x, w, h, d)

        return [Factor(source=params, log_abs=_once(log_abs))]

    def sample_build(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> list[Factor]:
        # The last MADE pass ran on the sample x (the call's output): log e = -log d(x).
        return inverted(lazy_build(args, kwargs, out, out[0]))

    return [
        TAP.acquire(),
        site.on_forward(net, hook),
        *_watch(layer, site, False, build, 1, sample_build, _listen),
    ]


# Reverse ----------------------------------------------------------------------------------

_REVERSIBLE: dict[type, Install] = {}


def install_reverse(layer: Any, site: Site) -> list[Handle]:
    """Reverse(flow): the inner layer's ``forward`` maps data to latent."""
    inner = layer.flow
    for cls in type(inner).__mro__:
        if cls in _REVERSIBLE:
            return _REVERSIBLE[cls](inner, site, True)
    if is_neutral(type(inner)):
        return []
    warnings.warn(
        f"klj-reg does not regularise {site.name or '<model>'} (Reverse of "
        f"{type(inner).__name__}): reversed direction is supported for the affine layers "
        "only. Use estimator='hutchinson' for this model.",
        stacklevel=3,
    )
    return []


# Entry and runner ---------------------------------------------------------------------------

DATA_TO_LATENT = ("forward_kld", "log_prob", "inverse", "inverse_and_log_det")
"""Model methods that run the data-to-latent pass (each calls its layers' ``inverse``)."""

LATENT_TO_DATA = ("sample", "reverse_kld", "reverse_alpha_div", "forward", "forward_and_log_det")
"""NormalizingFlow methods that run the sampling pass (each calls its layers' ``forward``)."""


@framework.entry("NormalizingFlow", "MultiscaleFlow", "ClassCondFlow", "Flow")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A model's pass is a call of one of its data-to-latent methods (the outermost, as
    they call each other); a single layer's, its ``inverse`` (Reverse's too: it runs the
    inner layer's ``forward``, which records). Where the door opens sampling passes, a
    NormalizingFlow's sampling methods (:data:`LATENT_TO_DATA`) and a single layer's
    ``forward`` open one."""
    if isinstance(model, Flow):
        names: tuple[str, ...] = ("inverse",)
        sampling: tuple[str, ...] = ("forward",)
    else:
        names = DATA_TO_LATENT + (("forward",) if isinstance(model, nf.MultiscaleFlow) else ())
        sampling = LATENT_TO_DATA if isinstance(model, nf.NormalizingFlow) else ()
    depth = [0]

    def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        if depth[0] == 1:
            begin_on_first_tensor(door, args, kwargs)

    def begin_sampling(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # On its latent input where it has one (forward(z)); sample(n, context) and
        # reverse_kld(n, context) draw theirs (a tensor argument is a context, not z).
        depth[0] += 1
        if depth[0] == 1:
            z = args[0] if args and isinstance(args[0], Tensor) else None
            door.begin(
                z,
                None if z is None else z.shape[0],
                None if z is None else z.shape[1:].numel(),
                sampling=True,
            )

    def end(module: nn.Module) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            door.end()

    handles: list[Handle] = []
    for name in names:
        if callable(getattr(model, name, None)):
            handles.extend(watch_method(model, name, before=begin, final=end))
    for name in sampling if door.sampling else ():
        if callable(getattr(model, name, None)):
            handles.extend(watch_method(model, name, before=begin_sampling, final=end))
    return handles


@framework.runner("NormalizingFlow", "MultiscaleFlow", "ClassCondFlow", "Flow")
def run(model: nn.Module, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """normflows' data-to-latent pass: ``(z, log_det)``, through the model's own methods."""
    if isinstance(model, nf.MultiscaleFlow):
        zs, log_det = model.inverse_and_log_det(x)
        return torch.cat([z.reshape(z.shape[0], -1) for z in zs], 1), log_det
    if isinstance(model, nf.ConditionalNormalizingFlow):
        return model.inverse_and_log_det(x, context=context)
    if isinstance(model, nf.NormalizingFlow):
        return model.inverse_and_log_det(x)
    kwargs = {} if context is None else {"context": context}
    if isinstance(model, Flow):
        z, log_det = model.inverse(x, **kwargs)
        return z, torch.as_tensor(log_det, dtype=x.dtype, device=x.device).expand(x.shape[0])
    # ClassCondFlow: a list of flows without inverse_and_log_det
    z, total = x, torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for flow in reversed(model.flows):  # type: ignore[arg-type]
        z, log_det = flow.inverse(z)
        total = total + log_det
    return z, total


def _with_direction(install: Install) -> Callable[[Any, Site], list[Handle]]:
    return lambda layer, site: install(layer, site, False)


_AFFINE: dict[str, Install] = {
    "AffineCoupling": install_affine_coupling,
    "MaskedAffineFlow": install_masked_affine,
    "MaskedAffineAutoregressive": install_maf,
    "AffineConstFlow": install_affine_const,  # and ActNorm
    "CCAffineConst": install_cc_affine_const,
    "Invertible1x1Conv": install_lu_mixing,
    "InvertibleAffine": install_lu_mixing,
    "LULinearPermute": install_lu_linear_permute,
}

framework.flow_base("Flow")
for _name, _install in _AFFINE.items():
    _REVERSIBLE.update(dict.fromkeys(framework.classes(_name), _install))
    framework.layers(_name)(_with_direction(_install))
framework.layers("CoupledRationalQuadraticSpline", "CircularCoupledRationalQuadraticSpline")(
    install_coupled_spline
)
framework.layers(
    "AutoregressiveRationalQuadraticSpline", "CircularAutoregressiveRationalQuadraticSpline"
)(install_autoregressive_spline)
framework.layers("Reverse")(install_reverse)
framework.neutral(
    "Permute",
    "Split",
    "Merge",
    "Squeeze",
    "PeriodicWrap",
    "PeriodicShift",
    "_Permutation",
    "Shift",
    "Composite",
    "AffineCouplingBlock",
    "GlowBlock",
)
