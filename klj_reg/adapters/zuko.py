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
t.call_and_ladj; fn(x); fn(x)``), and is freed with the pass that made it. The callbacks are
made once per layer (:meth:`klj_reg.kit.Watches.watcher`): a per-call transform gets a binding
they share, so a call allocates nothing for the capture but the tapped ``meta``.
"""

from __future__ import annotations

import functools
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

from .. import hooks
from ..errors import CaptureError
from ..hooks import On
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

BUILD_META = _classes("MaskedAutoregressiveTransform", "GeneralCouplingTransform")
"""Lazy modules whose per-call Transform is one of :data:`META`."""

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


Read = Callable[[Tensor, Tensor, Any], Factor]
"""``(elementwise ladj or the call's ladj, x, the watched transform) -> factor``."""


def _recorder(
    site: Site,
    method: str,
    read: Read,
    cell: list[Tensor] | None = None,
    check: float | None = 1.0,
    sampling: bool = False,
) -> On:
    """Record ``site`` after each ``transform.<method>(x, ...)``: the factor ``read`` makes of
    the elementwise ladj tapped into ``cell`` (or of the returned ladj, ``cell`` None), with
    ``check`` times the returned ladj for the self-check (``None``: unchecked)."""

    def before(obj: Any, args: Any, kwargs: Any) -> None:
        if cell is not None:
            cell.clear()

    pair = method == "call_and_ladj"  # returns (y, ladj); log_abs_det_jacobian: ladj

    def after(obj: Any, args: tuple[Any, ...], kwargs: Any, out: Any) -> None:
        x, ladj = args[0], out[1] if pair else out
        if cell is not None:
            if not cell:
                raise site.mismatch(
                    f"{site.label}: no elementwise log-determinant was computed in {method}"
                )
            ladj_each = cell[-1]
            cell.clear()
        else:
            ladj_each = ladj
        own = None  # the layer's own ladj for the self-check, only while it is checked
        if check is not None and (site.sample_checks_left if sampling else site.checks_left):
            own = _flat(ladj) if check == 1.0 else check * _flat(ladj)
        site.record((read(ladj_each, x, obj),), own, x.shape[-1] if x.dim() else 1, sampling)

    return On(method, before if cell is not None else None, after)


def _rows_of(ladj: Tensor, x: Tensor, obj: Any) -> Factor:
    """The factor of a layer from its elementwise ladj: log d."""
    return Factor(source=_rows(ladj, ladj.shape[-1] if ladj.dim() else 1))


def _negated_rows(ladj: Tensor, x: Tensor, obj: Any) -> Factor:
    """The factor of an inverse from its forward's elementwise ladj: log e = -log d."""
    return _rows_of(ladj, x, obj)._replace(scale=-1.0)


def _elementwise_rows(ladj: Tensor, x: Tensor, obj: Any) -> Factor:
    """An elementwise transform's own ladj, broadcast to ``x``."""
    features = x.shape[-1] if x.dim() else 1
    return Factor(source=_rows(ladj.expand(x.shape), features))


def _lu(negate: bool) -> Read:
    """LULinearTransform ``L U`` (or its inverse): the factor ``L`` (``U`` has a unit
    diagonal)."""

    def read(ladj: Tensor, x: Tensor, obj: Any) -> Factor:
        forward: Any = obj.inv if isinstance(obj, _InverseTransform) else obj
        diag = torch.diagonal(forward.L, dim1=-2, dim2=-1)
        return Factor(
            source=_rows(diag, diag.shape[-1]), log_abs=_neg_log_abs if negate else _log_abs
        )

    return read


def _log_abs(diag: Tensor) -> Tensor:
    return diag.abs().log()


def _neg_log_abs(diag: Tensor) -> Tensor:
    return -diag.abs().log()


def _tapped_meta(meta: Callable[[Tensor], Any], tap: Callable[[Any], None], x: Tensor) -> Any:
    """zuko's ``meta(x)``, whose DependentTransform's univariate gets ``tap``."""
    inner = meta(x)
    if isinstance(inner, DependentTransform) and inner.base.domain.event_dim == 0:
        tap(inner.base)
    return inner


class _Decorator:
    """What one captured lazy module does to each Transform it returns, its callbacks made
    once (:meth:`klj_reg.kit.Watches.watcher`): per call, a watched object gets a shared
    binding, and nothing else is allocated but the tapped ``meta``. A model runs in one thread
    at a time (docs/training-loops.md), so one cell per layer holds the elementwise ladj its
    univariate computes, from the tap to the call's end."""

    __slots__ = ("site", "cell", "made", "tap")

    def __init__(self, site: Site, ladj_only: bool = False) -> None:
        self.site = site
        self.cell: list[Tensor] = []
        self.made: dict[str, Callable[[Any], None]] = {}
        # A univariate whose call_and_ladj is zuko's generic one computes its ladj in
        # log_abs_det_jacobian, either way it is called: that method alone is tapped.
        self.tap = self.watch("tap-ladj" if ladj_only else "tap")

    def watch(self, role: str) -> Callable[[Any], None]:
        """The prepared callbacks of ``role``, made on first use."""
        found = self.made.get(role)
        if found is None:
            found = self.made[role] = self.site.watcher(*self._ons(role))
        return found

    def _ons(self, role: str) -> list[On]:
        site, cell, sampling = self.site, self.cell, self.site.sampling
        if role in ("tap", "tap-ladj"):  # a univariate's elementwise ladj, into the cell

            def pair(obj: Any, args: Any, kwargs: Any, out: Any) -> None:
                cell.append(out[1])

            def ladj(obj: Any, args: Any, kwargs: Any, out: Any) -> None:
                cell.append(out)

            tap_ladj = On("log_abs_det_jacobian", after=ladj)
            return [tap_ladj] if role == "tap-ladj" else [On("call_and_ladj", after=pair), tap_ladj]
        if role == "meta":  # sampling: zuko's inverse ladj, minus the forward's at the sample
            ons = [_recorder(site, "call_and_ladj", _rows_of, cell)]
            if sampling:
                ons.append(_recorder(site, "log_abs_det_jacobian", _negated_rows, cell, -1.0, True))
            return ons
        if role == "meta-inverse":
            return [_recorder(site, "call_and_ladj", _negated_rows, cell)]
        if role == "meta-inverse-sampling":  # sampling runs the forward's call_and_ladj
            return [_recorder(site, "call_and_ladj", _rows_of, cell, sampling=True)]
        if role == "dependent":
            return [_recorder(site, "call_and_ladj", _rows_of, cell)]
        if role == "dependent-base":  # the tap; sampling: the inverse's univariate calls it
            ons = self._ons("tap")
            if sampling:
                ons.append(_recorder(site, "log_abs_det_jacobian", _negated_rows, None, None, True))
            return ons
        if role in ("lu", "lu-inverse"):
            ons = [_recorder(site, "call_and_ladj", _lu(role == "lu-inverse"))]
            if sampling and role == "lu":
                ons.append(_recorder(site, "log_abs_det_jacobian", _lu(True), None, -1.0, True))
            return ons
        # "elementwise" / "elementwise-inverse": the transform's own ladj, unchecked
        ons = [_recorder(site, "call_and_ladj", _elementwise_rows, check=None)]
        if sampling and role == "elementwise":
            ons.append(_recorder(site, "log_abs_det_jacobian", _negated_rows, None, None, True))
        return ons

    def __call__(self, transform: Any) -> None:
        """Make ``transform.call_and_ladj`` (the data-to-latent call) record the site's
        factors, and, where the site records sampling passes, its inverse's."""
        if not isinstance(transform, Transform):
            return  # e.g. a deprecated ``Unconditional`` building a distribution
        inverse = isinstance(transform, _InverseTransform)
        forward = transform.inv if inverse else transform
        if isinstance(forward, ORTHOGONAL):
            return
        if isinstance(forward, META):
            forward.meta = functools.partial(_tapped_meta, forward.meta, self.tap)
            if not inverse:
                self.watch("meta")(transform)
                return
            self.watch("meta-inverse")(transform)
            if self.site.sampling:
                self.watch("meta-inverse-sampling")(forward)
        elif isinstance(transform, DependentTransform) and transform.base.domain.event_dim == 0:
            self.watch("dependent-base")(transform.base)
            self.watch("dependent")(transform)
        elif isinstance(forward, LULinearTransform):
            self.watch("lu-inverse" if inverse else "lu")(transform)
        elif transform.domain.event_dim == 0:
            self.watch("elementwise-inverse" if inverse else "elementwise")(transform)
        else:
            _left_out(self.site, transform)


def _left_out(site: Site, transform: Transform) -> None:
    if site.state.get("warned"):
        return
    site.state["warned"] = True
    warn_left_out([site.label], f"it returns a {type(transform).__name__}")


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
    # (A MAF or coupling layer's transform is one of META, whose meta gives a univariate:
    # only those classes, so that other instances of the rest run unwrapped.)
    builds_meta = isinstance(module, BUILD_META)
    # Its univariate's ladj is tapped through log_abs_det_jacobian alone where its
    # call_and_ladj is zuko's generic one (which calls log_abs_det_jacobian).
    ladj_only = (
        builds_meta
        and bool(univariates)
        and all(hooks.defined_by(u, "call_and_ladj") is Transform for u in univariates)
    )
    for cls in (*(META if builds_meta else WATCHED), *univariates):
        for method in ("call_and_ladj", "log_abs_det_jacobian"):
            if not (ladj_only and cls in univariates and method == "call_and_ladj"):
                site.patches.hold(cls, method)
    decorate = _Decorator(site, ladj_only)

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        decorate(output)

    return [site.on_forward(module, hook)]


def register_lazy_transform(layer_type: type) -> None:
    """Capture a user-defined LazyTransform whose ``forward(c)`` returns a zuko
    Autoregressive/CouplingTransform, a DependentTransform of a univariate, or an
    elementwise transform."""
    register_adapter(layer_type, install=install_lazy, framework="zuko")


@framework.entry("Flow", "LazyTransform")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A Flow's pass is ``flow(c).log_prob(x)``'s ``transform.call_and_ladj(x)``; a
    LazyTransform's, ``t(c).call_and_ladj(x)``. Where the door opens sampling passes, a
    Flow's ``flow(c).rsample_and_log_prob()`` opens one (``rsample`` and ``sample`` compute
    no log-determinant, so there is nothing to read)."""

    def begin(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()))
        door.begin(x, x.shape[:-1].numel() if x.dim() else 1, x.shape[-1] if x.dim() else 1)

    def begin_sampling(obj: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        door.begin(None, None, None, sampling=True)

    def end(obj: Any) -> None:
        door.end()

    door.patches.hold(ComposedTransform, "call_and_ladj")
    opens = door.watcher(On("call_and_ladj", before=begin, final=end))
    flow = isinstance(model, Flow)
    sampling = door.sampling and flow
    if sampling:
        door.patches.hold(zuko.distributions.NormalizingFlow, "rsample_and_log_prob")
    opens_sampling = door.watcher(On("rsample_and_log_prob", before=begin_sampling, final=end))

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if sampling and callable(getattr(output, "rsample_and_log_prob", None)):
            opens_sampling(output)
        transform = output.transform if flow else output
        if isinstance(transform, Transform):
            opens(transform)

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
