r"""normflows: affine and spline couplings, autoregressive flows, ActNorm, LU mixing.

normflows' ``Flow.forward`` maps latent to data; training (``forward_kld``, ``log_prob``,
``inverse_and_log_det``) calls each layer's ``.inverse`` directly, never through
``Module.__call__``. Each layer's reader (:mod:`klj_reg.reader`) therefore watches
``method="inverse"`` and keeps its subnetworks' outputs (called through ``__call__``) during
that call; ``sample="forward"`` reads the other direction.

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
from typing import Any

import normflows as nf
import normflows.flows.mixing as normflows_mixing
import torch
import torch.nn.functional as F
from normflows.flows.base import Flow
from normflows.utils import splines
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..kit import (
    Door,
    FunctionTap,
    Handle,
    Site,
    begin_on_first_tensor,
    framework_version,
    log_sigmoid_plus_2_eps,
    log_softplus_plus,
    member,
    warn_left_out,
)
from ..reader import Call, Keep, Mismatch, install
from ..records import Factor, Map, as_row
from ..registry import Registrar, adapter_for, is_neutral

framework = Registrar("normflows", nf, nf.flows, normflows_mixing, nf.transforms)


def _dim(layer: Any, call: Call) -> int:
    """Jacobian diagonal length per sample: numel of one input (or of a [z1, z2] pair)."""
    args = call.args
    z = args[0] if args else next(iter(call.kwargs.values()))
    if isinstance(z, Tensor):
        return z.shape[1:].numel()
    size = 0
    for t in z:  # (no generator: this runs for every captured call)
        size += t.shape[1:].numel()
    return size


def reads(*names: str, **fields: Any) -> Any:
    """``framework.reads`` for normflows' layers: ``inverse`` maps data to latent, ``forward``
    (latent to data) is watched for sampling passes."""
    return framework.reads(*names, method="inverse", sample="forward", dim=_dim, **fields)


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


SCALE_MAPS: dict[str, tuple[Map | None, float]] = {
    "exp": (None, -1.0),
    "sigmoid": (_log_sigmoid_plus_2, 1.0),
    "sigmoid_inv": (_log_sigmoid_plus_2, -1.0),
}
r"""``scale_map -> (activation, sign)`` of AffineCoupling.inverse's log|d| of ``p[:, 1::2]``
(``exp``: :math:`e^{-u}`; ``sigmoid``: :math:`\sigma(u+2)`; ``sigmoid_inv``:
:math:`1/\sigma(u+2)`)."""


def _coupling_activation(layer: Any) -> tuple[Map | None, float]:
    if layer.scale_map not in SCALE_MAPS:
        raise UnsupportedModelError(
            f"{type(layer).__name__} uses scale_map={layer.scale_map!r}, which klj-reg does "
            f"not know ({framework_version('normflows')}; known: {', '.join(SCALE_MAPS)}). "
            "Use estimator='hutchinson'."
        )
    return SCALE_MAPS[layer.scale_map]


@reads("AffineCoupling", keep={"params": "param_map"}, prepare=_coupling_activation)
def affine_coupling(layer: Any, call: Call) -> Factor | None:
    """AffineCoupling: one factor on z2, from the param_map output of the same call
    (additive, ``scale=False``: diagonal 1, nothing recorded)."""
    if not layer.scale:
        return None
    activation, sign = call.setup
    params = call.kept["params"]
    return Factor(source=params, log_abs=_odd, raw=_odd, activation=activation, scale=sign)


@reads("MaskedAffineFlow", keep={"s": "s"}, subnets=lambda layer: _modules(layer.s, layer.t))
def masked_affine(layer: Any, call: Call) -> Factor | None:
    """MaskedAffineFlow: factor :math:`e^{-(1-b)s}` on the unmasked entries (no scale net:
    volume preserving, nothing recorded)."""
    s = call.kept.get("s")
    if s is None:
        return None
    b = layer.b
    return Factor(source=s, log_abs=lambda s: -(1 - b) * s, raw=lambda s: (1 - b) * s + b)


def _modules(*objs: Any) -> list[nn.Module]:
    return [o for o in objs if isinstance(o, nn.Module)]


def _maf_raw(layer: Any) -> Map:
    return lambda p: layer._unconstrained_scale_and_shift(p)[0]


@reads("MaskedAffineAutoregressive", keep={"params": "autoregressive_net"}, prepare=_maf_raw)
def maf(layer: Any, call: Call) -> Factor:
    r"""MaskedAffineAutoregressive: :math:`1/(\sigma(u+2) + 10^{-3})`, last MADE output."""
    raw = call.setup
    return Factor(
        source=call.kept["params"],
        log_abs=raw,
        raw=raw,
        activation=log_sigmoid_plus_2_eps,
        scale=-1.0,
    )


# Elementwise and linear layers --------------------------------------------------------------


@reads("AffineConstFlow")
def affine_const(layer: Any, call: Call) -> Factor:
    """ActNorm / AffineConstFlow: :math:`e^{-s}`, one per element of ``s``, shared."""
    s = member(layer, "s")
    repeat = call.args[0].shape[1:].numel() // s.shape[1:].numel()
    return Factor(source=s, repeat=repeat, scale=-1.0)


@reads("CCAffineConst")
def cc_affine_const(layer: Any, call: Call) -> Factor:
    """CCAffineConst: :math:`e^{-s(y)}` per sample, ``s(y) = s + y @ s_cc``."""
    shape = tuple(layer.shape)
    y = call.args[1] if len(call.args) > 1 else call.kwargs["y"]
    repeat = call.args[0].shape[1:].numel() // math.prod(shape)
    s, s_cc = member(layer, "s"), member(layer, "s_cc")  # the parameters this call used
    return Factor(source=y, log_abs=lambda y: -(s + (y @ s_cc).view(-1, *shape)), repeat=repeat)


def _lu_only(layer: Any) -> None:
    if not layer.use_lu:
        warnings.warn(
            f"klj-reg does not regularise {type(layer).__name__} with use_lu=False: a free "
            "mixing matrix has no triangular factor the layer keeps. Build it with "
            "use_lu=True (its P L U diagonal is then captured), or use "
            "estimator='hutchinson'.",
            stacklevel=6,
        )


@reads("Invertible1x1Conv", "InvertibleAffine", prepare=_lu_only)
def lu_mixing(layer: Any, call: Call) -> Factor | None:
    r"""Invertible1x1Conv / InvertibleAffine (``use_lu``): :math:`U`'s diagonal
    :math:`\pm e^{\log S}`, shared, repeated over pixels."""
    if not layer.use_lu:
        return None
    log_s = member(layer, "log_S")
    repeat = call.args[0].shape[1:].numel() // log_s.numel()
    return Factor(source=log_s, log_abs=as_row, repeat=repeat)


@reads("LULinearPermute", prepare=lambda layer: log_softplus_plus(layer.linear.eps))
def lu_linear_permute(layer: Any, call: Call) -> Factor:
    """LULinearPermute: permutation, then :math:`L U`, :math:`U`'s diagonal
    ``softplus(u) + eps`` (the layer's own ``upper_diag``; one activation shared by the
    layers: one expression)."""
    source = layer.linear.unconstrained_upper_diag
    return Factor(source=source, log_abs=as_row, activation=call.setup)


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


def _spline_settings(owner: Any) -> dict[str, Any]:
    """The spline settings ``owner`` (the normflows transform) uses, read during the call that
    records it (``tail_bound`` may be a buffer)."""
    settings = {
        "min_bin_width": owner.min_bin_width,
        "min_bin_height": owner.min_bin_height,
        "min_derivative": owner.min_derivative,
    }
    if owner.tails is not None:
        settings["tails"], settings["tail_bound"] = owner.tails, owner.tail_bound
    return settings


def _spline_log_abs(
    settings: dict[str, Any], x: Tensor, widths: Tensor, heights: Tensor, derivs: Tensor
) -> Tensor:
    """Elementwise log|dy/dx| of the data-to-latent (``inverse=False``) spline, with the
    spline function and :func:`_spline_settings` the normflows transform uses."""
    fn: Any = (
        splines.unconstrained_rational_quadratic_spline
        if "tails" in settings
        else splines.rational_quadratic_spline
    )
    _, log_abs = fn(
        inputs=x,
        unnormalized_widths=widths,
        unnormalized_heights=heights,
        unnormalized_derivatives=derivs,
        inverse=False,
        **settings,
    )
    return log_abs


def _cdf_log_abs(cdf: Any) -> Map:
    """Elementwise derivative of a PiecewiseRationalQuadraticCDF at its input ``x``, from the
    spline parameters and settings read now, during the call (not at penalty time)."""
    params = (cdf.unnormalized_widths, cdf.unnormalized_heights, cdf.unnormalized_derivatives)
    settings = _spline_settings(cdf)

    def log_abs(x: Tensor) -> Tensor:
        w, h, d = (p.unsqueeze(0).expand(x.shape[0], *p.shape) for p in params)
        return _spline_log_abs(settings, x, w, h, d)

    return _once(log_abs)


def _coupled_spline_sample(layer: Any, call: Call) -> list[Factor]:
    """A sampling call: the inverse spline's own elementwise derivative on the transformed
    features; on the identity features x1 the inverse CDF returned, minus the forward CDF's."""
    factors = [Factor(source=call.kept["transformed"][1])]
    out = call.kept.get("identity out")
    if out is not None:
        cdf = layer.prqct.unconditional_transform
        factors.append(Factor(source=out[0], log_abs=_cdf_log_abs(cdf), scale=-1.0))
    return factors


