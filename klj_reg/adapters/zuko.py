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
layer). A decorated method holds its object strongly only until its first call, then
through a weak reference (:func:`_method`): otherwise each step's transforms, with the
tensors they hold, would sit in reference cycles until Python's cyclic garbage collector
ran, instead of being freed with the pass. (A transform built and never called this way,
e.g. only sampled from, is left to the collector.)
"""

from __future__ import annotations

import importlib
import weakref
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

from ..errors import AdapterMismatchError, CaptureError
from ..kit import Door, Handle, Site, mismatch, on_forward, warn_left_out
from ..records import Factor
from ..registry import Registrar, register_installer


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


def _mismatch(site: Site, what: str) -> AdapterMismatchError:
    return mismatch("zuko", f"{site.label}: {what}")


def _method(obj: Any, name: str) -> Callable[..., Any]:
    """``obj.<name>`` as a function for a wrapper stored on ``obj``: a bound method there
    would be a reference cycle. It holds ``obj`` strongly until its first call (a temporary,
    as in ``layer(c).call_and_ladj(x)``, lives only through it) and weakly from then on."""
    bound = getattr(obj, name)
    func = getattr(bound, "__func__", None)
    if func is None or getattr(bound, "__self__", None) is not obj:
        return bound  # an attribute holding another object's function (zuko's meta)
    held: list[Any] = [obj]

    def call(*args: Any) -> Any:
        target = held[0]
        if isinstance(target, weakref.ref):
            target = target()
        else:
            held[0] = weakref.ref(target)
        return func(target, *args)

    return call


def _tap_meta(transform: Any, method: str, cell: list[Tensor]) -> None:
    """Decorate ``transform.meta`` so that the univariate of each DependentTransform it
    returns keeps, in ``cell``, the elementwise ladj its ``method`` computes."""
    meta = transform.meta

    def tapped_meta(x: Tensor) -> Any:
        inner = meta(x)
        if isinstance(inner, DependentTransform) and inner.base.domain.event_dim == 0:
            _tap(inner.base, method, cell)
        return inner

    transform.meta = tapped_meta


def _tap(univariate: Any, method: str, cell: list[Tensor]) -> None:
    """Decorate an elementwise transform's ``call_and_ladj`` (-> ``(y, ladj)``) or
    ``log_abs_det_jacobian`` (-> ``ladj``) to append its ladj to ``cell``."""
    original = _method(univariate, method)

    def tapped(*args: Tensor) -> Any:
        out = original(*args)
        cell.append(out[1] if method == "call_and_ladj" else out)
        return out

    setattr(univariate, method, tapped)


def _record_tapped(
    site: Site, transform: Any, cell: list[Tensor], negate: bool, sampling: bool = False
) -> None:
    """Decorate ``transform.call_and_ladj`` to record the ladj tapped during the call
    (negated for an inverse), with the layer's own summed ladj (``sampling``: into the
    sampling pass)."""
    original = _method(transform, "call_and_ladj")

    def call_and_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        cell.clear()
        y, ladj = original(x)
        if not cell:
            raise _mismatch(site, "no elementwise log-determinant was computed in call_and_ladj")
        features = x.shape[-1]
        log_abs = cell[-1]
        factor = Factor(source=_rows(log_abs, log_abs.shape[-1]), scale=-1.0 if negate else 1.0)
        if sampling:
            site.record([factor], _flat(ladj), features, sampling=True)
        else:
            site.record([factor], _flat(ladj), features)
        cell.clear()
        return y, ladj

    transform.call_and_ladj = call_and_ladj


def _record_inverse_ladj(
    site: Site,
    transform: Any,
    cell: list[Tensor] | None,
    factors: Callable[[Tensor], Factor],
    checked: bool = True,
) -> None:
    """Decorate ``transform.log_abs_det_jacobian(x, y)``, which the sampling direction (its
    inverse's ``call_and_ladj``) calls at the sample ``x``, to record the sampling map's
    factor into the sampling pass: ``factors`` of the elementwise ladj tapped into ``cell``
    (or of the returned ladj, ``cell`` None), with the inverse's ladj, minus the returned
    one, for the check (``checked``)."""
    original = _method(transform, "log_abs_det_jacobian")

    def log_abs_det_jacobian(x: Tensor, y: Tensor) -> Tensor:
        if cell is not None:
            cell.clear()
        ladj = original(x, y)
        if cell is not None and not cell:
            raise _mismatch(site, "no elementwise log-determinant was computed on sampling")
        elementwise = ladj if cell is None else cell[-1]
        features = x.shape[-1] if x.dim() else 1
        summed = -_flat(ladj) if checked else None
        site.record([factors(elementwise)], summed, features, sampling=True)
        if cell is not None:
            cell.clear()
        return ladj

    transform.log_abs_det_jacobian = log_abs_det_jacobian


def _negated_rows(ladj: Tensor) -> Factor:
    """The factor of an inverse from its forward's elementwise ladj: log e = -log d."""
    return Factor(source=_rows(ladj, ladj.shape[-1] if ladj.dim() else 1), scale=-1.0)


def decorate_sampling(site: Site, transform: Any) -> None:
    """Make the sampling direction of ``transform`` (its inverse's ``call_and_ladj``) record
    ``site``'s factors into the sampling pass."""
    inverse = isinstance(transform, _InverseTransform)
    forward = transform.inv if inverse else transform
    if isinstance(forward, ORTHOGONAL):
        return
    if isinstance(forward, META):
        cell: list[Tensor] = []
        if inverse:  # LazyInverse: sampling runs the forward transform's call_and_ladj
            _tap_meta(forward, "call_and_ladj", cell)
            _record_tapped(site, forward, cell, negate=False, sampling=True)
        else:
            _tap_meta(forward, "log_abs_det_jacobian", cell)
            _record_inverse_ladj(site, forward, cell, _negated_rows)
    elif isinstance(transform, DependentTransform) and transform.base.domain.event_dim == 0:
        # The inverse's univariate calls the forward univariate's log_abs_det_jacobian.
        _record_inverse_ladj(site, transform.base, None, _negated_rows, checked=False)
    elif isinstance(forward, LULinearTransform) and not inverse:
        lower = forward.L

        def lu_factor(_: Tensor) -> Factor:
            diag = torch.diagonal(lower, dim1=-2, dim2=-1)
            return Factor(source=_rows(diag, diag.shape[-1]), log_abs=_neg_log_abs)

        _record_inverse_ladj(site, forward, None, lu_factor)
    elif transform.domain.event_dim == 0 and not inverse:
        _record_inverse_ladj(site, transform, None, _negated_rows, checked=False)


def _record_elementwise(site: Site, transform: Any) -> None:
    """An elementwise transform (``event_dim == 0``): its own ladj is log|d|."""
    original = _method(transform, "call_and_ladj")

    def call_and_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = original(x)
        features = x.shape[-1] if x.dim() else 1
        site.record([Factor(source=_rows(ladj.expand(x.shape), features))], None, features)
        return y, ladj

    transform.call_and_ladj = call_and_ladj


def _record_lu(site: Site, transform: Any, lu: Any, negate: bool) -> None:
    """LULinearTransform ``L U``: the factor ``L`` (``U`` has a unit diagonal); ``transform``
    is the LU transform, or its inverse (``negate``), which holds it."""
    original = _method(transform, "call_and_ladj")
    lower = lu.L  # the tensor, not the transform (which ``transform`` may be: a cycle)

    def log_abs(diag: Tensor) -> Tensor:
        log = diag.abs().log()
        return -log if negate else log

    def call_and_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = original(x)
        features = x.shape[-1]
        diag = torch.diagonal(lower, dim1=-2, dim2=-1)
        site.record([Factor(source=_rows(diag, features), log_abs=log_abs)], _flat(ladj), features)
        return y, ladj

    transform.call_and_ladj = call_and_ladj


def _neg_log_abs(diag: Tensor) -> Tensor:
    return -diag.abs().log()


def _left_out(site: Site, transform: Transform) -> None:
    if site.state.get("warned"):
        return
    site.state["warned"] = True
    warn_left_out([site.label], f"it returns a {type(transform).__name__}")


def decorate(site: Site, transform: Any) -> None:
    """Make ``transform.call_and_ladj`` (the data-to-latent call) record ``site``'s factors."""
    if not isinstance(transform, Transform):
        return  # e.g. a deprecated ``Unconditional`` building a distribution
    inverse = isinstance(transform, _InverseTransform)
    forward = transform.inv if inverse else transform
    if isinstance(forward, ORTHOGONAL):
        return
    if isinstance(forward, META):
        cell: list[Tensor] = []
        _tap_meta(forward, "log_abs_det_jacobian" if inverse else "call_and_ladj", cell)
        _record_tapped(site, transform, cell, negate=inverse)
    elif isinstance(transform, DependentTransform) and transform.base.domain.event_dim == 0:
        cell = []
        _tap(transform.base, "call_and_ladj", cell)
        _record_tapped(site, transform, cell, negate=False)
    elif isinstance(forward, LULinearTransform):
        _record_lu(site, transform, forward, negate=inverse)
    elif transform.domain.event_dim == 0:
        _record_elementwise(site, transform)
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

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        decorate(site, output)
        if site.sampling and isinstance(output, Transform):
            decorate_sampling(site, output)

    return [site.on_forward(module, hook)]


def register_lazy_transform(layer_type: type) -> None:
    """Capture a user-defined LazyTransform whose ``forward(c)`` returns a zuko
    Autoregressive/CouplingTransform, a DependentTransform of a univariate, or an
    elementwise transform."""
    register_installer(layer_type, install_lazy)


def _open(door: Door, output: Any) -> None:
    """Make ``transform.call_and_ladj(x)`` (the whole flow's data-to-latent call) a pass."""
    if not isinstance(output, Transform):
        return
    transform: Any = output
    original = _method(transform, "call_and_ladj")

    def call_and_ladj(x: Tensor) -> tuple[Tensor, Tensor]:
        door.begin(x, x.shape[:-1].numel() if x.dim() else 1, x.shape[-1] if x.dim() else 1)
        try:
            return original(x)
        finally:
            door.end()

    transform.call_and_ladj = call_and_ladj


def _open_sampling(door: Door, dist: Any) -> None:
    """Make ``dist.rsample_and_log_prob`` of a flow's distribution a sampling pass
    (``rsample`` and ``sample`` compute no log-determinant, so there is nothing to read)."""
    for name in ("rsample_and_log_prob",):
        func = getattr(type(dist), name, None)
        if not callable(func):
            continue
        # ``dist`` held strongly until the first call (a temporary, as in
        # ``flow().rsample()``, lives only through it), weakly from then on (no cycle).
        held: list[Any] = [dist]

        def sampled(
            *args: Any, _func: Callable[..., Any] = func, _held: list[Any] = held, **kwargs: Any
        ) -> Any:
            target = _held[0]
            if isinstance(target, weakref.ref):
                target = target()
            else:
                _held[0] = weakref.ref(target)
            door.begin(None, None, None, sampling=True)
            try:
                return _func(target, *args, **kwargs)
            finally:
                door.end()

        setattr(dist, name, sampled)


@framework.entry("Flow", "LazyTransform")
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A Flow's pass is ``flow(c).log_prob(x)``'s ``transform.call_and_ladj(x)``; a
    LazyTransform's, ``t(c).call_and_ladj(x)``. Where the door opens sampling passes, a
    Flow's ``flow(c).rsample_and_log_prob()`` opens one."""

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
