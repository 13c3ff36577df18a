"""Which layer types klj-reg can read, and how to run a model's data-to-latent pass.

Adapters for the four frameworks live in :mod:`klj_reg.adapters` and are imported lazily,
the first time a model containing one of their classes is attached, so that
``import klj_reg`` needs none of them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

from .records import Factor

if TYPE_CHECKING:
    from .capture import Site


class Handle(Protocol):
    """Anything with ``remove()``, e.g. ``torch.utils.hooks.RemovableHandle``."""

    def remove(self) -> None: ...


Installer = Callable[[nn.Module, "Site"], Iterable[Handle]]
"""Installs a layer's capture: hooks that call ``site.record(...)`` on data-to-latent calls."""

Runner = Callable[[nn.Module, Tensor, Any], tuple[Tensor, Tensor]]
"""Runs a model's data-to-latent pass: ``(model, x, context) -> (z, log_det)``."""

FRAMEWORKS = {
    "FrEIA": "klj_reg.adapters.freia",
    "nflows": "klj_reg.adapters.nflows",
    "normflows": "klj_reg.adapters.normflows",
    "zuko": "klj_reg.adapters.zuko",
}
DISTRIBUTIONS = {"FrEIA": "FrEIA", "nflows": "nflows", "normflows": "normflows", "zuko": "zuko"}

_installers: dict[type, Installer] = {}
_runners: dict[type, Runner] = {}
_neutral: set[type] = set()
_flow_bases: dict[type, str] = {}
_loaded: set[str] = set()


def framework_of(cls: type) -> str | None:
    """The framework (``FrEIA``, ``nflows``, ...) that defines ``cls`` or one of its bases."""
    for base in cls.__mro__:
        top = base.__module__.split(".")[0]
        if top in FRAMEWORKS:
            return top
    return None


def framework_version(framework: str) -> str:
    """Installed version of a framework, e.g. ``"FrEIA 0.2"``."""
    dist = DISTRIBUTIONS.get(framework, framework)
    try:
        return f"{framework} {importlib.metadata.version(dist)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{framework} (version unknown)"


def load_adapters(cls: type) -> None:
    """Import the adapter module of every framework in ``cls``'s bases, once."""
    for base in cls.__mro__:
        top = base.__module__.split(".")[0]
        if top in FRAMEWORKS and top not in _loaded:
            _loaded.add(top)
            importlib.import_module(FRAMEWORKS[top])


def _lookup(table: dict[type, Any], cls: type) -> Any:
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


def installer_for(cls: type) -> Installer | None:
    """The installer registered for ``cls`` or its nearest base class."""
    load_adapters(cls)
    return _lookup(_installers, cls)


def runner_for(cls: type) -> Runner | None:
    """The runner registered for ``cls`` or its nearest base class."""
    load_adapters(cls)
    return _lookup(_runners, cls)


def is_neutral(cls: type) -> bool:
    """True for layers whose factors are all exactly identity-like (permutations, reshapes,
    containers): their KLJ term is zero, so they need no capture."""
    return any(base in _neutral for base in cls.__mro__)


def flow_base(cls: type) -> str | None:
    """The framework whose invertible-layer base class ``cls`` derives from, if any."""
    return _lookup(_flow_bases, cls)


def register_installer(layer_type: type, installer: Installer) -> None:
    """Register a full installer for ``layer_type`` (what the framework adapters use)."""
    _installers[layer_type] = installer


def register_runner(model_type: type, runner: Runner) -> None:
    """Register how to run ``model_type``'s data-to-latent pass, for a penalty with no capture."""
    _runners[model_type] = runner


def register_neutral(*layer_types: type) -> None:
    """Declare layers that contribute nothing to KLJ (every factor orthogonal or identity)."""
    _neutral.update(layer_types)


def register_flow_base(layer_type: type, framework: str) -> None:
    """Declare a framework's invertible-layer base class, to warn about layers left out."""
    _flow_bases[layer_type] = framework


ScaleFn = Callable[
    [nn.Module, tuple[Any, ...], Any], "Tensor | Factor | Iterable[Tensor | Factor] | None"
]
LogDetFn = Callable[[nn.Module, tuple[Any, ...], Any], Tensor]


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def register_adapter(
    layer_type: type,
    fn: ScaleFn,
    *,
    log_det: LogDetFn | None = None,
    subnets: Callable[[Any], Iterable[nn.Module]] | None = None,
) -> None:
    r"""Teach klj-reg your own layer.

    ``fn(layer, inputs, output)`` is called after each forward call of a ``layer_type``
    module (as a forward hook) and returns :math:`\log|d|` of the layer's Jacobian diagonal:
    one tensor of shape ``(B, ...)`` per triangular factor (entries left out are taken to
    be 1), or :class:`klj_reg.Factor` objects for more control. Return ``None`` for calls
    that must not be recorded (e.g. the inverse direction). ``log_det(layer, inputs,
    output)``, if given, returns the layer's own log-determinant, against which the
    captured diagonal is checked on the first batches. ``subnets(layer)``, if given, lists
    the layer's scale/shift subnetworks, whose weights ``penalty(..., tau=...)`` regularises.

    Example::

        class Scale(nn.Module):                      # y = x * exp(s(x_cond))
            def forward(self, x):
                self.log_scale = self.net(x[:, :1])
                return x * self.log_scale.exp(), self.log_scale.sum(1)

        klj_reg.register_adapter(
            Scale,
            lambda layer, inputs, output: layer.log_scale,
            log_det=lambda layer, inputs, output: output[1],
        )
    """

    def install(module: nn.Module, site: Site) -> list[Handle]:
        if subnets is not None:
            site.add_subnets(*subnets(module))

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            result = fn(mod, args, output)
            if result is None:
                return
            items = [result] if isinstance(result, (Tensor, Factor)) else list(result)
            factors = [f if isinstance(f, Factor) else Factor(f) for f in items]
            x = _first_tensor(args)
            dim = (
                x.shape[1:].numel()
                if x is not None
                else max(f.source.shape[1:].numel() for f in factors)
            )
            site.record(factors, log_det(mod, args, output) if log_det else None, dim)

        return [site.forward_hook(module, hook)]

    register_installer(layer_type, install)
