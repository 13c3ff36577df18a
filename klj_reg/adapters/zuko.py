r"""zuko: lazy transforms, whose Transform objects compute the Jacobian later.

A zuko LazyTransform module's ``forward(c)`` builds a Transform object; the flow runs
``z, ladj = transform.call_and_ladj(x)`` later, in ``flow(c).log_prob(x)``. A forward hook on
each captured module decorates the Transform it returns (instance attributes of that
per-call object, nothing global), so that its ``call_and_ladj`` records the layer:

- MaskedAutoregressiveTransform and GeneralCouplingTransform return an Autoregressive /
  CouplingTransform whose ``meta(x)`` runs the hyper-network once and returns
  ``DependentTransform(univariate(*phi), 1)``. The decorated ``meta`` taps the univariate's
  elementwise ``call_and_ladj``: :math:`\log|f'(x_i)|`, the diagonal of the layer's Jacobian,
  which is triangular in the layer's order (any ``passes``; pass-through coupling entries are
  1). This covers every univariate (MonotonicAffine, RQS, Bernstein, SOS, MNN, UMNN, circular
  splines). The layer's own summed ladj is recorded for the first-batch check.
- The inverse direction (``LazyInverse``, IAF-like use) maps data to latent with zuko's
  ``passes`` sequential hyper-network passes, then one more inside
  ``log_abs_det_jacobian(z, x)``; that last one is tapped, and
  :math:`\log|d| = -\log|f'(z_i)|`.
- ElementWiseTransform returns a DependentTransform: its univariate is tapped directly.
- Unconditional transforms: permutations and rotations are neutral; elementwise transforms
  (``event_dim == 0``: learnable MonotonicAffine, fixed Softclip, ...) record their own
  elementwise ladj; LULinearTransform records the diagonal of ``L``; any other type is left
  out with a warning.

Only ``call_and_ladj`` of the returned object records, so sampling (``flow(c).sample()``,
which runs the inverse) records nothing, nor does ``rsample_and_log_prob``, unless the flow is
attached with ``direction="sample"`` (or ``"both"``). Then ``flow(c).rsample_and_log_prob()``
opens a sampling pass (``rsample`` and ``sample`` compute no log-determinant, so they have
nothing to record), and the inverse direction records: zuko computes an inverse's ladj as
minus the forward transform's ``log_abs_det_jacobian(x, y)`` at the sample ``x``, whose
tapped elementwise ladj gives :math:`\log e = -\log d` (a LazyInverse's sampling direction
is its inner transform's ``call_and_ladj``, read as in the data direction of a forward
layer).

The per-call transforms are watched like any method a framework calls directly
(:meth:`klj_reg.kit.Site.watch_method`): their class's method is wrapped while the capture
holds it, and the callbacks sit in the object's own ``__dict__``, holding nothing of it. So an
attached transform behaves like an unattached one however it is called (``fn =
t.call_and_ladj; fn(x); fn(x)``), and is freed with the pass that made it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import zuko.distributions
import zuko.flows
import zuko.transforms
from torch import Tensor, nn
from torch.distributions import Transform
from torch.distributions.transforms import _InverseTransform
from torch.distributions.utils import _sum_rightmost

from ..errors import CaptureError
from ..kit import Door, Handle, Site, on_forward, warn_left_out
from ..records import Factor
from ..registry import Registrar, register_adapter


def _lazy_module() -> ModuleType:
    """``zuko.lazy`` (zuko >= 1.3), or ``zuko.flows.core`` where the lazy classes lived."""
    try:
        return importlib.import_module("zuko.lazy")
    except ImportError:
        return importlib.import_module("zuko.flows.core")


framework = Registrar("zuko", _lazy_module(), zuko.flows, zuko.transforms)
framework.misuse(
    "it is the distribution that a zuko flow builds for one context (flow(c)): pass the "
    "zuko.flows.Flow module itself, klj_reg.penalty(flow, x) (with context=c if the penalty "
    "runs its own pass), not klj_reg.penalty(flow(c), x).",
    zuko.distributions.NormalizingFlow,
)


def _classes(*names: str) -> tuple[Any, ...]:
    """zuko classes by name, skipping those this zuko version does not have."""
    return tuple(framework.classes(*names))


(Flow,) = _classes("Flow")
(LazyTransform,) = _classes("LazyTransform")
(DependentTransform,) = _classes("DependentTransform")
(LULinearTransform,) = _classes("LULinearTransform")
META = _classes("AutoregressiveTransform", "CouplingTransform")
"""Transforms whose ``meta(x)`` returns ``DependentTransform(univariate, 1)``."""

(ComposedTransform,) = _classes("ComposedTransform")
WATCHED = (*META, DependentTransform, LULinearTransform, _InverseTransform)
"""Classes of the transforms the layers return, watched from attach."""

ORTHOGONAL = _classes("PermutationTransform", "RotationTransform", "IdentityTransform")
"""Transforms whose Jacobian is orthogonal: their KLJ term is exactly zero."""

CAPTURED_NAMES = (
    "MaskedAutoregressiveTransform",
    "GeneralCouplingTransform",
    "ElementWiseTransform",
    "UnconditionalTransform",
    "Unconditional",
    "LazyInverse",
)
"""Lazy modules whose per-call Transform is decorated."""


def _rows(t: Tensor, features: int) -> Tensor:
    """``(*, features) -> (N, features)``: zuko's arbitrary batch shape, flattened (a view;
    no operator when already flat)."""
    return t if t.dim() == 2 and t.shape[1] == features else t.reshape(-1, features)


def _flat(t: Tensor) -> Tensor:
    """The layer's log-det, ``(*,) -> (N,)`` (no operator when already flat)."""
    return t if t.dim() == 1 else t.reshape(-1)


