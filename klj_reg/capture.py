"""Capture: for each supported layer, the factors of its calls, grouped by pass.

``attach(model)`` walks the model once and lets each supported layer's adapter install its
callbacks (:mod:`klj_reg.kit`), and the model's adapter its entry, where each data-to-latent
pass begins (:mod:`klj_reg.passes`); ``attach(model, direction="sample")`` (or ``"both"``)
records the model's latent-to-data sampling passes as well (or instead). The callbacks keep
references to tensors the layers compute anyway. Nothing is stored on the model but an
empty-when-copied binding per watched module (:mod:`klj_reg.hooks`): the capture of a model
lives in its root module's binding, so ``copy.deepcopy`` and ``pickle`` give an unattached
copy, whatever the model ran before.
"""

from __future__ import annotations

import gc
import sys
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torch.distributions import Distribution

from . import hooks, reader, registry
from .errors import CompileOrderError, UnsupportedModelError
from .kit import Door, Handle, Site, TapRelease, module_entry
from .passes import DIRECTIONS, Pass, PassBook
from .records import LayerRecord
from .shape import Shape


def not_a_module_fix(model: Any) -> str:
    """The fix for a model that is not an ``nn.Module``: what its framework's adapter says
    (e.g. zuko's, for the distribution ``flow(c)`` builds), else for a distribution or a
    plain function."""
    fix = registry.misuse_for(type(model))
    if fix is not None:
        return fix
    if isinstance(model, Distribution):
        return (
            f"pass the nn.Module that builds or holds this {type(model).__name__}, not the "
            "distribution."
        )
    return (
        "for a plain function x -> (z, log_det) use penalty(fn, x, estimator='exact' or "
        "'hutchinson')."
    )


class Capture:
    """The capture state of one model: its sites, hook handles and passes."""

    def __init__(self, model: nn.Module, direction: str = "data") -> None:
        self.model_name = type(model).__name__
        self.direction = direction
        self.sites: dict[str, Site] = {}
        self.book = PassBook(self.model_name, direction)
        self.handles: list[Handle] = []
        self.warned_own_pass = False
        self.compiled: dict[tuple[object, ...], Any] = {}
        self.finite: Any = None  # checks.FiniteWatch, created on first use
        self.monitors: list[Any] = []  # monitor.Monitor objects fed by each penalty
        self.patches = hooks.Patches()  # the class patches this capture holds
        self.finalizer: weakref.finalize | None = None  # gives them back if the model goes
        self.shape: Shape | None = None  # the module tree at attach, checked by each pass

    @property
    def records(self) -> dict[str, LayerRecord]:
        """The records of the latest pass (grad-mode first), by layer name; ``{}`` if none."""
        latest = self.book.latest()
        return {} if latest is None else latest.records

    def take(self) -> list[LayerRecord]:
        """The records of the latest pass (grad-mode first), removing it; ``[]`` if none."""
        latest = self.book.latest()
        if latest is None:
            return []
        if latest is self.book.latest_no_grad:
            self.book.latest_no_grad = None
        else:
            self.book.grad.remove(latest)
        return list(latest.records.values())

    def take_pass(
        self, x: Tensor | None, any_mode: bool = False, direction: str | None = None
    ) -> Pass | None:
        """The pass a penalty on ``x`` reads (see :meth:`PassBook.take`), removed."""
        return self.book.take(x, any_mode, direction)

    def subnet_parameters(self) -> Iterator[nn.Parameter]:
        """Weight matrices/kernels (ndim >= 2) of every captured layer's subnetworks."""
        seen: set[int] = set()
        for site in self.sites.values():
            for net in site.subnets:
                for p in net.parameters():
                    if p.dim() >= 2 and id(p) not in seen:
                        seen.add(id(p))
                        yield p

    def remove(self) -> None:
        """Remove every hook and patch, and drop all records."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        if self.finalizer is not None:
            self.finalizer.detach()  # the handles and patches go back here, now
            self.finalizer = None
        self.patches.release()
        self.book.clear()
        self.sites.clear()
        self.compiled.clear()


def unwrap(model: Any) -> Any:
    """The user's module behind DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        # torch.compile's wrapper holds the module as a child: looked up in ``_modules``,
        # not by hasattr (nn.Module.__getattr__ raises and catches for every other model).
        if isinstance(model, nn.Module) and "_orig_mod" in model._modules:
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            if isinstance(model, nn.DataParallel) and not isinstance(
                model, nn.parallel.DistributedDataParallel
            ):
                raise UnsupportedModelError(
                    "nn.DataParallel runs hooks on per-device replicas in threads; klj-reg "
                    "supports DistributedDataParallel (torchrun) instead."
                )
            model = model.module
        else:
            return model


