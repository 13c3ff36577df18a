"""Hooks that find what to do through the module they run on.

Every module klj-reg watches carries one :class:`Binding` in its ``__dict__`` and at most one
dispatcher per kind of hook (forward pre-hook, forward hook) in torch's hook tables. A
dispatcher is a module-level callable holding nothing: when it runs, it looks the module's
binding up and calls the callbacks there. A method that frameworks call directly rather than
through ``Module.__call__`` (normflows' ``flow.inverse``) is watched the same way: its class
attribute is wrapped once (:func:`watch_method`) and the wrapper dispatches to the callbacks
of the instance it runs on.

A binding's copy is empty: ``copy.deepcopy`` (EMA and SWA copies, ``AveragedModel``) carries
the dispatchers over, which then find nothing to call, so a copy never records into the
original's capture, and the records (tensors inside the user's autograd graph) are never
copied. A pickle (``torch.save(model)``) holds nothing of klj-reg, so it loads where klj-reg
is not installed: a binding is pickled as ``None`` and each dispatcher as :data:`INERT`, a
built-in that takes any arguments and does nothing (the hook tables keep their shape;
``attach`` removes those).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from torch import nn

KEY = "_klj_binding"

Callback = Callable[..., Any]
"""``pre``: ``(module, args, kwargs)``; ``forward``: ``(module, args, kwargs, output)``;
methods: ``before`` ``(module, args, kwargs)``, ``after`` ``(module, args, kwargs, output)``,
``final`` ``(module)``."""


class Binding:
    """What klj-reg keeps on one module: the callbacks its dispatchers call, and on the root
    of an attached model, its capture. Copies (``deepcopy``, ``pickle``) are empty."""

    __slots__ = (
        "pre",
        "forward",
        "ended",
        "before",
        "after",
        "final",
        "handles",
        "capture",
        "shared",
    )

    def __init__(self) -> None:
        self.shared = False
        """Whether objects share it (:class:`Prepared`): copied before any change."""
        self.pre: list[Callback] = []
        self.forward: list[Callback] = []
        self.ended: list[Callback] = []
        self.before: dict[str, list[Callback]] = {}
        self.after: dict[str, list[Callback]] = {}
        self.final: dict[str, list[Callback]] = {}
        self.handles: dict[str, Any] = {}
        self.capture: Any = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Binding:
        return Binding()

    def __copy__(self) -> Binding:
        return Binding()

    def __reduce__(self) -> tuple[type[None], tuple[()]]:
        return type(None), ()  # loads as None: nothing of klj-reg in a pickle

    def empty(self) -> bool:
        """No callback and no capture left."""
        return not (
            self.pre
            or self.forward
            or self.ended
            or any(self.before.values())
            or any(self.after.values())
            or any(self.final.values())
            or self.capture is not None
        )


def binding(module: nn.Module) -> Binding | None:
    """The module's binding, or ``None``."""
    found: Binding | None = module.__dict__.get(KEY)
    return found


def bind(module: nn.Module) -> Binding:
    """The module's binding, its own (a shared one copied), created on first use."""
    return _own(module)


INERT = (getattr, (slice(None), "__init__"))
"""What a dispatcher is pickled as: ``slice(None).__init__``, a built-in that accepts any
arguments and returns ``None`` (``object.__init__`` of a type with its own ``__new__``), so
that a pickled model's hooks load and run, doing nothing, without klj-reg."""


def is_inert(hook: Any) -> bool:
    """Whether ``hook`` is what a pickled dispatcher loads as (:data:`INERT`)."""
    return isinstance(getattr(hook, "__self__", None), slice) and hook.__name__ == "__init__"


class _Dispatch:
    """What every dispatcher shares: it holds nothing, so a copy is itself, and a pickle of it
    is :data:`INERT`."""

    __slots__ = ()

    def __reduce__(self) -> tuple[Any, ...]:
        return INERT

    def __copy__(self) -> _Dispatch:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> _Dispatch:
        return self


