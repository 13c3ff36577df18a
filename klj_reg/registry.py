"""Which layer types klj-reg can read, where a model's pass begins, and how to run one.

Adapters are found, not listed: the first time a model containing a class of package ``pkg``
is attached, klj-reg imports the adapter module that an installed distribution declares in the
``klj_reg.adapters`` entry-point group under the name ``pkg``, else its own
``klj_reg.adapters.<pkg lowercased>`` if there is one (``FrEIA`` -> ``klj_reg.adapters.freia``),
so that ``import klj_reg`` needs no framework and a new adapter module needs no table edited.
Each module registers its classes by name through a :class:`Registrar`, which skips the names
a framework version lacks; :func:`register_adapter` registers one class directly. Lookups go
through a class's bases (its MRO): a subclass of a registered class is read by its adapter.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from types import ModuleType
from typing import Any, TypeVar

from torch import Tensor, nn

from .kit import Entry, FunctionTap, classes
from .reader import Adapter, Call, Installer, Keep, Reader, from_short

Runner = Callable[[nn.Module, Tensor, Any], tuple[Tensor, Tensor]]
"""Runs a model's data-to-latent pass: ``(model, x, context) -> (z, log_det)``."""

GROUP = "klj_reg.adapters"
"""The entry-point group of outside adapters: name = the framework's top-level package,
value = the adapter module, imported when a model of that package is first attached."""

_adapters: dict[type, Adapter] = {}
_runners: dict[type, Runner] = {}
_entries: dict[type, Entry] = {}
_pass_entries: dict[str, Entry] = {}
_neutral: set[type] = set()
_flow_bases: dict[type, str] = {}
_misuses: dict[type, str] = {}
_loaded: set[str] = set()
_outside: dict[str, Any] | None = None


def _entry_points() -> dict[str, Any]:
    global _outside
    if _outside is None:
        _outside = {ep.name: ep for ep in importlib.metadata.entry_points(group=GROUP)}
    return _outside


def adapter_module(package: str) -> str | None:
    """The adapter module for classes of the top-level ``package``: an outside one
    (entry point), else klj-reg's own, else ``None``."""
    found = _entry_points().get(package)
    if found is not None:
        return str(found.value)
    name = f"{__package__}.adapters.{package.lower()}"
    try:
        return name if importlib.util.find_spec(name) is not None else None
    except (ImportError, ValueError):
        return None


def load_adapters(cls: type) -> None:
    """Import the adapter module of every framework in ``cls``'s bases, once."""
    for base in cls.__mro__:
        top = base.__module__.split(".")[0]
        if top not in _loaded:
            _loaded.add(top)
            module = adapter_module(top)
            if module is not None:
                importlib.import_module(module)


def _lookup(table: Mapping[type, Any], cls: type) -> Any:
    for base in cls.__mro__:
        if base in table:
            return table[base]
    return None


def adapter_for(cls: type) -> tuple[type, Adapter] | None:
    """The adapter registered for ``cls`` or its nearest base class, with that class."""
    load_adapters(cls)
    for base in cls.__mro__:
        found = _adapters.get(base)
        if found is not None:
            return base, found
    return None


def runner_for(cls: type) -> Runner | None:
    """The runner registered for ``cls`` or its nearest base class."""
    load_adapters(cls)
    return _lookup(_runners, cls)


def entry_for(cls: type) -> Entry | None:
    """The entry registered for ``cls`` or its nearest base class (``None``: the model's own
    ``__call__``, or a framework's :meth:`Registrar.pass_entry`)."""
    load_adapters(cls)
    return _lookup(_entries, cls)