def _is_compiled(model: Any) -> bool:
    return (isinstance(model, nn.Module) and hasattr(model, "_orig_mod")) or any(
        getattr(m, "_compiled_call_impl", None) is not None for m in model.modules()
    )


def _compiled_wrapper_ran(model: nn.Module) -> bool:
    """Whether a ``torch.compile`` wrapper of ``model`` exists after dynamo compiled frames
    in this process: the wrapper's compiled code would skip hooks added now."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None or not dynamo.counters["frames"]["total"]:
        return False
    from torch._dynamo.eval_frame import OptimizedModule

    # model <- the wrapper's _modules dict <- the wrapper's __dict__ <- the wrapper
    level: list[Any] = [model]
    for _ in range(3):
        level = [r for obj in level for r in gc.get_referrers(obj) if isinstance(r, dict)] + [
            r for obj in level for r in gc.get_referrers(obj) if isinstance(r, OptimizedModule)
        ]
        if any(isinstance(r, OptimizedModule) and r._orig_mod is model for r in level):
            return True
        level = [r for r in level if isinstance(r, dict) and len(r) < 64]
    return False


def get_capture(model: Any) -> Capture | None:
    """The capture attached to ``model`` (through wrappers), or ``None``."""
    model = unwrap(model)
    found = hooks.binding(model) if isinstance(model, nn.Module) else None
    capture: Capture | None = None if found is None else found.capture
    return capture


def _install(capture: Capture, name: str, module: nn.Module) -> None:
    found = registry.adapter_for(type(module))
    if found is not None:
        known, adapter = found
        site = Site(
            capture.book,
            name,
            module,
            adapter.framework,
            capture.book.sampling,
            distribution=adapter.distribution,
            known=known,
            patches=capture.patches,
        )
        capture.sites[name] = site
        capture.handles.extend(reader.install(adapter, module, site))
        return
    for child_name, child in module.named_children():
        _install(capture, f"{name}.{child_name}" if name else child_name, child)


def _entry(model: nn.Module, capture: Capture) -> list[Handle]:
    """The model's entry: its class's, else the one framework of its captured layers' pass
    entry, else its own ``__call__``."""
    door = Door(capture.book, capture.patches)
    entry = registry.entry_for(type(model))
    if entry is None:
        frameworks = {site.framework for site in capture.sites.values()}
        if len(frameworks) == 1:
            entry = registry.pass_entry(frameworks.pop())
    return list(module_entry(model, door) if entry is None else entry(model, door))


def _left_out(model: nn.Module, capture: Capture) -> list[str]:
    """Invertible layers of a known framework that are neither captured nor neutral."""
    covered = [site.module for site in capture.sites.values()]
    inside = {id(m) for c in covered for m in c.modules()}
    left = []
    for name, module in model.named_modules():
        cls = type(module)
        if id(module) in inside or registry.is_neutral(cls) or registry.flow_base(cls) is None:
            continue
        if any(
            isinstance(child, nn.Module) and registry.flow_base(type(child))
            for child in module.children()
        ):
            continue  # a container of flow layers
        left.append(f"{name or '<model>'} ({cls.__name__})")
    return left


def attach(model: nn.Module, direction: str = "data") -> Capture:
    """Install capture hooks on every supported layer of ``model`` (on an attached model: a
    no-op, or a new scan if its module tree changed since).

    Call it before ``torch.compile``; :func:`klj_reg.penalty` calls it on first use
    otherwise. Raises :class:`UnsupportedModelError` when no layer is supported, and
    :class:`CompileOrderError` when ``model`` (or a ``torch.compile`` wrapper of it that
    already ran) is compiled.

    Args:
        model: The flow.
        direction: Which passes are recorded: ``"data"`` (default) the data-to-latent
            passes (``log_prob``, ``forward_kld``, FrEIA's ``rev=False``); ``"sample"`` the
            latent-to-data sampling passes (normflows' ``sample`` / ``reverse_kld``, zuko's
            ``rsample_and_log_prob``, nflows' ``sample_and_log_prob``, FrEIA's ``rev=True``),
            whose penalty is the KLJ term of the sampling map; ``"both"`` either. A model
            already attached with another direction raises ``ValueError`` (detach it
            first); a layer whose sampling calls cannot be read raises
            :class:`UnsupportedModelError` for ``"sample"`` and ``"both"``.
    """
    if direction not in DIRECTIONS:
        raise ValueError(
            f"direction must be one of {DIRECTIONS} ('data': data-to-latent passes such as "
            "log_prob; 'sample': sampling passes such as reverse_kld or "
            f"rsample_and_log_prob; 'both'), got {direction!r}"
        )
    give_back_collected()
    existing = get_capture(model)
    if existing is not None:
        if existing.direction != direction:
            raise ValueError(
                f"{existing.model_name} is already attached with direction="
                f"{existing.direction!r} (klj_reg.penalty attaches with the default 'data' on "
                "first use): call klj_reg.detach(model), then klj_reg.attach(model, "
                f"direction={direction!r}), before the model's first pass."
            )
        if existing.shape is None or not existing.shape.changed():
            return existing
        detach(model)  # the model changed since attach: scan it again
    inner = unwrap(model)
    if isinstance(model, nn.Module) and (
        _is_compiled(model) or (isinstance(inner, nn.Module) and _compiled_wrapper_ran(inner))
    ):
        raise CompileOrderError(
            f"{type(inner).__name__} was compiled before klj_reg.attach: hooks added "
            "after torch.compile are skipped by the compiled graph. Call "
            "klj_reg.attach(model) first, then torch.compile(model)."
        )
    model = inner
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"klj_reg.attach needs a torch.nn.Module, not {type(model).__name__}; "
            + not_a_module_fix(model)
        )
    hooks.strip_inert(model)
    capture = Capture(model, direction)
    _install(capture, "", model)
    if not capture.sites:
        capture.remove()
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise UnsupportedModelError(
            f"no layer of {type(model).__name__} is supported by klj-reg (classes found: "
            f"{', '.join(kinds)}). Register yours with klj_reg.register_adapter(LayerType, "
            "fn), or use penalty(model, x, estimator='exact' or 'hutchinson')."
        )
    unsampled = [f"{s.label}: {s.unsampled}" for s in capture.sites.values() if s.unsampled]
    if capture.book.sampling and unsampled:
        capture.remove()
        raise UnsupportedModelError(
            f"klj-reg cannot read the sampling pass of these layers of {type(model).__name__}: "
            + "; ".join(unsampled)
            + ". Attach with direction='data' and train it by maximum likelihood, or use "
            "penalty(fn, x, estimator='exact' or 'hutchinson') on the data-to-latent map."
        )
    capture.handles.extend(_entry(model, capture))
    capture.shape = Shape(model, ((n, s.module, s.subnets) for n, s in capture.sites.items()))
    capture.book.check = capture.shape.check
    left = _left_out(model, capture)
    if left:
        warnings.warn(
            "klj-reg does not regularise these invertible layers (no adapter): "
            + ", ".join(left)
            + ". Register them with klj_reg.register_adapter if they scale their input.",
            stacklevel=2,
        )
    hooks.bind(model).capture = capture
    # A model dropped without detach gives its patches back once it is collected (the
    # finalizer holds no module, only classes and taps); detach removes the finalizer.
    taps = [h for h in capture.handles if isinstance(h, (TapRelease, hooks.Patches))]
    capture.finalizer = weakref.finalize(model, _collected.append, [capture.patches, *taps])
    return capture


_collected: list[list[Any]] = []
"""The patches and taps of models collected without :func:`detach`, given back by the next
:func:`attach` or :func:`detach`, not by the finalizer itself: the garbage collector runs
finalizers at any allocation, also while ``torch.compile`` traces a wrapped method, and a
class method restored between the trace and its guards fails that compile (dynamo guards
the wrapper's closure). Until then a left-over wrapper only calls the original method."""


def give_back_collected() -> None:
    """Give back the patches and taps of models collected without :func:`detach`."""
    while _collected:
        for release in _collected.pop():
            release.remove()


def detach(model: nn.Module) -> None:
    """Remove ``model``'s capture hooks and records (no-op if not attached), and give back
    the class patches of models collected without ``detach``."""
    give_back_collected()
    capture = get_capture(model)
    if capture is not None:
        capture.remove()
        root = unwrap(model)
        found = hooks.binding(root)
        if found is not None:
            found.capture = None
            if found.empty():
                root.__dict__.pop(hooks.KEY, None)


def clear(model: nn.Module) -> None:
    """Forget every captured pass of ``model`` (e.g. after evaluation passes)."""
    capture = get_capture(model)
    if capture is not None:
        capture.book.clear()


@contextmanager
def capturing(model: nn.Module, direction: str = "data") -> Iterator[Capture]:
    """Attach on entry (with ``direction``, as :func:`attach`) and detach on exit (unless it
    was already attached)."""
    was_attached = get_capture(model) is not None
    capture = attach(model, direction)
    try:
        yield capture
    finally:
        if not was_attached:
            detach(model)
