"""Which layer types klj-reg can read, where a model's pass begins, and how to run one.

Adapters for the four frameworks live in :mod:`klj_reg.adapters` and are imported lazily,
the first time a model containing one of their classes is attached, so that
``import klj_reg`` needs none of them. Each registers its classes by name through a
:class:`Registrar`, which skips the names a framework version lacks.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any, TypeVar

from torch import Tensor, nn

from .kit import Entry, Handle, Installer, Site, classes, first_tensor
from .records import Factor

Runner = Callable[[nn.Module, Tensor, Any], tuple[Tensor, Tensor]]
"""Runs a model's data-to-latent pass: ``(model, x, context) -> (z, log_det)``."""

FRAMEWORKS = {
    "FrEIA": "klj_reg.adapters.freia",
    "nflows": "klj_reg.adapters.nflows",
    "normflows": "klj_reg.adapters.normflows",
    "zuko": "klj_reg.adapters.zuko",
    "sbi": "klj_reg.adapters.sbi",  # its estimators wrap an nflows or zuko flow
}

_installers: dict[type, Installer] = {}
_runners: dict[type, Runner] = {}
_entries: dict[type, Entry] = {}
_neutral: set[type] = set()
_flow_bases: dict[type, str] = {}
_misuses: dict[type, str] = {}
_loaded: set[str] = set()


def framework_of(cls: type) -> str | None:
    """The framework (``FrEIA``, ``nflows``, ...) that defines ``cls`` or one of its bases."""
    for base in cls.__mro__:
        top = base.__module__.split(".")[0]
        if top in FRAMEWORKS:
            return top
    return None


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


def entry_for(cls: type) -> Entry | None:
    """The entry registered for ``cls`` or its nearest base class (``None``: the model's own
    ``__call__``)."""
    load_adapters(cls)
    return _lookup(_entries, cls)


def misuse_for(cls: type) -> str | None:
    """What to pass instead of an object of ``cls`` that is not a model (e.g. the
    distribution a flow builds), as its framework's adapter says; ``None`` if it says
    nothing."""
    load_adapters(cls)
    return _lookup(_misuses, cls)


def is_neutral(cls: type) -> bool:
    """True for layers whose factors are all exactly identity-like (permutations, reshapes,
    containers): their KLJ term is zero, so they need no capture."""
    return any(base in _neutral for base in cls.__mro__)


def flow_base(cls: type) -> str | None:
    """The framework whose invertible-layer base class ``cls`` derives from, if any."""
    return _lookup(_flow_bases, cls)


T = TypeVar("T")


class Registrar:
    """One framework's registrations, by class name: each decorator or call looks the names
    up in ``namespaces`` (modules, in order) and skips those this version lacks.

    Example (inside an adapter module)::

        framework = Registrar("FrEIA", Fm, Ff)

        @framework.layers("GLOWCouplingBlock", "GINCouplingBlock")
        def install_two_sided(block, site): ...
    """

    def __init__(self, framework: str, *namespaces: ModuleType | object) -> None:
        self.framework = framework
        self.namespaces = namespaces

    def classes(self, *names: str) -> list[type]:
        """The classes called ``names`` (those this version has)."""
        return classes(self.namespaces, *names)

    def _register(self, table: dict[type, T], names: tuple[str, ...]) -> Callable[[T], T]:
        def decorate(fn: T) -> T:
            for cls in self.classes(*names):
                table[cls] = fn
            return fn

        return decorate

    def layers(self, *names: str) -> Callable[[Installer], Installer]:
        """Decorate the installer of the layers called ``names``."""
        return self._register(_installers, names)

    def runner(self, *names: str) -> Callable[[Runner], Runner]:
        """Decorate how to run these models' data-to-latent pass (for a penalty with no
        captured pass)."""
        return self._register(_runners, names)

    def misuse(self, fix: str, *classes: type) -> None:
        """``fix``: what to pass instead of an object of ``classes`` (or of a subclass),
        objects of this framework that users pass to klj-reg by mistake."""
        for cls in classes:
            _misuses[cls] = fix

    def entry(self, *names: str) -> Callable[[Entry], Entry]:
        """Decorate where these models' data-to-latent pass begins and ends."""
        return self._register(_entries, names)

    def neutral(self, *names: str) -> None:
        """Declare layers whose KLJ term is exactly zero (orthogonal or identity factors)."""
        _neutral.update(self.classes(*names))

    def flow_base(self, *names: str) -> None:
        """Declare the framework's invertible-layer base classes (to warn about layers left
        out)."""
        for cls in self.classes(*names):
            _flow_bases[cls] = self.framework


def register_installer(layer_type: type, installer: Installer) -> None:
    """Register a full installer for ``layer_type``."""
    _installers[layer_type] = installer


def register_runner(model_type: type, runner: Runner) -> None:
    """Register how to run ``model_type``'s data-to-latent pass, for a penalty with no capture."""
    _runners[model_type] = runner


def register_neutral(*layer_types: type) -> None:
    """Declare layers that contribute nothing to KLJ (every factor orthogonal or identity)."""
    _neutral.update(layer_types)


ScaleFn = Callable[
    [nn.Module, tuple[Any, ...], Any], "Tensor | Factor | Iterable[Tensor | Factor] | None"
]
LogDetFn = Callable[[nn.Module, tuple[Any, ...], Any], Tensor]


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
        if site.sampling:
            site.no_sampling(
                "layers taught by klj_reg.register_adapter record data-to-latent calls only"
            )
        if subnets is not None:
            site.add_subnets(*subnets(module))

        def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            result = fn(mod, args, out)
            if result is None:
                return
            items = [result] if isinstance(result, (Tensor, Factor)) else list(result)
            factors = [f if isinstance(f, Factor) else Factor(source=f) for f in items]
            x = first_tensor(args)
            dim = (
                x.shape[1:].numel()
                if x is not None
                else max(f.selected().shape[1:].numel() for f in factors)
            )
            site.record(factors, log_det(mod, args, out) if log_det else None, dim)

        return [site.on_forward(module, hook)]

    register_installer(layer_type, install)