class PreDispatch(_Dispatch):
    """A forward pre-hook (with kwargs) calling the module's ``pre`` callbacks."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        found = module.__dict__.get(KEY)
        if found is not None:
            for fn in found.pre:
                fn(module, args, kwargs)


class ForwardDispatch(_Dispatch):
    """A forward hook (with kwargs) calling the module's ``forward`` callbacks."""

    __slots__ = ()

    def __call__(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        found = module.__dict__.get(KEY)
        if found is not None:
            for fn in found.forward:
                fn(module, args, kwargs, output)


class EndDispatch(_Dispatch):
    """A forward hook run whether the call returns or raises (``always_call``), calling the
    module's ``ended`` callbacks with the module."""

    __slots__ = ()

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        found = module.__dict__.get(KEY)
        if found is not None:
            for fn in found.ended:
                fn(module)


DISPATCHERS = (PreDispatch, ForwardDispatch, EndDispatch)
_KINDS = {"pre": PreDispatch, "forward": ForwardDispatch, "ended": EndDispatch}


def _install_dispatcher(module: nn.Module, found: Binding, kind: str) -> None:
    if kind in found.handles:
        return
    cls = _KINDS[kind]
    # A copy of a watched module carries a dispatcher over: replace it.
    table = module._forward_pre_hooks if kind == "pre" else module._forward_hooks
    for key, hook in list(table.items()):
        if type(hook) is cls or is_inert(hook):
            del table[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    if kind == "pre":
        found.handles[kind] = module.register_forward_pre_hook(PreDispatch(), with_kwargs=True)
    elif kind == "forward":
        found.handles[kind] = module.register_forward_hook(ForwardDispatch(), with_kwargs=True)
    else:
        found.handles[kind] = module.register_forward_hook(EndDispatch(), always_call=True)


class Handle:
    """Removes one callback; the module's dispatcher (or method wrapper) goes with the last."""

    __slots__ = ("module", "kind", "name", "fn")

    def __init__(self, module: nn.Module, kind: str, name: str | None, fn: Callback) -> None:
        self.module, self.kind, self.name, self.fn = module, kind, name, fn

    def remove(self) -> None:
        found = binding(self.module)
        if found is None:
            return
        if self.name is None:
            callbacks: list[Callback] = getattr(found, self.kind)
            if self.fn in callbacks:
                callbacks.remove(self.fn)
            if not callbacks and self.kind in found.handles:
                found.handles.pop(self.kind).remove()
        else:
            table: dict[str, list[Callback]] = getattr(found, self.kind)
            callbacks = table.get(self.name, [])
            if self.fn in callbacks:
                callbacks.remove(self.fn)
        if found.empty():
            self.module.__dict__.pop(KEY, None)


def _on(module: nn.Module, kind: str, fn: Callback) -> Handle:
    found = bind(module)
    _install_dispatcher(module, found, kind)
    getattr(found, kind).append(fn)
    return Handle(module, kind, None, fn)


def on_pre(module: nn.Module, fn: Callback) -> Handle:
    """Call ``fn(module, args, kwargs)`` before each ``module(...)``."""
    return _on(module, "pre", fn)


def on_forward(module: nn.Module, fn: Callback) -> Handle:
    """Call ``fn(module, args, kwargs, output)`` after each ``module(...)``."""
    return _on(module, "forward", fn)


def on_end(module: nn.Module, fn: Callback) -> Handle:
    """Call ``fn(module)`` after each ``module(...)``, whether it returns or raises."""
    return _on(module, "ended", fn)


# Methods called directly --------------------------------------------------------------------

_patched: dict[tuple[type, str], tuple[Any, bool, int, Any]] = {}
"""(class, method) -> (original attribute, whether the class defined it, holders, wrapper)."""


def _wrap(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        found = self.__dict__.get(KEY)
        # Only the outermost wrapper dispatches (a patched subclass may call super().name).
        if found is None or getattr(type(self), name) is not wrapper:
            return original(self, *args, **kwargs)
        for fn in found.before.get(name, ()):
            fn(self, args, kwargs)
        final = found.final.get(name)
        if not final:
            out = original(self, *args, **kwargs)
            for fn in found.after.get(name, ()):
                fn(self, args, kwargs, out)
            return out
        # ``final`` last: an entry's ends the pass that the layer's ``after`` records into.
        try:
            out = original(self, *args, **kwargs)
            for fn in found.after.get(name, ()):
                fn(self, args, kwargs, out)
        finally:
            for fn in final:
                fn(self)
        return out

    wrapper._klj_wrapper = True  # type: ignore[attr-defined]
    return wrapper


def _patch_method(cls: type, name: str) -> None:
    key = (cls, name)
    found = _patched.get(key)
    if found is not None and cls.__dict__.get(name) is found[3]:
        _patched[key] = (*found[:2], found[2] + 1, found[3])
        return
    # First holder, or someone else replaced our wrapper (a test's monkeypatch): wrap what
    # is there now, and give that back when the last holder goes.
    had_own = name in cls.__dict__
    original = cls.__dict__[name] if had_own else getattr(cls, name)
    wrapper = _wrap(getattr(cls, name), name)
    _patched[key] = (original, had_own, 1 if found is None else found[2] + 1, wrapper)
    setattr(cls, name, wrapper)


def _release_method(cls: type, name: str) -> None:
    key = (cls, name)
    if key not in _patched:
        return
    original, had_own, count, wrapper = _patched[key]
    if count > 1:
        _patched[key] = (original, had_own, count - 1, wrapper)
        return
    del _patched[key]
    if cls.__dict__.get(name) is not wrapper:
        return  # replaced since (and restored by whoever replaced it)
    _unwrap(cls, name, original, had_own)


def _unwrap(cls: type, name: str, original: Any, had_own: bool) -> None:
    """Put back what ``cls.<name>`` was before klj-reg wrapped it."""
    if had_own:
        setattr(cls, name, original)
    else:
        delattr(cls, name)


def defined_by(cls: type, name: str) -> type | None:
    """The class in ``cls``'s MRO whose own attribute ``name`` is, klj-reg's wrappers aside
    (a wrapper on a class that did not define ``name`` is looked through)."""
    for c in cls.__mro__:
        if name in c.__dict__:
            entry = _patched.get((c, name))
            if entry is not None and c.__dict__[name] is entry[3] and not entry[1]:
                continue
            return c
    return None


@contextlib.contextmanager
def lifted() -> Iterator[None]:
    """Every class patch taken off for the block and put back after it (for measurement: a
    plain model timed in the process of an attached one runs without the wrappers its
    classes carry meanwhile). Callbacks registered on objects stay; they are not called
    while lifted."""
    taken = []
    for (cls, name), (original, had_own, _, wrapper) in list(_patched.items()):
        if cls.__dict__.get(name) is wrapper:
            _unwrap(cls, name, original, had_own)
            taken.append((cls, name, wrapper))
    try:
        yield
    finally:
        for cls, name, wrapper in taken:
            setattr(cls, name, wrapper)


class Patches:
    """The class patches one capture holds, each ``(class, method)`` once. It holds no module
    (only classes), so a capture's patches can be given back after its model is collected
    (:func:`klj_reg.capture.give_back_collected`): :meth:`release` restores each class whose
    last holder this was."""

    __slots__ = ("held",)

    def __init__(self) -> None:
        self.held: set[tuple[type, str]] = set()

    def hold(self, cls: type, name: str) -> None:
        """Wrap ``cls.<name>`` (if this holder has not already)."""
        if (cls, name) not in self.held:
            _patch_method(cls, name)
            self.held.add((cls, name))

    def release(self) -> None:
        """Give every patch back (idempotent)."""
        for cls, name in self.held:
            _release_method(cls, name)
        self.held.clear()

    remove = release


def watch_method(
    obj: Any,
    name: str,
    *,
    before: Callback | None = None,
    after: Callback | None = None,
    final: Callback | None = None,
    patches: Patches | None = None,
) -> list[Any]:
    """Call ``before(obj, args, kwargs)``, ``after(obj, args, kwargs, output)`` (when it
    returns) and ``final(obj)`` (whether it or an ``after`` returns or raises, last) around
    each ``obj.<name>(...)``, a method the framework calls directly (``obj``: any object with a
    ``__dict__``, a module or a per-call transform). The class's method is wrapped while
    ``patches`` holds it (without ``patches``, the last handle returned gives it back)."""
    found = bind(obj)
    own = Patches() if patches is None else patches
    own.hold(type(obj), name)
    handles: list[Any] = []
    for kind, fn in (("before", before), ("after", after), ("final", final)):
        if fn is None:
            continue
        table: dict[str, list[Callback]] = getattr(found, kind)
        table.setdefault(name, []).append(fn)
        handles.append(Handle(obj, kind, name, fn))
    if patches is None:
        handles.append(own)
    return handles


class On(NamedTuple):
    """The callbacks of :func:`watch_method` around one method, ``name``."""

    name: str
    before: Callback | None = None
    after: Callback | None = None
    final: Callback | None = None


def _add(found: Binding, on: On) -> None:
    for kind, fn in (("before", on.before), ("after", on.after), ("final", on.final)):
        if fn is not None:
            table: dict[str, list[Callback]] = getattr(found, kind)
            table.setdefault(on.name, []).append(fn)


def _own(obj: Any) -> Binding:
    """``obj``'s binding, its own (a shared one copied), created on first use."""
    found = obj.__dict__.get(KEY)
    if not isinstance(found, Binding):  # none yet (or a pickle's None)
        found = obj.__dict__[KEY] = Binding()
    elif found.shared:
        own = Binding()
        for kind in ("before", "after", "final"):
            setattr(own, kind, {k: list(v) for k, v in getattr(found, kind).items()})
        found = obj.__dict__[KEY] = own
    return found


class Prepared:
    """Callbacks for the objects met during a pass (a transform built per call), made once:
    ``prepared(obj)`` gives ``obj`` the callbacks of each :class:`On`, sharing one binding
    among all such objects (no allocation per object; one that has callbacks already gets
    its own copy, with these after its own). ``patches`` holds the methods of each class met
    (hold them at install too, so that no class changes inside a compiled call)."""

    __slots__ = ("binding", "names", "patches", "classes")

    def __init__(self, *ons: On, patches: Patches) -> None:
        self.binding = Binding()
        self.binding.shared = True
        for on in ons:
            _add(self.binding, on)
        self.names = tuple(dict.fromkeys(on.name for on in ons))
        self.patches = patches
        self.classes: set[type] = set()

    def __call__(self, obj: Any) -> None:
        cls = type(obj)
        if cls not in self.classes:
            for name in self.names:
                self.patches.hold(cls, name)
            self.classes.add(cls)
        table = obj.__dict__
        if table.get(KEY) is None:
            table[KEY] = self.binding
            return
        found = _own(obj)
        for kind in ("before", "after", "final"):
            mine: dict[str, list[Callback]] = getattr(found, kind)
            for name, fns in getattr(self.binding, kind).items():
                mine.setdefault(name, []).extend(fns)


def add_callbacks(
    obj: Any,
    name: str,
    *,
    before: Callback | None = None,
    after: Callback | None = None,
    final: Callback | None = None,
) -> None:
    """The callbacks of :func:`watch_method` on an object met during a pass (a transform
    built per call), whose class's method its capture already holds: no handles (the
    callbacks go with the object)."""
    _add(_own(obj), On(name, before, after, final))


def strip_inert(module: nn.Module) -> None:
    """Remove the dispatchers and empty bindings that copies of watched modules carried over,
    and what a pickle of them loads as (modules watched for another attached model keep
    theirs)."""
    for sub in module.modules():
        found = binding(sub)
        if found is not None and not found.empty():
            continue
        sub.__dict__.pop(KEY, None)
        for table, kwargs in (
            (sub._forward_pre_hooks, sub._forward_pre_hooks_with_kwargs),
            (sub._forward_hooks, sub._forward_hooks_with_kwargs),
        ):
            for key in [
                k for k, hook in table.items() if isinstance(hook, DISPATCHERS) or is_inert(hook)
            ]:
                del table[key]
                kwargs.pop(key, None)
                sub._forward_hooks_always_called.pop(key, None)
