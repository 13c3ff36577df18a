r"""Pyro: ``pyro.distributions.transforms``, used the Pyro way.

A Pyro flow is ``TransformedDistribution(base, [t1, t2, ...])``; its learnable transforms are
``TransformModule``\ s, which the user keeps in an ``nn.ModuleList`` (or a
``ComposeTransformModule``) to train them: that module is the model klj-reg attaches to (a
single transform is one too). A transform's forward call maps the base (latent) to the data;
``log_prob(y)`` runs each transform's inverse ``x = t.inv(y)`` (``Transform._inv_call``,
which Pyro calls directly, never ``Module.__call__``), last transform first, then
``t.log_abs_det_jacobian(x, y)``. That inverse call is the layer's data-to-latent call
(``method="_inv_call"``). Its diagonal is read from the tensor the transform cached there for
its own ``log_abs_det_jacobian``, :math:`\log|\partial y_i/\partial x_i|` of the forward map,
so that :math:`\log|d_i| = -` that (no network runs again):

- ``AffineAutoregressive`` (also ``stable=True``), ``AffineCoupling``: :math:`y_i = x_i
  e^{s_i} + m_i`, :math:`\log|d_i| = -s_i`, the clamped log-scale (``stable``:
  :math:`s_i = \log\sigma(u_i + b)`), ``_cached_log_scale``; the coupling's first
  ``split_dim`` entries are 1 (left out).
- ``Spline``, ``SplineCoupling``, ``SplineAutoregressive`` (linear and quadratic rational
  splines): :math:`\log|d_i| = -\log g_i'(x_i)`, each spline's elementwise derivative,
  ``_cache_log_detJ`` (the coupling's with its first part's elementwise spline).
- ``BatchNorm``: :math:`x = (y - \mu)\,\gamma / \sqrt{\sigma^2 + \epsilon} + \beta`,
  :math:`\log|d_i| = \log\gamma_i - \tfrac12\log(\sigma_i^2 + \epsilon)`, shared by the batch,
  with the statistics Pyro's log-det uses: the batch's variance (over the first axis, as Pyro
  computes it, evaluated in the penalty from the input kept here) in training, the moving one
  in eval.

Each of these Jacobians is triangular in the transform's order, so its diagonal gives its
determinant; the layer's own ``log_abs_det_jacobian`` at the call's ``(x, y)`` (a read of the
same cache, or batch norm's variance) is the log-det the core checks the factors against.
A call that hit Pyro's cache computed nothing: the cached tensor is read if it belongs to that
pair (its batch shape is the call's), else the call records nothing. ``Householder`` is
orthogonal, ``ComposeTransformModule`` a container: neutral (``Permute`` is not a module, so
never seen). Every other ``TransformModule`` (Planar, Radial, Sylvester, Polynomial,
BlockAutoregressive, NeuralAutoregressive, MatrixExponential, GeneralizedChannelPermute) and
the conditional transforms are named at attach as not regularised. The sampling direction
(``t(x)``, Pyro's ``Transform.__call__``) is not read: ``attach(..., direction="sample")``
raises.

A pass is one ``log_prob``: it begins when one of the model's transforms starts its inverse
while none is open, on that call's input (the data), and ends when each of the model's
outermost transforms has run its inverse once.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pyro.distributions.conditional as conditional
import pyro.distributions.torch_transform as torch_transform
import pyro.distributions.transforms as transforms
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kit import Door, Handle, Site
from ..reader import Call, Mismatch
from ..records import Factor
from ..registry import Registrar

framework = Registrar("pyro", transforms, torch_transform, conditional, distribution="pyro-ppl")
TransformModule = torch_transform.TransformModule


def _event(layer: Any) -> int:
    """How many trailing axes make one sample: the transform's event (one for the
    elementwise ones, which act on the flow's vectors)."""
    return max(int(layer.domain.event_dim), 1)


