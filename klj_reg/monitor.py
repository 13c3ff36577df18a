r"""Per-layer KLJ from the captured pass, and a monitor that flags a layer going wrong.

Each layer's value is its term of the divergence, averaged over the batch,

.. math:: \mathrm{KLJ}_i = \operatorname{mean}_b \sum_j d_{ij}(x_b)^2 - 1 - 2\log|d_{ij}(x_b)|
    = 2\,\operatorname{mean}_b \mathrm{KL}\big(\mathcal N(0, D_i D_i^\top) \,\|\,
    \mathcal N(0, I)\big),

with :math:`D_i` the diagonal of layer :math:`i`'s Jacobian (summed over its triangular
factors): zero at the identity, and large when a layer's scales run away, which in flows
that later fail (NaN losses, exploding held-out NLL) usually shows before the loss does. The
values come from the same captured tensors as the penalty: no extra forward pass.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from torch import Tensor, nn

from .capture import Capture, attach
from .divergence import record_divergence
from .records import LayerRecord

Logger = Callable[[dict[str, float], int], Any]
"""``logger(values, step)``: any callable; or an object with ``add_scalar(tag, value, step)``
(TensorBoard's ``SummaryWriter``)."""


class DivergenceGrowthWarning(RuntimeWarning):
    """A layer's KLJ grew by more than the monitor's factor within its window."""


class Flag(NamedTuple):
    """A layer flagged by a :class:`Monitor` at ``step``: its ``value`` against the smallest
    value of the window before (``reference``; ``nan`` when the value is not finite)."""

    step: int
    layer: str
    value: float
    reference: float


def layer_values(records: list[LayerRecord], form: str = "jacobian") -> dict[str, Tensor]:
    """``{layer path: batch mean of its KLJ term}`` (detached 0-d tensors, no sync)."""
    return {r.name or "<model>": record_divergence(r, form).detach().mean() for r in records}


def layer_divergence(
    model: Any, x: Tensor | None = None, *, form: str = "jacobian"
) -> dict[str, Tensor]:
    """Each captured layer's KLJ term (batch mean) on the pass that ran on ``x``, as
    :func:`klj_reg.penalty` would find it (and, like it, taking that pass), by layer path.

    For a loop without the penalty (a plain maximum-likelihood run you want to watch). With
    the penalty, use a :class:`Monitor`, which reads the pass the penalty reads.
    """
    from .penalty import _captured  # the penalty's lookup; imported here to avoid a cycle

    found, _ = _captured(model, x, None, need_grad=False)
    return layer_values(list(found.records.values()), form)


class Monitor:
    """Logs each layer's KLJ and flags a layer whose value grows by more than ``factor``.

    Attached to ``model`` (attaching it if needed), it is fed by every
    :func:`klj_reg.penalty` on the model (no extra forward pass), or by :meth:`step` in a
    loop without the penalty. Every ``every``-th observation it computes the per-layer
    values (one host synchronisation), hands them to ``log`` (a callable
    ``log(values, step)`` or a TensorBoard ``SummaryWriter``) and flags a layer when

    - its value is not finite, or
    - it exceeds ``factor`` times the larger of ``floor`` and the smallest value the layer
      had over the previous ``window`` observations,

    once per excursion (again only after it fell back below). Flags are kept in
    :attr:`flags` and, with ``warn=True``, raised as :class:`DivergenceGrowthWarning`.
    A flow that starts at the identity (KLJ ~0) and grows its scales in healthy early
    training can exceed ``factor x floor`` within its first steps: the first ``warmup``
    observations are logged only (neither flagged nor kept as a reference; ``0``, the
    default, flags from the start).

    Example::

        monitor = klj_reg.Monitor(model, log=SummaryWriter(), every=10)
        for x in loader:
            loss = nll(model, x) + klj_reg.penalty(model, x)   # feeds the monitor
            ...
        monitor.flags   # [Flag(step, layer, value, reference), ...]
    """

    def __init__(
        self,
        model: nn.Module,
        log: Logger | Any | None = None,
        *,
        every: int = 1,
        window: int = 20,
        factor: float = 10.0,
        floor: float = 1.0,
        warn: bool = True,
        prefix: str = "klj/",
        warmup: int = 0,
    ) -> None:
        if every < 1 or window < 1 or warmup < 0:
            raise ValueError(
                f"need every, window >= 1 and warmup >= 0, got {every}, {window}, {warmup}"
            )
        if not (factor > 1 and floor >= 0):
            raise ValueError(f"need factor > 1 and floor >= 0, got {factor} and {floor}")
        self.model = model
        self.capture: Capture = attach(model)
        self.capture.monitors.append(self)
        self.log, self.every, self.window = log, every, window
        self.factor, self.floor, self.warn, self.prefix = factor, floor, warn, prefix
        self.warmup = warmup
        self.seen = 0
        self.steps = 0
        self.history: dict[str, deque[float]] = {}
        self.high: set[str] = set()
        self.flags: list[Flag] = []
        self.latest: dict[str, float] = {}

    def step(self, x: Tensor | None = None) -> list[Flag]:
        """Observe the captured pass on ``x`` (taking it), in a loop without the penalty."""
        from .penalty import _captured

        found, _ = _captured(self.model, x, None, need_grad=False)
        return self.observe_records(list(found.records.values()), force=True)

    def observe_records(self, records: list[LayerRecord], force: bool = False) -> list[Flag]:
        """Called by the penalty with the records it read (every call counts as a step)."""
        self.seen += 1
        if not force and (self.seen - 1) % self.every:
            return []
        return self.observe(layer_values(records))

    def observe(self, values: Mapping[str, Tensor | float], step: int | None = None) -> list[Flag]:
        """Log ``values`` (``{layer: KLJ}``) and return the layers flagged now."""
        step = self.seen if step is None else step
        self.steps += 1
        floats = {name: float(v) for name, v in values.items()}  # the one synchronisation
        self.latest = floats
        self._log(floats, step)
        flags = []
        for name, value in floats.items():
            history = self.history.setdefault(name, deque(maxlen=self.window))
            if not math.isfinite(value):
                reference = math.nan
                flagged = True
            elif history:
                reference = min(history)
                flagged = value > self.factor * max(reference, self.floor)
            else:
                reference, flagged = value, False
            if self.steps <= self.warmup:  # neither flagged nor a reference for later
                continue
            if flagged and name not in self.high:
                flags.append(Flag(step, name, value, reference))
            if flagged:
                self.high.add(name)
            else:
                self.high.discard(name)
            if math.isfinite(value):
                history.append(value)
        self.flags.extend(flags)
        if self.warn:
            for flag in flags:
                warnings.warn(
                    f"KLJ of layer {flag.layer} is {flag.value:.4g} at step {flag.step}, "
                    f"{self.factor:g}x above its recent minimum ({flag.reference:.4g}): its "
                    "scales are running away. Consider a lower learning rate, gradient "
                    "clipping or a larger alpha.",
                    DivergenceGrowthWarning,
                    stacklevel=3,
                )
        return flags

    def _log(self, values: dict[str, float], step: int) -> None:
        if self.log is None:
            return
        if hasattr(self.log, "add_scalar"):
            for name, value in values.items():
                self.log.add_scalar(self.prefix + name, value, step)
            self.log.add_scalar(self.prefix + "total", sum(values.values()), step)
        else:
            self.log(values, step)

    def close(self) -> None:
        """Stop observing the model's penalties."""
        if self in self.capture.monitors:
            self.capture.monitors.remove(self)