def pass_entry(framework: str) -> Entry | None:
    """The entry a framework declared for models of its layers that are not its own
    classes (an ``nn.ModuleList`` of its transforms)."""
    return _pass_entries.get(framework)


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
    up in ``namespaces`` (modules, in order) and skips those this version lacks. Errors of its
    layers name ``framework`` and the installed version of ``distribution`` (default: the
    framework's name; e.g. ``"pyro-ppl"`` for ``"pyro"``).

    Example (inside an adapter module)::

        framework = Registrar("FrEIA", Fm, Ff)

        @framework.reads("GLOWCouplingBlock", keep={"a1": "subnet1", "a2": "subnet2"})
        def glow(block, call): ...
    """

    def __init__(
        self, framework: str, *namespaces: ModuleType | object, distribution: str | None = None
    ) -> None:
        self.framework = framework
        self.namespaces = namespaces
        self.distribution = distribution or framework

    def classes(self, *names: str) -> list[type]:
        """The classes called ``names`` (those this version has)."""
        return classes(self.namespaces, *names)

    def _register(self, table: dict[type, T], names: tuple[str, ...]) -> Callable[[T], T]:
        def decorate(fn: T) -> T:
            for cls in self.classes(*names):
                table[cls] = fn
            return fn

        return decorate

    def adapter(self, *names: str, **fields: Any) -> Adapter:
        """Register ``Adapter(**fields)`` (framework and distribution: this registrar's) for
        the layers called ``names``; returns it."""
        found = Adapter(framework=self.framework, distribution=self.distribution, **fields)
        for cls in self.classes(*names):
            _adapters[cls] = found
        return found

    def reads(self, *names: str, **fields: Any) -> Callable[[Reader], Reader]:
        """Decorate the reader ``read(layer, call)`` of the layers called ``names``; the other
        :class:`~klj_reg.reader.Adapter` fields (``keep``, ``method``, ``sample``, ...) as
        keywords."""

        def decorate(read: Reader) -> Reader:
            self.adapter(*names, read=read, **fields)
            return read

        return decorate

    def layers(self, *names: str) -> Callable[[Installer], Installer]:
        """Decorate a custom installer ``install(layer, site) -> handles`` of the layers
        called ``names`` (``Adapter(install=...)``), for layers a reader cannot describe."""

        def decorate(install: Installer) -> Installer:
            self.adapter(*names, install=install)
            return install

        return decorate

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

    def pass_entry(self, entry: Entry) -> Entry:
        """Decorate where the pass of a model that is not one of this framework's classes
        (an ``nn.Module`` or ``nn.ModuleList`` holding its layers) begins and ends: used when
        the model's class has no entry and its captured layers are all of this framework."""
        _pass_entries[self.framework] = entry
        return entry

    def neutral(self, *names: str) -> None:
        """Declare layers whose KLJ term is exactly zero (orthogonal or identity factors)."""
        _neutral.update(self.classes(*names))

    def flow_base(self, *names: str) -> None:
        """Declare the framework's invertible-layer base classes (to warn about layers left
        out)."""
        for cls in self.classes(*names):
            _flow_bases[cls] = self.framework


def register_installer(layer_type: type, installer: Installer) -> None:
    """Register a custom installer for ``layer_type`` (``register_adapter(layer_type,
    install=installer)``)."""
    _adapters[layer_type] = Adapter(install=installer)


def register_runner(model_type: type, runner: Runner) -> None:
    """Register how to run ``model_type``'s data-to-latent pass, for a penalty with no capture."""
    _runners[model_type] = runner


def register_neutral(*layer_types: type) -> None:
    """Declare layers that contribute nothing to KLJ (every factor orthogonal or identity)."""
    _neutral.update(layer_types)


LogDetFn = Callable[..., "Tensor | None"]


def register_adapter(
    layer_type: type,
    fn: Callable[..., Any] | None = None,
    *,
    log_det: LogDetFn | None = None,
    subnets: Callable[[Any], Iterable[nn.Module]] | None = None,
    method: str = "__call__",
    keep: Mapping[str, Keep | str | FunctionTap] | None = None,
    sample: str | None = None,
    sample_when: Callable[[Any, Call], bool] | None = None,
    read_sample: Callable[..., Any] | None = None,
    dim: Callable[[Any, Call], int] | None = None,
    prepare: Callable[[Any], Any] | None = None,
    install: Installer | None = None,
    framework: str = "user",
    distribution: str | None = None,
) -> None:
    r"""Teach klj-reg a layer type: the same mechanism the built-in adapters use.

    ``fn(layer, call)`` returns :math:`\log|d|` of the layer's Jacobian diagonal at a
    data-to-latent call: one tensor of shape ``(B, ...)`` per triangular factor (entries left
    out are taken to be 1), or :class:`klj_reg.Factor` objects for more control; ``None`` for
    calls that must not be recorded. ``call`` is a :class:`klj_reg.Call`: the call's ``args``,
    ``kwargs``, ``output`` and the tensors ``kept`` during it. The short form
    ``fn(layer, inputs, output)`` (three parameters) is accepted too.

    Args:
        layer_type: The layer class (its subclasses are read the same way).
        fn: The reader.
        log_det: ``log_det(layer, call)`` (or ``(layer, inputs, output)``): the layer's own
            log-determinant, against which the captured diagonal is checked on the first
            batches (default: none checked for ``framework="user"``; ``output[1]`` otherwise).
        subnets: ``subnets(layer)``: the scale/shift subnetworks whose weights
            ``penalty(..., tau=...)`` regularises (default: the modules in ``keep``).
        method: The call to watch: ``"__call__"`` (the default: the layer is called as
            ``layer(x)``) or the name of a method the framework calls directly (normflows
            trains through ``flow.inverse``).
        keep: Tensors to keep during that call, by key (:class:`klj_reg.Keep`, or an
            attribute path such as ``"net"``: that submodule's output).
        sample: A method that runs the layer latent-to-data, watched for sampling passes
            (``attach(model, direction="sample")``).
        sample_when: ``sample_when(layer, call)``: whether a call of ``method`` ran
            latent-to-data.
        read_sample: The sampling map's factors at such a call (default: ``fn``'s with
            :math:`\log e = -\log d`).
        dim: ``dim(layer, call)``: the diagonal's length per sample (default: the numel of
            one sample of the first tensor argument).
        prepare: ``prepare(layer)``, run once at attach; its result is ``call.setup``.
        install: A custom installer ``install(layer, site) -> handles`` instead of a reader
            (see docs/adapters.md).
        framework: The name errors give (``"user"``: they point to this adapter).
        distribution: The package whose version errors name.

    Example::

        class Scale(nn.Module):                      # y = x * exp(s(x_cond))
            def forward(self, x):
                self.log_scale = self.net(x[:, :1])
                return x * self.log_scale.exp(), self.log_scale.sum(1)

        klj_reg.register_adapter(
            Scale,
            lambda layer, call: layer.log_scale,
            log_det=lambda layer, call: call.output[1],
        )
    """
    if fn is None and install is None:
        raise TypeError("register_adapter needs a reader fn or install=")
    own_log_det = None if log_det is None else from_short(log_det)
    if own_log_det is None and framework == "user":
        own_log_det = _no_log_det
    _adapters[layer_type] = Adapter(
        read=None if fn is None else from_short(fn),
        method=method,
        keep=dict(keep or {}),
        log_det=own_log_det,
        dim=dim,
        subnets=subnets,
        sample=sample,
        sample_when=sample_when,
        read_sample=None if read_sample is None else from_short(read_sample),
        prepare=prepare,
        install=install,
        framework=framework,
        distribution=distribution,
    )


def _no_log_det(layer: Any, call: Call) -> None:
    return None