Read = Callable[[Tensor, Tensor], Factor]
"""``(elementwise ladj or the call's ladj, x) -> factor``."""


def _ladj(method: str, out: Any) -> Tensor:
    """The ladj a watched method returned: ``call_and_ladj -> (y, ladj)``,
    ``log_abs_det_jacobian -> ladj``."""
    return out[1] if method == "call_and_ladj" else out


def _tap_meta(site: Site, transform: Any, cell: list[Tensor]) -> None:
    """Decorate ``transform.meta`` (an attribute of the per-call transform holding zuko's
    hyper-network function) so that the univariate of each DependentTransform it returns
    appends, to ``cell``, the elementwise ladj it computes."""
    meta, tap = transform.meta, _tapper(site, cell)

    def tapped_meta(x: Tensor) -> Any:
        inner = meta(x)
        if isinstance(inner, DependentTransform) and inner.base.domain.event_dim == 0:
            tap(inner.base)
        return inner

    transform.meta = tapped_meta


def _tapper(site: Site, cell: list[Tensor]) -> Callable[[Any], None]:
    """``tap(univariate)``: append the ladj of each of its ``call_and_ladj`` (``(y, ladj)``)
    and ``log_abs_det_jacobian`` (``ladj``) calls to ``cell``."""

    def pair(obj: Any, args: Any, kwargs: Any, out: Any) -> None:
        cell.append(out[1])

    def ladj(obj: Any, args: Any, kwargs: Any, out: Any) -> None:
        cell.append(out)

    def tap(univariate: Any) -> None:
        site.watch_object(univariate, "call_and_ladj", after=pair)
        site.watch_object(univariate, "log_abs_det_jacobian", after=ladj)

    return tap


def _record(
    site: Site,
    transform: Any,
    method: str,
    read: Read,
    cell: list[Tensor] | None = None,
    check: float | None = 1.0,
    sampling: bool = False,
) -> None:
    """Record ``site`` after each ``transform.<method>(x, ...)``: the factor ``read`` makes of
    the elementwise ladj tapped into ``cell`` (or of the returned ladj, ``cell`` None), with
    ``check`` times the returned ladj for the self-check (``None``: unchecked)."""

    def before(obj: Any, args: Any, kwargs: Any) -> None:
        if cell is not None:
            cell.clear()

    def after(obj: Any, args: tuple[Any, ...], kwargs: Any, out: Any) -> None:
        x, ladj = args[0], _ladj(method, out)
        if cell is not None:
            if not cell:
                raise site.mismatch(
                    f"{site.label}: no elementwise log-determinant was computed in {method}"
                )
            ladj_each = cell[-1]
            cell.clear()
        else:
            ladj_each = ladj
        features = x.shape[-1] if x.dim() else 1
        own = None if check is None else check * _flat(ladj)
        site.record([read(ladj_each, x)], own, features, sampling)

    site.watch_object(transform, method, before=before, after=after)


