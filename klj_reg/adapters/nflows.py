r"""nflows: coupling, autoregressive, spline, normalisation and linear transforms.

nflows maps data to noise with ``Transform.forward``; ``Flow.log_prob`` runs
``flow._transform(x, context=embedding_net(context))`` and containers call their children
through ``Module.__call__``. ``inverse`` (sampling) is called directly, so it fires no forward
hook. ``InverseTransform`` flips the direction: its ``forward`` runs the inner ``inverse``.

Each layer's Jacobian is triangular up to a fixed permutation; its diagonal :math:`d` comes
from tensors the layer computes anyway, read by one reader per class
(:mod:`klj_reg.reader`):

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

An ``InverseTransform`` is recorded as one layer made of its contents
(:class:`~klj_reg.reader.Parts`), each read by its own adapter reversed: a factor of the
inverse map is :math:`1/d` at the inverse's point (the log negated), or the spline's own
inverse log-derivative. An autoregressive inverse runs its MADE :math:`D` times; the last
call is the exact one and the one kept. Permutations, ``SqueezeTransform``,
``HouseholderSequence`` and ``IdentityTransform`` contribute zero. ``NaiveLinear`` (dense,
not triangular) and the elementwise nonlinearities (``Tanh``, ``Sigmoid``, ``Logit``,
``LeakyReLU``, ...) are not captured; attach warns about them.

Sampling passes (``attach(flow, direction="sample")`` or ``"both"``): ``Flow.sample`` and
``sample_and_log_prob`` run ``flow._transform.inverse(noise)``, which calls each layer's
``inverse`` directly. Each captured layer's ``inverse`` is then watched too
(``sample="inverse"``) and records the layer as run in the other direction (a coupling's
``transform_net`` output is the same on both directions, an autoregressive inverse's last
MADE output is on the sample, and the splines' own elementwise log-derivative is the inverse
spline's), checked against the log-det nflows' ``inverse`` returns (the sampling map's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import nflows.flows.base as nflows_flows
import nflows.transforms as T
import nflows.transforms.autoregressive as nflows_autoregressive
import nflows.transforms.coupling as nflows_coupling
import nflows.transforms.splines as nflows_splines
import nflows.utils.torchutils as nflows_torchutils
import torch
from torch import Tensor, nn

from ..errors import UnsupportedModelError
from ..kit import (
    Door,
    FunctionTap,
    Handle,
    Site,
    begin_on_first_tensor,
    inverted,
    log_sigmoid_plus_2_eps,
    log_softplus_plus,
    member,
    module_entry,
    warn_left_out,
)
from ..reader import Adapter, Call, Keep, Mismatch, Parts
from ..records import Factor, as_row
from ..registry import Registrar, adapter_for, is_neutral

framework = Registrar("nflows", T, nflows_coupling, nflows_autoregressive, nflows_flows)

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


def reads(*names: str, **fields: Any) -> Callable[[Any], Any]:
    """``framework.reads`` for nflows' transforms: ``forward`` (``Module.__call__``) maps data
    to noise; ``inverse``, called directly, is watched for sampling passes."""
    return framework.reads(*names, sample="inverse", **fields)


def _per_channel(call: Call, channels: int) -> int:
    """How many entries share each per-channel value (pixels for images, else 1)."""
    return int(call.args[0].shape[1:].numel()) // channels


def _tapped_on_input(x: Tensor) -> tuple[Tensor, Tensor | None]:
    """What the spline tap kept on a call on ``x`` (the unconditional spline's), with ``x``."""
    return x, TAP.latest(x)


def _identity(layer: Any) -> dict[str, Any]:
    """Keeps for an ``unconditional_transform`` on the identity features: a spline CDF, whose
    elementwise log-derivative (of the direction it ran) the tap sees."""
    extra = getattr(layer, "unconditional_transform", None)
    if extra is None:
        return {}
    return {
        "spline": TAP,
        "identity": Keep(
            "unconditional_transform", inputs=True, optional=True, take=_tapped_on_input
        ),
        "identity inverse": Keep(
            "unconditional_transform",
            method="inverse",
            inputs=True,
            optional=True,
            take=_tapped_on_input,
        ),
    }


def _with_identity(factors: list[Factor], call: Call) -> list[Factor]:
    """Append the unconditional spline's factor (already of the direction that ran)."""
    found = call.kept.get("identity inverse" if call.sampling else "identity")
    if found is None:
        return factors
    x1, lad = found
    if lad is None or lad.shape != x1.shape:
        raise Mismatch(
            "its unconditional_transform did not compute an elementwise log-derivative "
            "through nflows' spline functions"
        )
    return [*factors, Factor(source=lad)]


def _unconditional_supported(layer: Any) -> None:
    extra = getattr(layer, "unconditional_transform", None)
    cdfs = tuple(framework.classes(*CDFS))
    if extra is not None and not isinstance(extra, cdfs):
        raise UnsupportedModelError(
            f"{type(layer).__name__}'s unconditional_transform is a {type(extra).__name__}; "
            "klj-reg reads spline CDFs there only. Use estimator='hutchinson'."
        )


# Couplings --------------------------------------------------------------------------------


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


def _affine_coupling_setup(layer: Any) -> dict[str, Any]:
    """The factor's fields: the unconstrained half through one shared activation when the
    layer's ``_scale_and_shift`` is nflows' default (probed here), else its own scale."""
    _unconditional_supported(layer)
    n = layer.num_transform_features

    def half(p: Tensor) -> Tensor:
        return p[:, n:]

    if _is_default_scale(layer):
        return {"log_abs": half, "activation": log_sigmoid_plus_2_eps, "half": half}
    return {
        "log_abs": lambda p: layer._scale_and_shift(p)[0],
        "activation": torch.log,
        "half": half,
    }


def affine_coupling(layer: Any, call: Call) -> list[Factor]:
    """Scale of the layer's own ``_scale_and_shift``; raw: the unconstrained half."""
    fields = dict(call.setup)
    half = fields.pop("half")
    params = call.kept["net"]
    raw = half if params.shape[1] > layer.num_transform_features else None
    factor = Factor(source=params, raw=raw, **fields)
    return _with_identity([factor] if not call.sampling else inverted([factor]), call)


framework.adapter(
    "AffineCouplingTransform",
    read=affine_coupling,
    read_sample=affine_coupling,
    sample="inverse",
    keep=lambda layer: {"net": "transform_net", **_identity(layer)},
    prepare=_affine_coupling_setup,
)


def piecewise_coupling(layer: Any, call: Call) -> list[Factor]:
    """Spline couplings: the elementwise log|dy/dx| ``_piecewise_cdf`` returns, of the
    direction that ran."""
    return _with_identity([Factor(source=call.kept["lad"])], call)


framework.adapter(
    "PiecewiseCouplingTransform",
    read=piecewise_coupling,
    read_sample=piecewise_coupling,
    sample="inverse",
    keep=lambda layer: {
        "lad": Keep(method="_piecewise_cdf", take=_second),
        **_identity(layer),
    },
    subnets=lambda layer: [layer.transform_net],
    prepare=_unconditional_supported,
)


def _second(out: Any) -> Any:
    return out[1]


# Autoregressive ---------------------------------------------------------------------------


def _unconstrained(layer: Any) -> Callable[[Tensor], Tensor]:
    return lambda p: layer._unconstrained_scale_and_shift(p)[0]  # a view of the MADE output


@reads(
    "MaskedAffineAutoregressiveTransform",
    keep={"net": "autoregressive_net", "summed": SUMS},
    prepare=_unconstrained,
)
def affine_autoregressive(layer: Any, call: Call) -> Factor:
    """``softplus(u) + eps`` with ``u`` from the layer's ``_unconstrained_scale_and_shift``:
    the layer's own ``log_scale`` where the tap saw it summed on a forward call, else (and
    on sampling calls, whose last MADE output is on the sample) from the MADE output."""
    net, summed, unconstrained = call.kept["net"], call.kept["summed"], call.setup
    if not call.sampling and summed is not None and summed.shape == (net.shape[0], layer.features):
        return Factor(source=summed, raw=lambda _: unconstrained(net))
    activation = log_softplus_plus(layer._epsilon)  # shared by the layers: one expression
    return Factor(source=net, log_abs=unconstrained, raw=unconstrained, activation=activation)


SPLINES = (
    "MaskedPiecewiseLinearAutoregressiveTransform",
    "MaskedPiecewiseQuadraticAutoregressiveTransform",
    "MaskedPiecewiseCubicAutoregressiveTransform",
    "MaskedPiecewiseRationalQuadraticAutoregressiveTransform",
)
CDFS = (
    "PiecewiseLinearCDF",
    "PiecewiseQuadraticCDF",
    "PiecewiseCubicCDF",
    "PiecewiseRationalQuadraticCDF",
)


def elementwise(layer: Any, call: Call) -> Factor:
    """The spline function's own elementwise log|dy/dx|, of the direction that ran."""
    lad = call.kept["lad"]
    if lad is None:
        raise Mismatch("no nflows spline function computed its log-derivative in the call")
    return Factor(source=lad)


framework.adapter(
    *SPLINES,
    *CDFS,
    read=elementwise,
    read_sample=elementwise,
    sample="inverse",
    keep={"lad": TAP},
    subnets=lambda layer: _modules(getattr(layer, "autoregressive_net", None)),
)


def _modules(*objs: Any) -> list[nn.Module]:
    return [o for o in objs if isinstance(o, nn.Module)]


# Normalisation and linear layers ----------------------------------------------------------


@reads("ActNorm")
def act_norm(layer: Any, call: Call) -> Factor:
    """Per channel, shared by pixels and samples."""
    scale = layer.log_scale
    return Factor(source=scale, log_abs=as_row, repeat=_per_channel(call, scale.numel()))


def _batch_log_abs(unconstrained: Tensor, eps: float) -> Callable[[Tensor], Tensor]:
    """``log(weight) - log(var + eps) / 2`` of a variance ``(1, D)``, with nflows' ``weight``
    (``softplus(unconstrained_weight) + eps``) of the parameter the call read."""
    log_weight = log_softplus_plus(eps)

    def log_abs(var: Tensor) -> Tensor:
        return log_weight(unconstrained).unsqueeze(0) - 0.5 * torch.log(var + eps)

    return log_abs


@reads("BatchNorm")
def batch_norm(layer: Any, call: Call) -> Factor:
    """``weight / sqrt(var + eps)``, var the batch's (training) or the running one; the
    weight's parameter is the one the call read (not the layer's at penalty time)."""
    log_abs = _batch_log_abs(member(layer, "unconstrained_weight"), layer.eps)
    if layer.training:
        return Factor(source=call.args[0], log_abs=lambda x: log_abs(x.var(0, keepdim=True)))
    return Factor(source=member(layer, "running_var").unsqueeze(0), log_abs=log_abs)


@reads("PointwiseAffineTransform")
def pointwise_affine(layer: Any, call: Call) -> Factor:
    shape, scale = call.args[0].shape[1:], member(layer, "_scale")
    if scale.numel() == 1:
        return Factor(source=scale.reshape(1, 1), log_abs=torch.log, repeat=shape.numel())
    return Factor(source=scale.expand(shape).unsqueeze(0), log_abs=torch.log)


@reads("LULinear")
def lu_linear(layer: Any, call: Call) -> Factor:
    """``LULinear``: :math:`U`'s diagonal ``softplus(u) + eps``, through one activation
    shared by every ``LULinear`` (no operators per layer before it)."""
    return Factor(
        source=member(layer, "unconstrained_upper_diag"),
        log_abs=as_row,
        repeat=_per_channel(call, layer.features),
        activation=log_softplus_plus(layer.eps),
    )


@reads("QRLinear")
def qr_linear(layer: Any, call: Call) -> Factor:
    r"""``QRLinear``: :math:`\mathrm{diag}(R)`."""
    source = member(layer, "log_upper_diag").unsqueeze(0)
    return Factor(source=source, repeat=_per_channel(call, layer.features))


@reads("SVDLinear")
def svd_linear(layer: Any, call: Call) -> Factor:
    """``SVDLinear``: the singular values ``softplus(u) + eps`` (the layer's own
    ``diagonal``), through the activation shared with ``LULinear``."""
    return Factor(
        source=member(layer, "unconstrained_diagonal"),
        log_abs=as_row,
        repeat=_per_channel(call, layer.features),
        activation=log_softplus_plus(layer.eps),
    )


# InverseTransform -------------------------------------------------------------------------

CONTAINERS = (T.CompositeTransform, T.MultiscaleCompositeTransform)


def _pieces(
    layer: Any, flipped: bool, name: str, found: list[tuple[str, Any, Adapter]], left: list[str]
) -> None:
    """The transforms inside an ``InverseTransform``, each with its adapter, reversed when the
    data-to-noise pass runs it backwards."""
    if isinstance(layer, T.InverseTransform):
        _pieces(layer._transform, not flipped, f"{name}._transform", found, left)
        return
    match = adapter_for(type(layer))
    if match is not None and match[1].install is None:
        adapter = match[1]
        found.append((name, layer, adapter.reversed() if flipped else adapter))
    elif isinstance(layer, CONTAINERS):
        for child_name, child in layer._transforms.named_children():
            _pieces(child, flipped, f"{name}._transforms.{child_name}", found, left)
    elif not is_neutral(type(layer)):
        left.append(f"{name} ({type(layer).__name__})")


@framework.layers("InverseTransform")
def install_inverse(layer: Any, site: Site) -> list[Handle]:
    """One record of the transforms inside, each read the other way round."""
    found: list[tuple[str, Any, Adapter]] = []
    left: list[str] = []
    _pieces(layer._transform, True, f"{site.name or '<model>'}._transform", found, left)
    warn_left_out(left)
    if not found:
        return []
    parts = Parts(site)
    handles = [h for name, piece, adapter in found for h in parts.install(adapter, piece, name)]
    return [*handles, *parts.watch(layer, "__call__", sample="inverse")]


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

        handles.extend(door.watch_method(model._transform, "inverse", before=begin, final=end))
    return handles


@framework.runner("Flow")
def run_flow(model: Any, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A ``Flow``'s data-to-noise pass: ``(noise, logabsdet)`` of its transform."""
    noise, log_det = model._transform(x, context=model._embedding_net(context))
    return noise, log_det


@framework.runner("Transform")
def run_transform(model: Any, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A ``Transform``'s data-to-noise pass (its ``forward``)."""
    noise, log_det = model(x, context)
    return noise, log_det


framework.flow_base("Transform")
framework.neutral(
    "CompositeTransform",
    "MultiscaleCompositeTransform",
    "Permutation",
    "SqueezeTransform",
    "HouseholderSequence",
    "IdentityTransform",
)