def _dim(layer: Any, call: Call) -> int:
    """D: the numel of one sample's event."""
    y = call.x
    assert y is not None
    return y.shape[-_event(layer) :].numel() if y.dim() else 1


def _rows(t: Tensor, event: int) -> Tensor:
    """``(*batch, *event) -> (N, *event)``: Pyro's arbitrary batch shape (or none) as one
    axis (no operator when it already is one)."""
    return t if t.dim() == event + 1 else t.reshape(-1, *t.shape[t.dim() - event :])


def _cached(layer: Any, call: Call, name: str) -> Tensor | None:
    """The tensor ``name`` the transform cached for its ``log_abs_det_jacobian``, as rows;
    ``None`` when the call hit Pyro's cache for a pair whose tensor was replaced since (a
    direct ``_call`` between), whose batch shape is not the call's."""
    value = getattr(layer, name, None)
    if not isinstance(value, Tensor):
        raise Mismatch(f"its inverse left no tensor in {name}, which its log-det reads")
    y = call.x
    assert y is not None
    event = _event(layer)
    if value.shape[: value.dim() - event] != y.shape[: y.dim() - event]:
        return None
    return _rows(value, event)


def _modules(*nets: Any) -> list[nn.Module]:
    """The networks ``tau`` regularises: those that are modules (a conditioned transform's
    network is a ``partial`` of its conditional one's, whose module holds the weights)."""
    return [net for net in nets if isinstance(net, nn.Module)]


def _own_log_det(layer: Any, call: Call) -> Tensor:
    """The data-to-latent log-det Pyro's ``log_prob`` uses: ``-log_abs_det_jacobian(x, y)``
    (summed over the vector for the elementwise transforms), one per sample."""
    y = call.x
    assert y is not None
    ladj = layer.log_abs_det_jacobian(call.output, y)
    if layer.domain.event_dim == 0:
        ladj = ladj.sum(-1)
    return -ladj.reshape(-1)


@framework.reads(
    "AffineAutoregressive",
    "AffineCoupling",
    method="_inv_call",
    dim=_dim,
    log_det=_own_log_det,
    subnets=lambda layer: _modules(getattr(layer, "arn", None), getattr(layer, "nn", None)),
)
def read_log_scale(layer: Any, call: Call) -> Factor | None:
    r"""Affine autoregressive and coupling: :math:`\log|d_i| = -s_i`."""
    log_scale = _cached(layer, call, "_cached_log_scale")
    return None if log_scale is None else Factor(source=log_scale, scale=-1.0)


def _spline_subnets(layer: Any) -> list[nn.Module]:
    if isinstance(layer, transforms.SplineCoupling):
        return _modules(layer.upper_spline.nn)
    return _modules(getattr(layer, "arn", None))


@framework.reads(
    "Spline",
    "SplineCoupling",
    "SplineAutoregressive",
    method="_inv_call",
    dim=_dim,
    log_det=_own_log_det,
    subnets=_spline_subnets,
)
def read_spline(layer: Any, call: Call) -> Factor | None:
    r"""Rational splines: :math:`\log|d_i| = -\log g_i'(x_i)`."""
    log_derivative = _cached(layer, call, "_cache_log_detJ")
    return None if log_derivative is None else Factor(source=log_derivative, scale=-1.0)


@framework.reads("BatchNorm", method="_inv_call", dim=_dim, log_det=_own_log_det)
def read_batch_norm(layer: Any, call: Call) -> Factor:
    r""":math:`\log|d_i| = \log\gamma_i - \tfrac12\log(\sigma_i^2 + \epsilon)`, with the
    :math:`\gamma` parameter (and moving variance) of this call, not the layer's later."""
    y = call.x
    assert y is not None
    if layer.training:
        return Factor(
            source=_rows(y, 1), log_abs=_batch_log_abs(layer.gamma, layer.epsilon, y.shape)
        )
    var = layer.moving_variance
    return Factor(
        source=(layer.constrained_gamma.log() - 0.5 * torch.log(var + layer.epsilon))[None]
    )