def _rows_of(ladj: Tensor, x: Tensor) -> Factor:
    """The factor of a layer from its elementwise ladj: log d."""
    return Factor(source=_rows(ladj, ladj.shape[-1] if ladj.dim() else 1))


def _negated_rows(ladj: Tensor, x: Tensor) -> Factor:
    """The factor of an inverse from its forward's elementwise ladj: log e = -log d."""
    return _rows_of(ladj, x)._replace(scale=-1.0)


def _elementwise_rows(ladj: Tensor, x: Tensor) -> Factor:
    """An elementwise transform's own ladj, broadcast to ``x``."""
    features = x.shape[-1] if x.dim() else 1
    return Factor(source=_rows(ladj.expand(x.shape), features))


def _lu(lower: Tensor, negate: bool) -> Read:
    """LULinearTransform ``L U``: the factor ``L`` (``U`` has a unit diagonal)."""

    def read(ladj: Tensor, x: Tensor) -> Factor:
        diag = torch.diagonal(lower, dim1=-2, dim2=-1)
        return Factor(
            source=_rows(diag, diag.shape[-1]), log_abs=_neg_log_abs if negate else _log_abs
        )

    return read


def _log_abs(diag: Tensor) -> Tensor:
    return diag.abs().log()


def _neg_log_abs(diag: Tensor) -> Tensor:
    return -diag.abs().log()


def _left_out(site: Site, transform: Transform) -> None:
    if site.state.get("warned"):
        return
    site.state["warned"] = True
    warn_left_out([site.label], f"it returns a {type(transform).__name__}")


def decorate(site: Site, transform: Any) -> None:
    """Make ``transform.call_and_ladj`` (the data-to-latent call) record ``site``'s factors,
    and, where the site records sampling passes, its inverse's."""
    if not isinstance(transform, Transform):
        return  # e.g. a deprecated ``Unconditional`` building a distribution
    inverse = isinstance(transform, _InverseTransform)
    forward = transform.inv if inverse else transform
    sampling = site.sampling
    if isinstance(forward, ORTHOGONAL):
        return
    if isinstance(forward, META):
        cell: list[Tensor] = []
        _tap_meta(site, forward, cell)
        _record(site, transform, "call_and_ladj", _negated_rows if inverse else _rows_of, cell)
        if sampling and inverse:  # sampling runs the forward transform's call_and_ladj
            _record(site, forward, "call_and_ladj", _rows_of, cell, sampling=True)
        elif sampling:  # zuko's inverse ladj: minus the forward's at the sample
            _record(site, forward, "log_abs_det_jacobian", _negated_rows, cell, -1.0, True)
    elif isinstance(transform, DependentTransform) and transform.base.domain.event_dim == 0:
        cell = []
        _tapper(site, cell)(transform.base)
        _record(site, transform, "call_and_ladj", _rows_of, cell)
        if sampling:  # the inverse's univariate calls the forward's log_abs_det_jacobian
            _record(site, transform.base, "log_abs_det_jacobian", _negated_rows, None, None, True)
    elif isinstance(forward, LULinearTransform):
        _record(site, transform, "call_and_ladj", _lu(forward.L, inverse))
        if sampling and not inverse:
            _record(site, forward, "log_abs_det_jacobian", _lu(forward.L, True), None, -1.0, True)
    elif transform.domain.event_dim == 0:
        _record(site, transform, "call_and_ladj", _elementwise_rows, check=None)
        if sampling and not inverse:
            _record(site, transform, "log_abs_det_jacobian", _negated_rows, None, None, True)
    else:
        _left_out(site, transform)


@framework.layers(*CAPTURED_NAMES)
def install_lazy(module: nn.Module, site: Site) -> list[Handle]:
    """Decorate the Transform each call of ``module`` returns; mark its hyper-network."""
    hyper = getattr(module, "hyper", None)
    if hyper is None and isinstance(getattr(module, "transform", None), nn.Module):
        hyper = getattr(module.transform, "hyper", None)  # LazyInverse
    if isinstance(hyper, nn.Module):
        site.add_subnets(hyper)
    # Wrap the classes its transforms will be now, not inside the first (maybe compiled) call.
    univariates = [
        u
        for m in (module, getattr(module, "transform", None))
        if isinstance(u := getattr(m, "univariate", None), type)
    ]
    for cls in (*WATCHED, *univariates):
        for method in ("call_and_ladj", "log_abs_det_jacobian"):
            site.patches.hold(cls, method)

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        decorate(site, output)

    return [site.on_forward(module, hook)]


