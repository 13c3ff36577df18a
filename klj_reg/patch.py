"""Observe a method that is called directly rather than through ``Module.__call__``.

Module hooks only fire through ``__call__``; some frameworks call layers' methods directly
(normflows trains through ``flow.inverse(z)``). :func:`after_method` wraps the method on the
layer's class once (so per-device replicas share it) and dispatches to callbacks registered
on the instance; instances without callbacks run the original method unchanged. The class
attribute is restored when the last callback is removed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

Callback = Callable[[nn.Module, tuple[Any, ...], dict[str, Any], Any], None]

INSTANCE_KEY = "_klj_after"
_patched: dict[tuple[type, str], tuple[Any, bool, int]] = {}


def _wrap(original: Callable[..., Any], name: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        out = original(self, *args, **kwargs)
        callbacks = self.__dict__.get(INSTANCE_KEY)
        # Only the outermost wrapper dispatches (a patched subclass may call super().name).
        if callbacks and getattr(type(self), name) is wrapper:
            for callback in callbacks.get(name, ()):
                callback(self, args, kwargs, out)
        return out

    wrapper._klj_wrapper = True  # type: ignore[attr-defined]
    return wrapper


class MethodHandle:
    """Removes one callback (and the class patch with the last one)."""

    def __init__(self, module: nn.Module, cls: type, name: str, callback: Callback) -> None:
        self.module, self.cls, self.name, self.callback = module, cls, name, callback

    def remove(self) -> None:
        callbacks = self.module.__dict__.get(INSTANCE_KEY, {})
        if self.callback in callbacks.get(self.name, []):
            callbacks[self.name].remove(self.callback)
        key = (self.cls, self.name)
        if key not in _patched:
            return
        original, had_own, count = _patched[key]
        if count > 1:
            _patched[key] = (original, had_own, count - 1)
            return
        del _patched[key]
        if had_own:
            setattr(self.cls, self.name, original)
        else:
            delattr(self.cls, self.name)


def after_method(module: nn.Module, name: str, callback: Callback) -> MethodHandle:
    """Call ``callback(module, args, kwargs, output)`` after each ``module.<name>(...)``."""
    cls = type(module)
    key = (cls, name)
    if key in _patched:
        original, had_own, count = _patched[key]
        _patched[key] = (original, had_own, count + 1)
    else:
        had_own = name in cls.__dict__
        original = cls.__dict__[name] if had_own else getattr(cls, name)
        _patched[key] = (original, had_own, 1)
        setattr(cls, name, _wrap(getattr(cls, name), name))
    module.__dict__.setdefault(INSTANCE_KEY, {}).setdefault(name, []).append(callback)
    return MethodHandle(module, cls, name, callback)
