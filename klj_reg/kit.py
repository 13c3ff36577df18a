"""The adapter kit: what an adapter may touch, and the helpers every adapter needs.

Most layers need none of it directly: an adapter declares a reader (:mod:`klj_reg.reader`)
and the core installs it. A custom installer (layers whose objects are built per call) and a
model's entry touch the model only through a :class:`Site` (one captured layer) or a
:class:`Door` (a model's entry): module hooks (``on_forward`` / ``on_pre``), method watches
(``watch_method``; ``watch_object`` for objects built during a pass), ``Site.record`` of the
factors of a data-to-latent call (``sampling=True``: of a latent-to-data call, the sampling
map's factors, log|e| = -log|d|), ``Site.add_subnets`` (weights ``tau`` regularises). Nothing
is stored on the model: callbacks live in the capture, and the hooks find them through the
object they run on (:mod:`klj_reg.hooks`), so copies and pickles of a model carry none of
them; class patches belong to the capture (``Site.patches``), given back on ``detach`` or, for a
model collected without it, at the next ``attach`` or ``detach``.

This module imports no framework and nothing else of klj-reg's but its leaves.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hooks
from .errors import AdapterMismatchError
from .records import Factor, LayerRecord, make

MAX_CHECKS = 100
"""Batches on which a layer is checked against its own log-det while its scales are ~1."""


class Handle(Protocol):
    """Anything with ``remove()``, e.g. ``torch.utils.hooks.RemovableHandle``."""

    def remove(self) -> None: ...


class Sink(Protocol):
    """Where a site's records go: its capture's current pass."""

    def record(self, site: Site, record: LayerRecord, sampling: bool = False) -> None: ...

    def has_record(self, site: Site) -> bool: ...


class Watches:
    """Method watches, shared by a model's entry (:class:`Door`) and a layer's
    :class:`Site`: class patches are held by the capture (``patches``)."""

    __slots__ = ()
    patches: hooks.Patches

    def missing(self, what: str) -> Exception:
        """The error for a method this framework version lacks (a site's names the
        framework and version its adapter declared)."""
        return AttributeError(what)

    def watch_method(
        self,
        obj: Any,
        name: str,
        *,
        before: hooks.Callback | None = None,
        after: hooks.Callback | None = None,
        final: hooks.Callback | None = None,
    ) -> list[Handle]:
        """Callbacks around ``obj.<name>(...)``, a method the framework calls directly (the
        class is patched while the capture holds it; see :func:`klj_reg.hooks.watch_method`);
        raises :meth:`missing` if ``obj`` lacks it."""
        if not callable(getattr(obj, name, None)):
            raise self.missing(
                f"{type(obj).__name__} has no method {name!r}, which its klj-reg adapter watches"
            )
        return list(
            hooks.watch_method(
                obj, name, before=before, after=after, final=final, patches=self.patches
            )
        )

    def watch_object(
        self,
        obj: Any,
        name: str,
        *,
        before: hooks.Callback | None = None,
        after: hooks.Callback | None = None,
        final: hooks.Callback | None = None,
    ) -> None:
        """:meth:`watch_method` for an object met during a pass (a transform built per
        call): no handles, the callbacks go with the object (hold its class's method at
        install, ``site.patches.hold(cls, name)``, to wrap it outside any compiled call).
        Callbacks made once, at install, are cheaper per object: :meth:`watcher`."""
        self.patches.hold(type(obj), name)
        hooks.add_callbacks(obj, name, before=before, after=after, final=final)

    def watcher(self, *ons: hooks.On) -> hooks.Prepared:
        """``watch = watcher(On(name, before=, after=, final=), ...)``, made once (at
        install): ``watch(obj)`` is :meth:`watch_object` of each on an object met during a
        pass, with one binding shared by all of them (nothing allocated per object)."""
        return hooks.Prepared(*ons, patches=self.patches)


class Door(Watches):
    """A model's entry: its adapter calls ``begin`` when a data-to-latent pass of the model
    starts on ``inputs`` (``batch`` samples of dimension ``dim``) and ``end`` when it ends;
    ``begin(..., sampling=True)`` for a latent-to-data pass (``inputs``, ``batch`` and ``dim``
    ``None`` when it is given no tensor), which opens a pass only where ``sampling`` is set
    (the model was attached with ``direction="sample"`` or ``"both"``).

    ``watch_method``, ``on_pre``, ``on_forward`` and ``on_end`` install the entry's callbacks;
    class patches are held by the capture (given back on ``detach``, or after the model's
    collection), so an entry may also watch objects it meets during a pass (a transform built
    per call)."""

    __slots__ = ("begin", "end", "sampling", "patches")

    def __init__(self, book: Any, patches: hooks.Patches) -> None:
        self.begin: Callable[..., None] = book.begin
        self.end: Callable[[], None] = book.end
        self.sampling: bool = book.sampling
        self.patches = patches

    on_pre = staticmethod(hooks.on_pre)
    on_forward = staticmethod(hooks.on_forward)
    on_end = staticmethod(hooks.on_end)


class Site(Watches):
    """One captured layer, as its adapter sees it.

    Attributes:
        name: The layer's path in the model (``named_modules``); ``""`` for the model itself.
        module: The layer.
        kind: The layer's class name, for messages.
        framework: The framework its adapter declared (``"user"`` for
            :func:`klj_reg.register_adapter` without ``framework=``).
        distribution: The package whose version messages name (default: ``framework``).
        known: The class the adapter was registered for (``module``'s class or a base).
        state: What the current call kept (subnetwork outputs); cleared by the core.
        subnets: The layer's coupling subnetworks (for ``tau``).
        checks_left: Batches on which the layer is still checked against its own log-det.
        sample_checks_left: The same, for its records of sampling passes.
        sampling: Whether the model was attached for sampling passes too: the adapter then
            also records the layer's latent-to-data calls (``record(..., sampling=True)``),
            or calls :meth:`no_sampling` if it cannot.
        unsampled: Why the layer's sampling calls cannot be recorded (``None``: they can).
        patches: The class patches of the capture (given back on ``detach``, or after collection).
    """

    __slots__ = (
        "sink",
        "name",
        "module",
        "kind",
        "framework",
        "distribution",
        "known",
        "state",
        "subnets",
        "checks_left",
        "sample_checks_left",
        "sampling",
        "unsampled",
        "patches",
    )

    def __init__(
        self,
        sink: Sink,
        name: str,
        module: nn.Module,
        framework: str,
        sampling: bool = False,
        *,
        distribution: str | None = None,
        known: type | None = None,
        patches: hooks.Patches | None = None,
    ) -> None:
        self.sampling = sampling
        self.sample_checks_left = MAX_CHECKS
        self.unsampled: str | None = None
        self.sink = sink
        self.name = name
        self.module = module
        self.kind = type(module).__name__
        self.framework = framework
        self.distribution = distribution or framework
        self.known = type(module) if known is None else known
        self.state: dict[str, Any] = {}
        self.subnets: list[nn.Module] = []
        self.checks_left = MAX_CHECKS
        self.patches = hooks.Patches() if patches is None else patches

    @property
    def label(self) -> str:
        """``name (Kind)`` for messages."""
        return f"{self.name or '<model>'} ({self.kind})"

    def record(
        self,
        factors: Iterable[Factor],
        log_det: Tensor | None,
        dim: int,
        sampling: bool = False,
    ) -> None:
        """Record this layer's factors from the call that just ran (``sampling``: a
        latent-to-data call, with the sampling map's factors and log-determinant)."""
        record = make(LayerRecord, (self.name, self.kind, tuple(factors), log_det, dim))
        self.sink.record(self, record, sampling)

    def no_sampling(self, why: str) -> None:
        """The adapter cannot record this layer's sampling calls (``attach`` then raises
        when the model is attached for sampling passes)."""
        self.unsampled = why

    def recorded(self) -> bool:
        """Whether this layer already recorded in the pass in progress."""
        return self.sink.has_record(self)

    def mismatch(self, what: str) -> AdapterMismatchError:
        """The error for this layer computed differently from what its adapter reads: names
        the framework and version the adapter declared or, for a subclass of the adapter's
        class that overrides its methods, the subclass and the fix."""
        return mismatch(
            self.framework,
            what,
            distribution=self.distribution,
            layer=self.module,
            known=self.known,
        )

    def on_forward(self, module: nn.Module, fn: hooks.Callback) -> Handle:
        """Call ``fn(module, args, kwargs, output)`` after each ``module(...)``."""
        return hooks.on_forward(module, fn)

    def on_pre(self, module: nn.Module, fn: hooks.Callback) -> Handle:
        """Call ``fn(module, args, kwargs)`` before each ``module(...)``."""
        return hooks.on_pre(module, fn)

    def missing(self, what: str) -> Exception:
        return self.mismatch(what)

    def stash(self, net: nn.Module, key: str, *, inputs: bool = False) -> Handle:
        """Keep a reference to ``net``'s output (or its first input) in ``state[key]``."""
        state = self.state

        def keep(module: nn.Module, args: tuple[Any, ...], kwargs: Any, out: Any) -> None:
            state[key] = args[0] if inputs else out

        return self.on_forward(net, keep)

    def add_subnets(self, *modules: nn.Module) -> None:
        """Mark the layer's coupling subnetworks, whose weights ``tau`` regularises."""
        self.subnets.extend(modules)


# Helpers ------------------------------------------------------------------------------------


def returned_log_det(output: Any, index: int = 1) -> Tensor | None:
    """The log-determinant a layer returned as ``output[index]``, or ``None``."""
    if not isinstance(output, (tuple, list)) or len(output) <= index:
        return None
    log_det = output[index]
    return log_det if isinstance(log_det, Tensor) else None


def first_tensor(obj: Any) -> Tensor | None:
    """The first tensor in a (nested) tuple or list of arguments."""
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def member(module: nn.Module, name: str) -> Any:
    """``getattr(module, name)`` for a parameter or buffer, found in the module's own tables
    first: the tensor the call used (also one ``torch.func.functional_call`` swapped in),
    without ``nn.Module.__getattr__``'s failed ordinary lookup before it (an AttributeError
    raised and caught: about a microsecond per read, in the hot path of every captured call).
    Anything else (a parametrized tensor, a property) is ``getattr``'s."""
    found: Tensor | None = module._parameters.get(name)
    if found is None:
        found = module._buffers.get(name)
        if found is None:
            return getattr(module, name)
    return found


def first_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor | None:
    """A call's first tensor argument (positional, else keyword; the first of a list of
    inputs too), the usual places looked at first (the hot path of every captured call)."""
    x = args[0] if args else None
    if isinstance(x, (list, tuple)):
        x = x[0] if x else None
    if isinstance(x, Tensor):
        return x
    found = first_tensor(args)
    return found if found is not None else first_tensor(tuple(kwargs.values()))


def inverted(factors: Iterable[Factor]) -> list[Factor]:
    r"""The factors of the inverse map at the same point: :math:`\log e = -\log d` (for a
    layer's sampling call, whose tensors give the data-to-latent diagonal :math:`d`)."""
    return [f._replace(scale=-f.scale) for f in factors]


def classes(namespaces: Iterable[ModuleType | object], *names: str) -> list[type]:
    """The classes called ``names`` in the first namespace that has each, skipping the names
    this version of the framework lacks."""
    spaces = list(namespaces)
    found = []
    for name in names:
        cls = next((getattr(ns, name) for ns in spaces if hasattr(ns, name)), None)
        if isinstance(cls, type):
            found.append(cls)
    return found


def framework_version(distribution: str) -> str:
    """Installed version of a package, e.g. ``"FrEIA 0.2"``."""
    try:
        return f"{distribution} {importlib.metadata.version(distribution)}"
    except importlib.metadata.PackageNotFoundError:
        return f"{distribution} (version unknown)"


KEPT_OVERRIDES = frozenset({"__init__", "extra_repr", "__repr__"})
"""Methods a subclass may override without changing a layer's math."""


def overrides(layer: Any, known: type) -> list[str]:
    """Methods of ``known`` (the class an adapter was registered for) that ``layer``'s class
    or a base between them, defined outside ``known``'s package, overrides."""
    home = known.__module__.split(".")[0]
    names: list[str] = []
    for cls in type(layer).__mro__:
        if cls is known or known not in cls.__mro__:
            break
        if cls.__module__.split(".")[0] == home:
            continue
        names += [
            n
            for n, v in vars(cls).items()
            if callable(v) and n not in KEPT_OVERRIDES and hasattr(known, n) and n not in names
        ]
    return names


def mismatch(
    framework: str,
    what: str,
    *,
    distribution: str | None = None,
    layer: Any = None,
    known: type | None = None,
) -> AdapterMismatchError:
    """The error for a layer computed differently from what its adapter expects: for a
    user adapter, check it; for a subclass of the adapter's class ``known`` that overrides
    its methods, the subclass and the fix; else the framework's version (``distribution``)."""
    if framework == "user":
        return AdapterMismatchError(
            f"{what}: the factors your klj_reg.register_adapter function returns do not "
            "describe the layer's Jacobian diagonal; check that function (and its log_det)."
        )
    changed = overrides(layer, known) if layer is not None and known is not None else []
    if changed and known is not None:
        sub = type(layer).__name__
        return AdapterMismatchError(
            f"{what}: {sub} subclasses {framework}'s {known.__name__} and overrides "
            f"{', '.join(changed)}, so klj-reg's adapter for {known.__name__} does not "
            f"describe it. Teach klj-reg {sub} with klj_reg.register_adapter({sub}, ...) "
            "(docs/adapters.md), or use estimator='hutchinson'."
        )
    return AdapterMismatchError(
        f"{what} ({framework_version(distribution or framework)}): this version of {framework} "
        "computes the layer differently from what its klj-reg adapter expects. Please report "
        "it with the version; meanwhile use estimator='hutchinson'."
    )


def caller_level() -> int:
    """``stacklevel`` of the first frame outside klj_reg (the user's ``attach`` call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        level, frame = level + 1, frame.f_back
    return level


def warn_left_out(labels: Iterable[str], why: str = "") -> None:
    """Warn that some invertible layers are not regularised (no adapter), naming them."""
    labels = list(labels)
    if not labels:
        return
    warnings.warn(
        "klj-reg does not regularise these invertible layers"
        + (f" ({why})" if why else " (no adapter)")
        + ": "
        + ", ".join(labels)
        + ". Register them with klj_reg.register_adapter if they scale their input, or use "
        "estimator='hutchinson'.",
        stacklevel=caller_level(),
    )


def log_sigmoid_plus_2_eps(u: Tensor) -> Tensor:
    """``log(sigmoid(u + 2) + 1e-3)``: the coupling and autoregressive scale of nflows and
    normflows (shared, so that their layers' factors are one expression)."""
    return torch.log(torch.sigmoid(u + 2.0) + 1e-3)


log_sigmoid_plus_2_eps.klj_range = (math.log(1e-3), math.log1p(1e-3))  # type: ignore[attr-defined]
"""Its output range (bounded: the penalty needs no overflow continuation for it)."""

_LOG_SOFTPLUS: dict[float, Callable[[Tensor], Tensor]] = {}


def log_softplus_plus(eps: float) -> Callable[[Tensor], Tensor]:
    """``u -> log(softplus(u) + eps)``: nflows' autoregressive scale and the ``LULinear``
    diagonal of nflows and normflows. One function object per ``eps``, so that every layer's
    factor joins one expression (one activation over all of them, not one per layer)."""
    eps = float(eps)
    found = _LOG_SOFTPLUS.get(eps)
    if found is None:

        def log_softplus(u: Tensor) -> Tensor:
            return torch.log(F.softplus(u) + eps)

        found = _LOG_SOFTPLUS[eps] = log_softplus
    return found


Entry = Callable[[nn.Module, Door], Iterable[Handle]]
"""Installs a model's entry: callbacks that open and close ``door`` around each of its
data-to-latent passes, returning their handles."""


on_forward = hooks.on_forward
"""``on_forward(module, fn)``: call ``fn(module, args, kwargs, output)`` after each call (for
entries; layers use :meth:`Site.on_forward`)."""

on_pre = hooks.on_pre
"""``on_pre(module, fn)``: call ``fn(module, args, kwargs)`` before each call (for entries)."""

on_end = hooks.on_end
"""``on_end(module, fn)``: call ``fn(module)`` after each call, whether it returns or raises
(for entries)."""

watch_method = hooks.watch_method
"""``watch_method(module, name, before=, after=, final=)``: callbacks around a method the
framework calls directly (for entries; layers use :meth:`Site.watch_method`)."""


def begin_on_first_tensor(
    door: Door, args: tuple[Any, ...], kwargs: dict[str, Any], sampling: bool = False
) -> None:
    """Open ``door`` on a call's first tensor argument (positional, else keyword): a pass of
    ``x.shape[0]`` samples of dimension ``x.shape[1:].numel()``. ``sampling``: a
    latent-to-data pass, opened on nothing when the call has no tensor argument."""
    x = first_argument(args, kwargs)
    if x is not None:
        if sampling:
            door.begin(x, x.shape[0] if x.dim() else 1, x.shape[1:].numel(), sampling=True)
        else:
            door.begin(x, x.shape[0] if x.dim() else 1, x.shape[1:].numel())
    elif sampling:
        door.begin(None, None, None, sampling=True)


def module_entry(
    model: nn.Module,
    door: Door,
    is_data_to_latent: Callable[..., bool] | None = None,
    is_latent_to_data: Callable[..., bool] | None = None,
) -> list[Handle]:
    """The default entry: the model's own ``__call__``, on its first tensor argument
    (``is_data_to_latent(args, kwargs)`` may exclude calls in the other direction; where
    the door opens sampling passes, calls for which ``is_latent_to_data(args, kwargs)``
    holds open one)."""
    sampling = is_latent_to_data if getattr(door, "sampling", False) else None

    def begin(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if sampling is not None and sampling(args, kwargs):
            begin_on_first_tensor(door, args, kwargs, sampling=True)
        elif is_data_to_latent is None or is_data_to_latent(args, kwargs):
            begin_on_first_tensor(door, args, kwargs)

    def end(module: nn.Module) -> None:
        door.end()

    return [on_pre(model, begin), on_end(model, end)]


class FunctionTap:
    r"""Keeps what a framework function returned (or was given) on its latest call inside a
    captured layer's call: a spline function's elementwise :math:`\log|dy/dx|`, or the tensor
    a layer sums into its log-determinant, so that a layer's factor is the tensor the layer
    itself computed, not a second evaluation.

    While some captured layer needs it (:meth:`acquire`), the functions ``targets()`` names
    (``(namespace, name)`` pairs: where the framework's layers look them up at each call) are
    wrapped; a wrapper keeps ``keep(args, kwargs, out)`` (default ``(inputs, out[1])``) only in
    the thread of a captured layer's call (:meth:`listen`). Reading does not forget it: a layer
    attached to two models (on its own and inside a flow) has one site per model, and each
    reads the same call's tensor; the next ``listen(True)`` forgets it.
    """

    def __init__(
        self,
        framework: str,
        targets: Callable[[], Iterable[tuple[Any, str]]],
        keep: Callable[[tuple[Any, ...], dict[str, Any], Any], tuple[Any, Tensor]] | None = None,
    ) -> None:
        self.framework = framework
        self.targets = targets
        self.keep = _spline_result if keep is None else keep
        self.local = threading.local()
        self.originals: dict[tuple[Any, str], Any] = {}
        self.users = 0

    def listen(self, on: bool) -> None:
        """Keep results from now on (``True``, forgetting the latest) or stop."""
        self.local.on = on
        if on:
            self.local.latest = None

    def latest(self, inputs: Tensor | None = None) -> Tensor | None:
        """What the latest call since ``listen(True)`` kept; with ``inputs``, only if that call
        was on this very tensor."""
        latest: tuple[Any, Tensor] | None = getattr(self.local, "latest", None)
        if latest is None or (inputs is not None and latest[0] is not inputs):
            return None
        return latest[1]

    def _wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def tapped(*args: Any, **kwargs: Any) -> Any:
            out = fn(*args, **kwargs)
            if getattr(self.local, "on", False):
                self.local.latest = self.keep(args, kwargs, out)
            return out

        tapped._klj_tap = True  # type: ignore[attr-defined]
        return tapped

    def acquire(self) -> Handle:
        """Wrap the functions (first user); the handle unwraps them (last user)."""
        if self.users == 0:
            _WRAPPING.add(self)
            for namespace, name in self.targets():
                fn = getattr(namespace, name, None)
                if callable(fn) and not getattr(fn, "_klj_tap", False):
                    self.originals[(namespace, name)] = fn
                    setattr(namespace, name, self._wrap(fn))
            if not self.originals:
                names = ", ".join(sorted({name for _, name in self.targets()}))
                raise mismatch(
                    self.framework,
                    f"none of the functions klj-reg reads ({names}) are where its layers call "
                    "them, so the layers that need them cannot be captured",
                )
        self.users += 1
        return TapRelease(self)

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            for (namespace, name), fn in self.originals.items():
                setattr(namespace, name, fn)
            self.originals.clear()
            _WRAPPING.discard(self)


_WRAPPING: set[FunctionTap] = set()
"""The function taps whose wrappers are in place (some site holds them)."""


@contextlib.contextmanager
def lifted() -> Iterator[None]:
    """Every wrapper klj-reg puts in a framework's place (class patches: :func:`klj_reg.hooks.
    lifted`; function taps) taken off for the block and put back after it. For measurement:
    a plain model timed beside an attached one, in one process, runs as it would alone."""
    taken = []
    for tap in list(_WRAPPING):
        for (namespace, name), fn in tap.originals.items():
            taken.append((namespace, name, getattr(namespace, name)))
            setattr(namespace, name, fn)
    try:
        with hooks.lifted():
            yield
    finally:
        for namespace, name, wrapper in taken:
            setattr(namespace, name, wrapper)


def _spline_result(args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> tuple[Any, Tensor]:
    """A spline function's call: ``(inputs, out[1])``, its elementwise log-derivative."""
    return kwargs["inputs"] if "inputs" in kwargs else args[0], out[1]


class TapRelease:
    """A site's hold on a :class:`FunctionTap`; ``remove()`` gives it back (once). It holds no
    module, so a model's capture can give its taps back after the model is collected without
    ``detach`` (at the next :func:`klj_reg.attach` or :func:`klj_reg.detach`), leaving the
    framework's functions unwrapped."""

    def __init__(self, tap: FunctionTap) -> None:
        self.tap: FunctionTap | None = tap

    def remove(self) -> None:
        if self.tap is not None:
            self.tap.release()
            self.tap = None
