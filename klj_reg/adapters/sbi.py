"""sbi: the density estimators of its neural posterior estimation (NPE).

sbi wraps an nflows or zuko flow in an estimator (``NFlowsFlow``, ``ZukoFlow``; the flow is
its ``.net``) that has ``log_prob(input, condition)``, ``loss(input, condition)`` and
``sample`` but no ``forward``. Its layers are the inner framework's, captured by that
framework's adapter; this module says where the estimator's data-to-latent pass begins and
how to run one:

- **entry**: a call of the estimator's ``loss`` or ``log_prob`` is a pass on its ``input``
  (the parameters ``theta``; ``loss`` calls ``log_prob`` inside, which opens nothing more),
  so ``klj_reg.penalty(estimator, theta)`` after ``estimator.loss(theta, x)`` reads it.
  Sampling (``sample``, ``sample_and_log_prob``, a posterior's ``sample``) records nothing.
- **runner**: for a penalty with no captured pass (first use) or ``estimator="exact"``:
  ``(noise, log_det)`` of the inner flow's transform on ``input`` given ``context`` (the
  condition ``x``), itself a pass on ``input``.

sbi's loss is the negative log-probability summed over the parameters' dimensions, one value
per sample, so the penalty's default per-sample units match it directly.
"""

from __future__ import annotations

import weakref
from typing import Any

import sbi.neural_nets.estimators as estimators
from torch import Tensor, nn

from ..errors import CaptureError
from ..kit import Door, Handle
from ..registry import Registrar

framework = Registrar("sbi", estimators)

FLOWS = ("NFlowsFlow", "ZukoFlow", "ZukoUnconditionalFlow")
"""Estimators whose ``.net`` is an nflows or zuko flow."""

_doors: weakref.WeakKeyDictionary[nn.Module, Door] = weakref.WeakKeyDictionary()
"""Each attached estimator's door, for its runner's pass."""


def _begin(door: Door, x: Tensor) -> None:
    door.begin(x, x.shape[:-1].numel() if x.dim() else 1, x.shape[-1] if x.dim() else 1)


@framework.entry(*FLOWS)
def entry(model: nn.Module, door: Door) -> list[Handle]:
    """The outermost ``loss`` / ``log_prob`` call of the estimator is a pass on its input."""
    depth = [0]

    def before(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        depth[0] += 1
        x = args[0] if args else kwargs.get("input")
        if depth[0] == 1 and isinstance(x, Tensor):
            _begin(door, x)

    def final(module: nn.Module) -> None:
        depth[0] -= 1
        if depth[0] == 0:
            door.end()

    _doors[model] = door
    return [
        *door.watch_method(model, "loss", before=before, final=final),
        *door.watch_method(model, "log_prob", before=before, final=final),
    ]


@framework.runner(*FLOWS)
def run_estimator(model: Any, x: Tensor, context: Any) -> tuple[Tensor, Tensor]:
    """``(noise, log_det)`` of the estimator's flow on ``x`` (the parameters) given
    ``context`` (the condition), as a pass on ``x``."""
    name = type(model).__name__
    if context is None and name != "ZukoUnconditionalFlow":
        raise CaptureError(
            f"klj_reg.penalty found no captured pass of the sbi {name} on x and needs "
            "context= (the condition, sbi's x) to run one: call it after your own "
            "estimator.loss(theta, x), or pass penalty(estimator, theta, context=x)."
        )
    door = _doors.get(model)
    if door is not None:
        _begin(door, x)
    try:
        if name == "NFlowsFlow":
            net = model.net
            noise, log_det = net._transform(x, context=net._embedding_net(context))
        elif name == "ZukoFlow":
            condition = model._embedding_net(context)
            noise, log_det = model.net(condition).transform.call_and_ladj(x)
        else:
            noise, log_det = model.net().transform.call_and_ladj(x)
    finally:
        if door is not None:
            door.end()
    return noise, log_det
