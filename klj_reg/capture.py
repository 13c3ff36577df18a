"""Capture: hooks that keep, for each supported layer, the factors of its latest forward call.

``attach(model)`` walks the model once and lets each supported layer's adapter install its
hooks. The hooks store references to tensors the layer computes anyway, keyed by layer, so a
capture never holds more than one record per layer; :func:`klj_reg.penalty` takes and clears
them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn

from . import patch, registry
from .errors import CompileOrderError, UnsupportedModelError
from .records import Factor, LayerRecord

ATTRIBUTE = "_klj_capture"
MAX_CHECKS = 100
"""Batches on which a layer is checked against its own log-det while its scales are ~1."""


class Site:
    """One captured layer: its adapter's hooks call :meth:`record` on data-to-latent calls."""

    __slots__ = (
        "capture",
        "name",
        "module",
        "kind",
        "framework",
        "checks_left",
        "subnets",
        "state",
    )

    def __init__(self, capture: Capture, name: str, module: nn.Module) -> None:
        self.capture = capture
        self.name = name
        self.module = module
        self.kind = type(module).__name__
        self.framework = registry.framework_of(type(module)) or "user"
        self.checks_left = MAX_CHECKS
        self.subnets: list[nn.Module] = []
        self.state: dict[str, Any] = {}

    def record(self, factors: Iterable[Factor], log_det: Tensor | None, dim: int) -> None:
        """Store this layer's factors from the call that just ran (replacing older ones)."""
        self.capture.records[self.name] = LayerRecord(
            self.name, self.kind, tuple(factors), log_det, dim
        )

    def forward_hook(self, module: nn.Module, fn: Any, *, with_kwargs: bool = False) -> Any:
        """Register ``fn`` as a forward hook of ``module``, tagged as klj-reg's."""
        return module.register_forward_hook(mark_hook(fn), with_kwargs=with_kwargs)

    def add_subnets(self, *modules: nn.Module) -> None:
        """Mark the layer's coupling subnetworks, whose weights ``tau`` regularises."""
        self.subnets.extend(modules)


class Capture:
    """The capture state of one model: its sites, hook handles and latest records."""

    def __init__(self, model: nn.Module) -> None:
        self.owner = id(model)
        self.sites: dict[str, Site] = {}
        self.records: dict[str, LayerRecord] = {}
        self.handles: list[registry.Handle] = []
        self.warned_own_pass = False
        self.compiled: dict[tuple[object, ...], Any] = {}

    def take(self) -> list[LayerRecord]:
        """The records of the latest pass, removing them from the capture."""
        records = list(self.records.values())
        self.records.clear()
        return records

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
        self.records.clear()
        self.sites.clear()
        self.compiled.clear()


def unwrap(model: Any) -> Any:
    """The user's module behind DDP / DataParallel / ``torch.compile`` wrappers."""
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model, nn.Module):
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


def get_capture(model: Any) -> Capture | None:
    """The capture attached to ``model`` (through wrappers), or ``None``."""
    model = unwrap(model)
    capture = model.__dict__.get(ATTRIBUTE) if isinstance(model, nn.Module) else None
    return capture if capture is not None and capture.owner == id(model) else None


def _strip_copied_hooks(model: nn.Module) -> None:
    """Remove hooks a ``deepcopy`` of an attached model carried over from the original."""
    for module in model.modules():
        for hooks in (module._forward_hooks, module._forward_pre_hooks):
            for key in [k for k, fn in hooks.items() if getattr(fn, "_klj_hook", False)]:
                del hooks[key]
        module.__dict__.pop(patch.INSTANCE_KEY, None)
    model.__dict__.pop(ATTRIBUTE, None)


def _install(capture: Capture, name: str, module: nn.Module) -> None:
    installer = registry.installer_for(type(module))
    if installer is not None:
        site = Site(capture, name, module)
        capture.sites[name] = site
        for handle in installer(module, site):
            capture.handles.append(handle)
        return
    for child_name, child in module.named_children():
        _install(capture, f"{name}.{child_name}" if name else child_name, child)


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


def attach(model: nn.Module) -> Capture:
    """Install capture hooks on every supported layer of ``model`` (idempotent).

    Call it before ``torch.compile``; :func:`klj_reg.penalty` calls it on first use
    otherwise. Raises :class:`UnsupportedModelError` when no layer is supported.
    """
    existing = get_capture(model)
    if existing is not None:
        return existing
    if isinstance(model, nn.Module) and _is_compiled(model):
        raise CompileOrderError(
            f"{type(unwrap(model)).__name__} was compiled before klj_reg.attach: hooks added "
            "after torch.compile are skipped by the compiled graph. Call "
            "klj_reg.attach(model) first, then torch.compile(model)."
        )
    model = unwrap(model)
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"klj_reg.attach needs a torch.nn.Module, not {type(model).__name__}; for a plain "
            "function x -> (z, log_det) use penalty(fn, x, estimator='exact' or 'hutchinson')."
        )
    if ATTRIBUTE in model.__dict__:
        _strip_copied_hooks(model)
    capture = Capture(model)
    _install(capture, "", model)
    if not capture.sites:
        capture.remove()
        kinds = sorted({type(m).__name__ for m in model.modules()})
        raise UnsupportedModelError(
            f"no layer of {type(model).__name__} is supported by klj-reg (classes found: "
            f"{', '.join(kinds)}). Register yours with klj_reg.register_adapter(LayerType, "
            "fn), or use penalty(model, x, estimator='exact' or 'hutchinson')."
        )
    left = _left_out(model, capture)
    if left:
        warnings.warn(
            "klj-reg does not regularise these invertible layers (no adapter): "
            + ", ".join(left)
            + ". Register them with klj_reg.register_adapter if they scale their input.",
            stacklevel=2,
        )
    model.__dict__[ATTRIBUTE] = capture
    return capture


def detach(model: nn.Module) -> None:
    """Remove ``model``'s capture hooks and records (no-op if not attached)."""
    capture = get_capture(model)
    if capture is not None:
        capture.remove()
        unwrap(model).__dict__.pop(ATTRIBUTE, None)


def clear(model: nn.Module) -> None:
    """Drop the records of ``model``'s latest pass (e.g. after an evaluation pass)."""
    capture = get_capture(model)
    if capture is not None:
        capture.records.clear()


@contextmanager
def capturing(model: nn.Module) -> Iterator[Capture]:
    """Attach on entry and detach on exit (unless it was already attached)."""
    was_attached = get_capture(model) is not None
    capture = attach(model)
    try:
        yield capture
    finally:
        if not was_attached:
            detach(model)


def mark_hook(fn: Any) -> Any:
    """Tag a hook function as klj-reg's (so copies of a model can be cleaned)."""
    fn._klj_hook = True
    return fn