@reads(
    "CoupledRationalQuadraticSpline",
    "CircularCoupledRationalQuadraticSpline",
    keep={
        "transformed": Keep("prqct", method="_piecewise_cdf"),
        "identity input": Keep("prqct.unconditional_transform", inputs=True, optional=True),
        "identity out": Keep("prqct.unconditional_transform", method="inverse", optional=True),
        "identity lad": TAP,
    },
    subnets=lambda layer: [layer.prqct.transform_net],
    read_sample=_coupled_spline_sample,
)
def coupled_spline(layer: Any, call: Call) -> list[Factor]:
    """Coupled RQ splines: the transformed features' elementwise derivative from
    ``_piecewise_cdf``; the identity features' from the unconditional spline's own call
    (tapped; it runs after the coupling's), else evaluated lazily at its input."""
    kept = call.kept
    transformed = kept["transformed"][1]
    factors = [Factor(source=transformed)]
    x1, lad = kept.get("identity input"), kept.get("identity lad")
    if x1 is not None:
        if lad is not None and lad is not transformed and lad.shape == x1.shape:
            factors.append(Factor(source=lad))
        else:
            cdf = layer.prqct.unconditional_transform
            factors.append(Factor(source=x1, log_abs=_cdf_log_abs(cdf)))
    return factors


