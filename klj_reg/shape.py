"""The module tree an attached model had at ``attach``, where a change would matter.

Hooks sit on the modules found at ``attach``: a flow layer appended or put in place of another
afterwards has none (it would be left out of the penalty), and a subnetwork replaced inside a
captured layer takes the hooks its reader needs with it. Each pass therefore compares, before
it begins, the children of every module on the path from the model to a captured layer, and
of each captured layer, with those seen at ``attach``: one dict comparison per module (the
same names, the identical modules), no walk of the tree. A change that touches neither a
captured layer nor a flow layer (a new base distribution, a head that is not a flow layer) is
accepted as the new shape; any other raises
:class:`~klj_reg.errors.CaptureError` naming what changed, and ``attach`` on the changed model
scans it again.
"""

from __future__ import annotations

from collections.abc import Iterable
from operator import attrgetter

import torch
from torch import nn

from . import registry
from .errors import CaptureError

_CHILDREN = attrgetter("_modules")


class Shape:
    """The watched part of a model's module tree: ``(path, module, children, names)`` per
    module on the path from the root to each captured layer, to each subnetwork its reader
    watches, and per captured layer."""

    __slots__ = ("model_name", "watched", "captured", "modules", "children", "ids")

    def __init__(
        self, model: nn.Module, layers: Iterable[tuple[str, nn.Module, Iterable[nn.Module]]]
    ) -> None:
        self.model_name = type(model).__name__
        names = {id(m): name for name, m in model.named_modules()}
        found: dict[str, nn.Module] = {}
        captured: set[int] = set()
        for name, layer, subnets in layers:
            # The path to the layer, and to each network whose calls its reader watches.
            for path in (name, *(names.get(id(net), "") for net in subnets)):
                parts = path.split(".") if path else []
                for end in range(len(parts) + 1):
                    prefix = ".".join(parts[:end])
                    if prefix not in found:
                        try:  # (a module shared by two paths is named once by named_modules)
                            found[prefix] = model.get_submodule(prefix)
                        except AttributeError:  # a part recorded under its layer's name
                            break
            captured.update(id(m) for m in layer.modules())
        captured.update(id(m) for m in found.values())
        self.captured = captured
        """The modules whose replacement or removal changes what is read."""
        self.watched = [_seen(path, m) for path, m in found.items()]
        self.modules = [m for _, m, _ in self.watched]
        self.children = [seen for _, _, seen in self.watched]
        self.ids = [_ids(seen) for seen in self.children]

    def check(self) -> None:
        """Raise if a watched module's children changed in a way that matters; accept any
        other change as the new shape."""
        # One list comparison per pass (children gathered and dicts compared at C level: the
        # same names, the very same modules); only a change looks at what changed. Traced by
        # torch.compile, the modules are compared by id (dynamo before torch 2.6 cannot
        # compare dicts of modules whose class klj-reg wraps).
        if torch.compiler.is_compiling():
            if [_ids(m._modules) for m in self.modules] == self.ids:
                return
        elif list(map(_CHILDREN, self.modules)) == self.children:
            return
        for i, (path, module, seen) in enumerate(self.watched):
            if module._modules != seen:
                changes = self._changes(path, module, seen)
                if changes:
                    raise CaptureError(
                        f"{self.model_name} changed after klj_reg.attach: "
                        + "; ".join(changes)
                        + ". Hooks were installed at attach, so the penalty would leave a new "
                        "layer out or miss what a replaced one computes: call "
                        "klj_reg.attach(model) again after changing the model (it scans the "
                        "model again)."
                    )
                self.watched[i] = _seen(path, module)
                self.children[i] = self.watched[i][2]
                self.ids[i] = _ids(self.children[i])

    def changed(self) -> bool:
        """Whether any watched module's children differ from those seen (any change)."""
        return list(map(_CHILDREN, self.modules)) != self.children

    def _changes(
        self, path: str, module: nn.Module, seen: dict[str, nn.Module | None]
    ) -> list[str]:
        """The changes of ``module``'s children that matter, in words."""
        before = {id(c) for c in seen.values() if c is not None}
        now = {id(c) for c in module._modules.values() if c is not None}
        out = []
        for name, child in module._modules.items():
            if child is not None and id(child) not in before and _has_flow_layer(child):
                out.append(f"{_join(path, name)} ({type(child).__name__}) is new")
        for name, child in seen.items():
            if child is not None and id(child) not in now and id(child) in self.captured:
                out.append(f"{_join(path, name)} ({type(child).__name__}), captured, is gone")
        return out


Seen = tuple[str, nn.Module, dict[str, nn.Module | None]]
"""``(path, module, a copy of its children by name)``: compared with ``module._modules`` as
dicts (equal names, identical modules), without building anything per pass."""


def _ids(children: dict[str, nn.Module | None]) -> list[tuple[str, int]]:
    return [(name, id(child)) for name, child in children.items()]


def _seen(path: str, module: nn.Module) -> Seen:
    return path, module, dict(module._modules)


def _has_flow_layer(module: nn.Module) -> bool:
    """Whether ``module`` is or holds a layer klj-reg reads, or would warn it leaves out."""
    return any(
        registry.adapter_for(cls) is not None
        or (registry.flow_base(cls) is not None and not registry.is_neutral(cls))
        for cls in (type(m) for m in module.modules())
    )


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name