def _batch_log_abs(gamma: Tensor, epsilon: float, shape: torch.Size) -> Callable[[Tensor], Tensor]:
    """Batch norm in training, from its input as rows: the variance over the input's first
    axis (Pyro's), one row ``(1, D)`` for a batch of vectors, else one per sample; with
    Pyro's ``constrained_gamma``, ``relu(gamma) + 1e-6``, of the ``gamma`` the call read."""

    def log_abs(rows: Tensor) -> Tensor:
        y = rows.reshape(shape)
        log_gamma = torch.log(F.relu(gamma) + 1e-6)
        log_d = log_gamma - 0.5 * torch.log(y.var(0, keepdim=True) + epsilon)
        return log_d if y.dim() == 2 else _rows(log_d.expand(shape), 1)

    return log_abs


@framework.layers("Sylvester")
def install_sylvester(layer: Any, site: Site) -> list[Handle]:
    """Sylvester derives from ``Householder``, which is neutral; it is not (it scales its
    input): named as not regularised, like every transform without an adapter."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, frame = 1, sys._getframe(0)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back  # to the user's attach
    warnings.warn(
        f"klj-reg does not regularise these invertible layers (no adapter): {site.label}. "
        "Register them with klj_reg.register_adapter if they scale their input.",
        stacklevel=level,
    )
    return []


def _outermost(model: nn.Module) -> Iterator[nn.Module]:
    """The model's transforms in order, not those inside a transform (a spline coupling's
    own elementwise spline)."""
    if isinstance(model, TransformModule):
        yield model
        return
    for child in model.children():
        yield from _outermost(child)


def entry(model: nn.Module, door: Door) -> list[Handle]:
    """A pass is one ``log_prob``: it begins when one of the outermost transforms starts its
    inverse while none is open and ends when each has run its inverse once (or a call
    raised); a transform that runs again begins the next. It is known by its input where
    that is the model's (a single transform; a ``ComposeTransformModule`` whose last part is
    a module): the data a ``log_prob`` on it was given. A list of transforms does not know
    what the distribution runs before them (a ``Permute`` last in its list is not in the
    model): its pass is opened on no tensor, and ``penalty(model, x)`` checks ``x``'s
    shape."""
    parts = list({id(p): p for p in _outermost(model)}.values())
    whole: Any = model if isinstance(model, TransformModule) else None
    if isinstance(model, torch_transform.ComposeTransformModule) and model.parts:
        whole = model.parts[-1] if isinstance(model.parts[-1], nn.Module) else None
    seen: set[int] = set()

    def begin(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if seen and id(module) not in seen:
            return  # the pass in progress goes on
        seen.clear()
        seen.add(-1)  # open
        y = args[0] if args else next(iter(kwargs.values()))
        dim = y.shape[-_event(module) :].numel() if y.dim() else 1
        door.begin(y if module is whole else None, max(y.numel() // max(dim, 1), 1), dim)

    def end(module: Any) -> None:
        if not seen:
            return
        seen.add(id(module))
        if len(seen) > len(parts) or _raised():
            seen.clear()
            door.end()

    handles: list[Handle] = []
    for part in parts:
        handles += door.watch_method(part, "_inv_call", before=begin, final=end)
    return handles


def _raised() -> bool:
    return sys.exc_info()[0] is not None


framework.entry("TransformModule", "ComposeTransformModule")(entry)
framework.pass_entry(entry)


@framework.runner("TransformModule", "ComposeTransformModule")
def run_transform(model: Any, y: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """The data-to-latent map and its log-det, as ``log_prob`` runs it."""
    x = model.inv(y)
    ladj = model.log_abs_det_jacobian(x, y)
    return x, -(ladj.sum(-1) if model.domain.event_dim == 0 else ladj)


framework.neutral("Householder", "ComposeTransformModule")
framework.flow_base("TransformModule", "ConditionalTransformModule")
