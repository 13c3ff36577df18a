r"""One mechanism for every adapter: a layer type's *reader*, installed by the core.

An adapter declares, per layer type, an :class:`Adapter`: which call of the layer to watch
(its ``Module.__call__``, or a method the framework calls directly, such as normflows'
``inverse``), which tensors to keep during that call (:class:`Keep`: a subnetwork's output,
a method's, a :class:`~klj_reg.kit.FunctionTap`'s), and ``read(layer, call)``, a pure function
from the :class:`Call` (its arguments, output and kept tensors) to the layer's triangular
factors (:class:`~klj_reg.records.Factor`, or tensors of :math:`\log|d|`).

The core (:func:`install`) owns the rest: the hooks and method watches, clearing what a call
kept before the next, the error when a call did not compute what the reader reads, the
dimension ``D``, the layer's log-determinant for the self-check, and the other direction: a
latent-to-data call (``sample``, a different method, or ``sample_when``, the same one) records
the sampling map's factors, :math:`\log e = -\log d` of ``read``'s unless ``read_sample``
says otherwise. :func:`klj_reg.register_adapter` and :class:`klj_reg.registry.Registrar`
register adapters; the built-in ones use nothing else.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from torch import Tensor, nn

from . import hooks
from .errors import AdapterMismatchError
from .kit import FunctionTap, Handle, Site, first_argument, inverted, returned_log_det
from .records import Factor, LayerRecord, make

CALL = "__call__"
"""The watched call of a layer that the framework calls through ``Module.__call__``."""


class Keep(NamedTuple):
    """A tensor to keep during each watched call of a layer, for its reader.

    Attributes:
        path: The object, as an attribute path from the layer (``"subnet"``,
            ``"prqct.transform_net"``; ``""``: the layer itself). An absent object (``None``)
            keeps nothing.
        method: Which call of that object: ``"__call__"`` (a module's forward hook) or a
            method's name (watched).
        inputs: Keep the call's first argument instead of its output.
        optional: A call of the layer may leave it out (the reader then sees no key);
            otherwise the core raises :class:`~klj_reg.AdapterMismatchError`.
        take: Maps what was kept (output or argument) to what the reader gets, at that
            moment (e.g. ``lambda t: (t, t._version)``, to see later in-place changes).

    A later call of the object in the same layer call replaces the kept value (an
    autoregressive inverse runs its network ``D`` times: the last is kept).
    """

    path: str = ""
    method: str = CALL
    inputs: bool = False
    optional: bool = False
    take: Callable[[Any], Any] | None = None


class Call(NamedTuple):
    """One watched call of a layer, as its reader sees it (``sampling``: the call was of the
    adapter's ``sample`` method, or one ``sample_when`` marks: the layer ran latent-to-data).

    Attributes:
        args: The call's positional arguments.
        kwargs: Its keyword arguments.
        output: What it returned.
        kept: The tensors kept during it, by the keys of the adapter's ``keep``.
        sampling: Whether it ran latent-to-data (a sampling call).
        setup: What the adapter's ``prepare(layer)`` returned at attach (``None`` without).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any
    kept: dict[str, Any]
    sampling: bool = False
    setup: Any = None

    @property
    def x(self) -> Tensor | None:
        """The call's first tensor argument (positional, else keyword)."""
        return first_argument(self.args, self.kwargs)

    @property
    def log_det(self) -> Tensor | None:
        """The log-determinant the call returned as ``output[1]``, or ``None``."""
        return returned_log_det(self.output)


Factors = Tensor | Factor | Iterable[Tensor | Factor] | None
Reader = Callable[[Any, Call], Factors]
"""``read(layer, call)``: the factors of the layer's Jacobian at that call (``None``: record
nothing)."""

Installer = Callable[[Any, Site], Iterable[Handle]]

Keeps = Mapping[str, "Keep | str | FunctionTap"]
"""What an adapter keeps during a call, by key."""


class Mismatch(Exception):  # noqa: N818 (it is caught by the core, never seen by users)
    """Raised by a reader or ``prepare`` when the layer does not compute what it reads; the
    core raises :class:`~klj_reg.AdapterMismatchError` instead, naming the framework and
    version the adapter declared, or a user subclass that overrides the layer's methods."""


@dataclass(frozen=True, eq=False)
class Adapter:
    """How klj-reg reads one layer type (see the module docstring and docs/adapters.md).

    Attributes:
        read: ``read(layer, call)``: the factors of a data-to-latent call.
        method: The data-to-latent call to watch: ``"__call__"`` (watched through the
            class's ``forward``, so that the layer keeps ``Module.__call__``'s fast path; a
            direct ``layer.forward(x)`` is seen too) or a method's name.
        keep: What to keep during the call, by key: a :class:`Keep`, an attribute path
            (``Keep(path)``) or a :class:`~klj_reg.kit.FunctionTap` (its latest value, or
            ``None``); or ``keep(layer)`` returning that, for keeps that depend on the layer.
        log_det: ``log_det(layer, call)``: the layer's own log-determinant of that call
            (default: ``output[1]`` when it is a tensor), checked on the first batches.
        dim: ``dim(layer, call)``: its Jacobian diagonal's length (default: the first
            tensor argument's numel per sample).
        subnets: ``subnets(layer)``: the networks whose weights ``tau`` regularises
            (default: the kept modules).
        sample: A method that runs the layer latent-to-data (normflows' ``forward``,
            nflows' ``inverse``), watched for sampling passes.
        sample_when: ``sample_when(layer, call)``: whether a call of ``method`` ran
            latent-to-data (FrEIA's ``rev=True``).
        read_sample: The factors of a latent-to-data call, of the sampling map (default:
            ``read``'s with :math:`\\log e = -\\log d`).
        prepare: ``prepare(layer)``, run once at attach (probes, maps): what it returns is
            ``call.setup``. It holds no parameter or buffer: the reader reads those during
            the call (``functional_call`` swaps them for the call only).
        install: A custom installer ``install(layer, site) -> handles`` instead of all the
            above (layers whose objects are built per call, such as zuko's transforms).
        framework: The framework errors name (``"user"``: errors point to your adapter).
        distribution: The package whose version errors name (default: ``framework``).
    """

    read: Reader | None = None
    method: str = CALL
    keep: Keeps | Callable[[Any], Keeps] = field(default_factory=dict)
    log_det: Callable[[Any, Call], Tensor | None] | None = None
    dim: Callable[[Any, Call], int] | None = None
    subnets: Callable[[Any], Iterable[nn.Module]] | None = None
    sample: str | None = None
    sample_when: Callable[[Any, Call], bool] | None = None
    read_sample: Reader | None = None
    prepare: Callable[[Any], Any] | None = None
    install: Installer | None = None
    framework: str = "user"
    distribution: str | None = None

    def reversed(self) -> Adapter:
        """The adapter of the layer run the other way round (normflows' ``Reverse``, nflows'
        ``InverseTransform``): ``sample`` is the data-to-latent call, read with
        ``read_sample``, and ``method`` the sampling one."""
        if self.install is not None or self.sample is None or self.read is None:
            raise ValueError("only an adapter with read and sample can be reversed")
        read, back = self.read, self.read_sample
        inverse = back if back is not None else _inverse_of(read)

        def read_reversed(layer: Any, call: Call) -> Factors:  # the layer's own inverse ran
            return inverse(layer, call._replace(sampling=True))

        def read_sample_reversed(layer: Any, call: Call) -> Factors:  # its own forward ran
            return read(layer, call._replace(sampling=False))

        return replace(
            self,
            method=self.sample,
            sample=self.method,
            read=read_reversed,
            read_sample=read_sample_reversed,
        )


def _inverse_of(read: Reader) -> Reader:
    def inverse(layer: Any, call: Call) -> Factors:
        factors = _factors(read(layer, call))
        return None if factors is None else inverted(factors)

    return inverse


def _factors(result: Factors) -> list[Factor] | None:
    if result is None:
        return None
    items = [result] if isinstance(result, (Tensor, Factor)) else list(result)
    return [f if isinstance(f, Factor) else Factor(source=f) for f in items]


def _resolve(layer: Any, path: str) -> Any:
    return functools.reduce(getattr, path.split("."), layer) if path else layer


def install(adapter: Adapter, layer: Any, site: Site) -> list[Handle]:
    """Install ``adapter`` on ``layer`` (the core's one installer): returns the handles."""
    if adapter.install is not None:
        return list(adapter.install(layer, site))
    try:
        setup = adapter.prepare(layer) if adapter.prepare is not None else None
    except Mismatch as error:
        raise site.mismatch(f"{site.label}: {error}") from None
    state = site.state
    handles: list[Handle] = []
    required: set[str] = set()
    taps: list[tuple[str, FunctionTap]] = []
    kept_modules: list[nn.Module] = []
    keeps = adapter.keep(layer) if callable(adapter.keep) else adapter.keep
    for key, spec in keeps.items():
        if isinstance(spec, FunctionTap):
            taps.append((key, spec))
            handles.append(spec.acquire())
            continue
        keep = Keep(spec) if isinstance(spec, str) else spec
        obj = _resolve(layer, keep.path)
        if obj is None or (keep.method == CALL and not isinstance(obj, nn.Module)):
            continue  # absent (or a plain function standing in for a network)
        if not keep.optional:
            required.add(key)
        keeper = _keeper(state, key, keep)
        if keep.method == CALL:
            handles.append(hooks.on_forward(obj, keeper))
            if obj is not layer and isinstance(obj, nn.Module):
                kept_modules.append(obj)
        else:
            handles.extend(site.watch_method(obj, keep.method, after=keeper))
    site.add_subnets(*(kept_modules if adapter.subnets is None else adapter.subnets(layer)))

    read = adapter.read
    if read is None:
        raise ValueError(f"the adapter of {type(layer).__name__} has neither read nor install")
    read_sample = adapter.read_sample
    sample_when, log_det, dim = adapter.sample_when, adapter.log_det, adapter.dim
    samples = adapter.sample is not None or sample_when is not None
    if site.sampling and not samples:
        site.no_sampling(
            "layers taught by klj_reg.register_adapter record data-to-latent calls only"
            if adapter.framework == "user"
            else f"its {adapter.framework} adapter reads data-to-latent calls only"
        )

    def begin(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state.clear()
        for _, tap in taps:
            tap.listen(True)

    read_back = read_sample if read_sample is not None else _inverse_of(read)
    name, kind, record_in = site.name, site.kind, site.sink.record

    def finisher(sample_method: bool) -> hooks.Callback:
        """After a call of ``method`` (or, ``sample_method``, of ``sample``): take what it
        kept, and record the factors of its direction (one function: the hot path; the
        record goes to the pass book directly)."""

        def finish(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
            for key, tap in taps:
                state[key] = tap.latest()
                tap.listen(False)
            if state:
                kept = state.copy()
                state.clear()
            else:
                kept = {}
            sampling = sample_method
            call = make(Call, (args, kwargs, out, kept, sampling, setup))
            if not sampling and sample_when is not None and sample_when(module, call):
                sampling, call = True, make(Call, (args, kwargs, out, kept, True, setup))
            if sampling and not site.sampling:
                return
            if required and not kept.keys() >= required:
                raise _missing(site, required, kept, sampling)
            try:
                result = read_back(module, call) if sampling else read(module, call)
            except Mismatch as error:
                raise site.mismatch(f"{site.label}: {error}") from None
            if result is None:
                return
            if isinstance(result, Factor):
                factors: tuple[Factor, ...] = (result,)
            elif isinstance(result, Tensor):
                factors = (Factor(source=result),)
            else:
                items = tuple(result)  # (of factors, as a rule: checked at C level)
                factors = (
                    items
                    if all(map(isinstance, items, (Factor,) * len(items)))
                    else tuple([f if isinstance(f, Factor) else Factor(source=f) for f in items])
                )
            if dim is not None:
                size = dim(module, call)
            else:
                # Not call.x: torch < 2.6 cannot trace a NamedTuple's property.
                x = first_argument(args, kwargs)
                size = (
                    x.shape[1:].numel()
                    if x is not None
                    else max(f.selected().shape[1:].numel() for f in factors)
                )
            own = None  # the layer's own log-det, read only while it is still checked
            # (attributes, not checks' attrgetter table: dynamo breaks the graph on that)
            if site.sample_checks_left if sampling else site.checks_left:
                own = returned_log_det(out) if log_det is None else log_det(module, call)
            record_in(site, make(LayerRecord, (name, kind, factors, own, size)), sampling)

        return finish

    # What a call keeps is cleared when it ends; before it only where taps must listen.
    start = begin if taps else None
    handles.extend(_watch(layer, site, adapter.method, start, finisher(False)))
    if adapter.sample is not None:
        handles.extend(_watch(layer, site, adapter.sample, start, finisher(True)))
    return handles


def _missing(
    site: Site, required: set[str], kept: dict[str, Any], sampling: bool
) -> AdapterMismatchError:
    missing = ", ".join(sorted(key for key in required if key not in kept))
    way = "latent-to-data" if sampling else "data-to-latent"
    return site.mismatch(
        f"{site.label} did not compute what klj-reg reads ({missing}) during its {way} call "
        "(are its subnetworks called as net(x), not net.forward(x)?)"
    )


def _keeper(state: dict[str, Any], key: str, spec: Keep) -> hooks.Callback:
    take = spec.take
    if spec.inputs:

        def keep_input(
            module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            state[key] = x if take is None else take(x)

        return keep_input
    if take is not None:

        def keep_taken(
            module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
        ) -> None:
            state[key] = take(out)

        return keep_taken

    def keep(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> None:
        state[key] = out

    return keep


def _watch(
    layer: Any,
    site: Site,
    method: str,
    before: hooks.Callback | None,
    after: hooks.Callback,
) -> list[Handle]:
    # A layer's Module.__call__ is watched through its class's ``forward`` (patched while the
    # capture holds it), not torch's forward hooks: a module without hooks takes
    # ``Module.__call__``'s fast path, and torch's hook path (about 100 bytecodes and three
    # Python calls per call) is not paid for each captured layer.
    return site.watch_method(
        layer, "forward" if method == CALL else method, before=before, after=after
    )


def legacy(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` takes ``(layer, inputs, output)`` (the short form) rather than
    ``(layer, call)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) >= 3


def from_short(fn: Callable[..., Any]) -> Callable[[Any, Call], Any]:
    """``fn(layer, inputs, output)`` as ``fn(layer, call)``."""
    if not legacy(fn):
        return fn

    def read(layer: Any, call: Call) -> Any:
        return fn(layer, call.args, call.output)

    return read


class Parts:
    """A layer recorded as one record made of its parts' (nflows' ``InverseTransform`` of a
    ``CompositeTransform``): each part is installed with its own adapter (:meth:`install`) on
    a site whose records go into the layer's; the layer's own call (:meth:`watch`) records
    them together, with the layer's log-determinant."""

    def __init__(self, site: Site) -> None:
        self.site = site
        self.factors: list[Factor] = []

    def record(self, site: Site, record: Any, sampling: bool = False) -> None:
        """A part's record (the sink of the parts' sites)."""
        self.factors.extend(record.factors)

    def has_record(self, site: Site) -> bool:
        return False

    def install(self, adapter: Adapter, module: Any, name: str) -> list[Handle]:
        """Install ``adapter`` on the part ``module`` (``name``: for messages)."""
        part = Site(
            self,
            name,
            module,
            adapter.framework,
            self.site.sampling,
            distribution=adapter.distribution,
            patches=self.site.patches,
        )
        handles = install(adapter, module, part)
        self.site.add_subnets(*part.subnets)
        if part.unsampled is not None:
            self.site.no_sampling(f"{part.label}: {part.unsampled}")
        return handles

    def watch(
        self,
        layer: Any,
        method: str = CALL,
        *,
        sample: str | None = None,
        log_det: Callable[[Any, Call], Tensor | None] | None = None,
    ) -> list[Handle]:
        """Record the parts' factors after each call of ``layer``'s ``method`` (and, for
        sampling passes, of ``sample``), with its log-determinant (``output[1]``)."""
        site, factors = self.site, self.factors

        def begin(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            factors.clear()

        def finisher(sampling: bool) -> hooks.Callback:
            def finish(
                module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any
            ) -> None:
                found = factors.copy()
                factors.clear()
                if not found or (sampling and not site.sampling):
                    return
                call = Call(args, kwargs, out, {}, sampling)
                x = call.x
                size = x.shape[1:].numel() if x is not None else 1
                own = call.log_det if log_det is None else log_det(module, call)
                site.record(found, own, size, sampling)

            return finish

        handles = _watch(layer, site, method, begin, finisher(False))
        if sample is not None:
            handles += _watch(layer, site, sample, begin, finisher(True))
        return handles