def _made_params(out: Tensor) -> tuple[Tensor, int]:
    return out, out._version


def _lazy_spline(layer: Any, call: Call, x: Tensor) -> Factor:
    """The spline's elementwise derivative at ``x``, evaluated lazily from the last MADE
    pass's parameters (the layer may divide them in place first: the version counter)."""
    ar = layer.mprqat
    hidden = getattr(ar.autoregressive_net, "hidden_features", None)
    params, version = call.kept["params"]
    divided = params._version != version
    settings = _spline_settings(ar)

    def log_abs(p: Tensor) -> Tensor:
        q = p.view(x.shape[0], x.shape[1], ar._output_dim_multiplier())
        nb = ar.num_bins
        w, h, d = q[..., :nb], q[..., nb : 2 * nb], q[..., 2 * nb :]
        if hidden is not None and not divided:
            w, h = w / math.sqrt(hidden), h / math.sqrt(hidden)
        return _spline_log_abs(settings, x, w, h, d)

    return Factor(source=params, log_abs=_once(log_abs))


def _autoregressive_spline_sample(layer: Any, call: Call) -> Factor:
    """The last MADE pass ran on the sample x (the call's output): log e = -log d(x)."""
    return _lazy_spline(layer, call, call.output[0])._replace(scale=-1.0)


@reads(
    "AutoregressiveRationalQuadraticSpline",
    "CircularAutoregressiveRationalQuadraticSpline",
    keep={
        "params": Keep("mprqat.autoregressive_net", take=_made_params),
        "lad": TAP,
    },
    read_sample=_autoregressive_spline_sample,
)
def autoregressive_spline(layer: Any, call: Call) -> Factor:
    """Autoregressive RQ splines: the elementwise derivative of the spline function's own
    call (tapped: no second evaluation)."""
    lad, x = call.kept["lad"], call.args[0]
    if lad is None or lad.shape != x.shape:
        raise Mismatch(
            f"{type(layer).__name__} did not compute its elementwise log-derivative through "
            "normflows.utils.splines, where klj-reg reads it"
        )
    return Factor(source=lad)


# Reverse ----------------------------------------------------------------------------------


@framework.layers("Reverse")
def install_reverse(layer: Any, site: Site) -> list[Handle]:
    """Reverse(flow): the inner layer's adapter, reversed (its ``forward`` maps data to
    latent); affine layers only (a spline's reversed call computes other tensors)."""
    inner = layer.flow
    found = adapter_for(type(inner))
    adapter = None if found is None else found[1]
    if adapter is not None and adapter.sample and not (adapter.read_sample or adapter.install):
        return install(adapter.reversed(), inner, site)
    if not is_neutral(type(inner)):
        warn_left_out(
            [f"{site.name or '<model>'} (Reverse of {type(inner).__name__})"],
            "reversed direction is supported for the affine layers only",
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
            handles.extend(door.watch_method(model, name, before=begin, final=end))
    for name in sampling if door.sampling else ():
        if callable(getattr(model, name, None)):
            handles.extend(door.watch_method(model, name, before=begin_sampling, final=end))
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


framework.flow_base("Flow")
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