def register_lazy_transform(layer_type: type) -> None:
    """Capture a user-defined LazyTransform whose ``forward(c)`` returns a zuko
    Autoregressive/CouplingTransform, a DependentTransform of a univariate, or an
    elementwise transform."""
    register_adapter(layer_type, install=install_lazy, framework="zuko")


def _open(door: Door, output: Any) -> None:
    """Make ``transform.call_and_ladj(x)`` (the whole flow's data-to-latent call) a pass."""
    if isinstance(output, Transform):
        door.watch_object(output, "call_and_ladj", before=_begin(door), final=_end(door))


def _begin(door: Door) -> Callable[..., None]:
    def begin(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        door.begin(x, x.shape[:-1].numel() if x.dim() else 1, x.shape[-1] if x.dim() else 1)

    return begin


def _end(door: Door) -> Callable[[Any], None]:
    def end(obj: Any) -> None:
        door.end()

    return end


def _open_sampling(door: Door, dist: Any) -> None:
    """Make ``dist.rsample_and_log_prob`` of a flow's distribution a sampling pass
    (``rsample`` and ``sample`` compute no log-determinant, so there is nothing to read)."""

    def begin(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        door.begin(None, None, None, sampling=True)

    if callable(getattr(dist, "rsample_and_log_prob", None)):
        door.watch_object(dist, "rsample_and_log_prob", before=begin, final=_end(door))


@framework.entry("Flow", "LazyTransform")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A Flow's pass is ``flow(c).log_prob(x)``'s ``transform.call_and_ladj(x)``; a
    LazyTransform's, ``t(c).call_and_ladj(x)``. Where the door opens sampling passes, a
    Flow's ``flow(c).rsample_and_log_prob()`` opens one."""

    door.patches.hold(ComposedTransform, "call_and_ladj")
    if door.sampling:
        door.patches.hold(zuko.distributions.NormalizingFlow, "rsample_and_log_prob")

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if door.sampling and isinstance(model, Flow):
            _open_sampling(door, output)
        _open(door, output.transform if isinstance(model, Flow) else output)

    return [on_forward(model, hook)]


@framework.runner("Flow")
def run_flow(model: nn.Module, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A Flow's data-to-latent pass, as in ``log_prob``: ``(z, ladj)``."""
    try:
        dist: Any = model(context)  # a conditional flow's transforms need c (zuko's GF: phi)
        z, ladj = dist.transform.call_and_ladj(x)  # or its hyper-networks fail on x alone
    except (RuntimeError, TypeError, AttributeError) as error:
        if context is None and _fits(model, x):
            raise _conditional(model, error) from error
        raise
    return z, _sum_rightmost(ladj, dist.reinterpreted)


def _fits(model: nn.Module, x: Tensor) -> bool:
    """Whether ``x`` has the flow's event shape (its unconditional base's): then a pass that
    fails without a context failed for want of one, not for the shape of ``x``."""
    base: Any = model.base
    try:
        shape = base(None).event_shape
    except Exception:  # a conditional base, or a custom one
        return False
    return len(shape) > 0 and tuple(x.shape[x.dim() - len(shape) :]) == tuple(shape)


def _conditional(model: nn.Module, error: Exception) -> CaptureError:
    return CaptureError(
        f"{type(model).__name__} is conditional (built with context > 0): running it on x "
        f"without a context failed ({str(error).splitlines()[0]}). Pass the context, "
        "klj_reg.penalty(flow, x, context=c), or call the penalty after your own "
        "flow(c).log_prob(x) on the same x, whose pass it reads without running another."
    )


@framework.runner("LazyTransform")
def run_transform(model: nn.Module, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """A LazyTransform's ``t(c).call_and_ladj(x)``, ladj summed over the event: ``(z, ladj)``."""
    z, ladj = model(context).call_and_ladj(x)
    return z, _sum_rightmost(ladj, max(ladj.dim() - x.dim() + 1, 0))


framework.flow_base("LazyTransform")
framework.neutral("Flow", "LazyComposedTransform")
