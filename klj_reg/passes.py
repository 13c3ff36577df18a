"""Records belong to a pass: the data-to-latent passes a capture has seen (and, for a model
attached with ``direction="sample"`` or ``"both"``, its latent-to-data sampling passes), and
which one a penalty reads.

A pass begins at the model's entry (its ``forward``, ``log_prob``, ``forward_kld``, ... as
each framework's adapter says) and is known by the tensor it was given there. A penalty on
``x`` reads the pass that ran on ``x``: by identity (no computation, no synchronisation),
else on a view of the same memory (a library that hands the flow ``x.unsqueeze(0)``), else
on a tensor of equal values (one comparison per waiting pass, which synchronises; only when
the first two fail). An ``x`` that is none of these raises: a penalty never reads another
batch.

What is kept (the memory rules): the records of a grad-mode pass are tensors of the user's
autograd graph, and whether the user still holds that graph (or the tensor the pass ran on,
which the graph itself keeps alive) cannot be told, so klj-reg keeps **one unread grad-mode
pass per direction**: the latest. A pass is forgotten when a penalty reads it, or unread when
the model's next grad-mode pass of its direction begins (it is *superseded*); a penalty that
asks for a superseded pass raises, saying so. Passes under
``torch.no_grad`` / ``inference_mode`` are kept apart (only the latest; they hold no graph)
and never replace the grad-mode one. A pass with no input (a sampling pass given no tensor,
or an *implicit* pass: a layer called outside any pass of an attached model, in a
hand-written loop over the layers, which ends when a layer records a second time) can only
be read as the latest; a penalty without ``x`` after a pass was superseded unread raises
rather than guess which pass it is for (and forgets them, so that the next step is not
blocked).

A sampling pass begins at the model's sampling entry (``sample``, ``reverse_kld``,
``rsample_and_log_prob``, ``rev=True``, ...), on its latent input when it is given one (else
on nothing: ``penalty(model)`` reads the latest). Records go only into a pass of their own
direction: a data-to-latent call inside a sampling pass (normflows' ``reverse_kld(...,
score_fn=False)`` runs the inverse) records nothing, and sampling records never open an
implicit pass.

Pass state is per thread: a pass open in one thread is invisible to the layers other threads
run. One model run by several threads at once is not supported (its passes would interleave).
"""

from __future__ import annotations

import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .errors import CaptureError
from .kit import Site
from .records import LayerRecord, flow_dim

MAX_DROPPED = 8
"""Superseded passes remembered (weakly: which tensor they ran on), to name the cause when a
penalty asks for one."""

DIRECTIONS = ("data", "sample", "both")
"""What ``attach(model, direction=...)`` captures: data-to-latent passes (the default),
latent-to-data sampling passes, or both."""


class _Local(threading.local):
    """This thread's books with a pass in progress (any model), innermost last."""

    def __init__(self) -> None:
        self.books: list[PassBook] = []


_local = _Local()


def _active() -> list[PassBook]:
    """The books with a pass in progress in this thread."""
    return _local.books


class _Held:
    """A strong reference called like a weak one: ``_Held(t)() is t``."""

    __slots__ = ("t",)

    def __init__(self, t: Tensor) -> None:
        self.t = t

    def __call__(self) -> Tensor:
        return self.t


def _weak(t: Tensor) -> Callable[[], Tensor | None]:
    """A weak reference to ``t`` (a strong one where a tensor cannot be weakly referenced)."""
    try:
        return weakref.ref(t)
    except TypeError:  # pragma: no cover - every torch.Tensor takes weak references
        return _Held(t)


class Pass:
    """One pass: its entry input and its layers' records.

    Attributes:
        inputs: The tensor given to the model's entry while it is alive (else a detached
            alias of its values), or ``None`` for an implicit pass (or a sampling pass given
            no tensor, e.g. ``sample(num_samples)``).
        batch: Samples in the pass (``None``: read from the records).
        dim: Data dimension ``D`` of one sample (``None``: read from the records).
        grad: Whether gradients were being recorded when the pass began.
        records: The records of its layers, by layer name.
        untracked: Layers that ran with gradients off inside a grad-mode pass (reentrant
            checkpointing, ``torch.no_grad`` around a block).
        sampling: Whether it is a latent-to-data (sampling) pass.
    """

    __slots__ = (
        "_input",
        "_root",
        "data",
        "batch",
        "dim",
        "grad",
        "records",
        "untracked",
        "sampling",
        "order",
    )

    def __init__(
        self, inputs: Tensor | None, batch: int | None, dim: int | None, sampling: bool = False
    ) -> None:
        self.sampling = sampling
        self.order = 0  # when it began, among its book's passes
        self.batch = batch
        self.dim = dim
        self.grad = torch.is_grad_enabled()
        self.records: dict[str, LayerRecord] = {}
        self.untracked: list[str] = []
        self._input: Callable[[], Tensor | None] | None = None
        self._root: Callable[[], Tensor | None] | None = None
        self.data: Tensor | None = None
        if inputs is None:
            return
        if torch.compiler.is_compiling():
            # Traced: no view tracking, and a strong reference (torch < 2.6 cannot trace
            # weakref.ref: each was a graph break).
            self._input = self._root = _Held(inputs)
            self.data = inputs
            return
        self._input = _weak(inputs)
        base = inputs._base
        self._root = self._input if base is None else _weak(base)
        self.data = inputs.detach()  # its values, without the graph that made it

    @property
    def inputs(self) -> Tensor | None:
        """The entry input if it is alive, else its values (``None``: a pass on nothing)."""
        if self._input is None:
            return None
        found = self._input()
        return self.data if found is None else found

    def ran_on(self, x: Tensor) -> bool:
        """Whether it ran on ``x`` itself (identity)."""
        return self._input is not None and self._input() is x

    def ran_on_view(self, x: Tensor) -> bool:
        """Whether it ran on a view of the memory ``x`` is (same base tensor, offset and
        layout, or both contiguous with as many elements): no computation."""
        if self._root is None or self.data is None:
            return False
        base = x._base
        if (x if base is None else base) is not self._root():
            return False
        data = self.data
        try:
            if data.dtype != x.dtype or data.storage_offset() != x.storage_offset():
                return False
            if data.shape == x.shape and data.stride() == x.stride():
                return True
            return data.numel() == x.numel() and data.is_contiguous() and x.is_contiguous()
        except (RuntimeError, NotImplementedError):  # no layout (a torch.func transform's)
            return False

    def holds(self, x: Tensor) -> bool:
        """Whether it ran on a tensor of ``x``'s values (as many elements, equal in order):
        one comparison, which synchronises with the device."""
        data = self.data
        if data is None or data.numel() != x.numel():
            return False
        try:
            other = x.detach().reshape(data.shape).to(data.device, data.dtype)
            return bool(torch.equal(data, other))
        except (RuntimeError, NotImplementedError):  # a torch.func transform's: no values
            return False

    def describe(self) -> str:
        shape = "?" if self.data is None else tuple(self.data.shape)
        mode = "grad-mode" if self.grad else "no-grad"
        if self.sampling:
            return f"{mode} sampling pass" + ("" if self.data is None else f" on {shape}")
        return f"{mode} pass on an input of shape {shape}"


class PassBook:
    """The passes of one attached model."""

    def __init__(self, model_name: str, direction: str = "data") -> None:
        self.model_name = model_name
        self.direction = direction
        self.data = direction != "sample"
        self.sampling = direction != "data"
        self.grad: list[Pass] = []
        self.latest_no_grad: Pass | None = None
        self.active: Pass | None = None
        self.implicit: Pass | None = None
        self.superseded = {False: 0, True: 0}
        """Unread grad-mode passes, per direction (sampling or not), that a newer one on
        another tensor replaced since the last penalty: a penalty without ``x`` then cannot
        tell which pass it is for."""
        self.dropped: deque[Pass] = deque(maxlen=MAX_DROPPED)
        """Superseded passes, without records or values: which tensor they ran on."""
        self.paused = 0
        """While > 0 (:meth:`suspended`), nothing is recorded."""
        self.running_own = False
        """Whether the pass in progress is one the penalty runs itself."""
        self.user_ran = False
        """Whether a pass of the user's (not one the penalty ran) has begun since attach."""
        self.began = 0
        """Passes begun so far (each pass's ``order``)."""
        self.check: Callable[[], None] | None = None
        """Run as each pass begins: raises if the model changed since attach (``Shape``)."""

    # Recording ----------------------------------------------------------------------------

    def begin(
        self,
        inputs: Tensor | None,
        batch: int | None,
        dim: int | None,
        sampling: bool = False,
    ) -> None:
        """A data-to-latent pass of the model begins on ``inputs`` (``sampling``: a
        latent-to-data pass, on ``inputs`` if it was given a tensor, else ``None``); a
        direction the model is not attached for begins nothing."""
        if not (self.sampling if sampling else self.data) or self.paused:
            return
        if self.check is not None:
            self.check()  # the model's shape since attach (raises if it changed)
        active = _local.books
        if self in active:
            active.remove(self)  # a pass that ended with an exception
        new = Pass(inputs, batch, dim, sampling)
        if not self.running_own:
            self.user_ran = True
        self._keep(new)
        self.active = new
        self.implicit = None
        active.append(self)

    def end(self) -> None:
        """The pass in progress ended."""
        if self.paused:
            return
        self.active = None
        active = _local.books
        if active and active[-1] is self:
            active.pop()  # the innermost, as a rule (and traceable by torch < 2.6)
        elif self in active:
            active.remove(self)

    def _keep(self, new: Pass) -> None:
        self.began += 1
        new.order = self.began
        if new._input is not None and self.dropped:
            self._undrop(new._input())
        if not new.grad:
            self.latest_no_grad = new
            return
        for p in self.grad:
            if p.sampling == new.sampling:
                self._supersede(p, new)
        self.grad = [p for p in self.grad if p.sampling != new.sampling]
        self.grad.append(new)

    def _supersede(self, p: Pass, new: Pass) -> None:
        """``new`` replaces the unread pass ``p``: forget its records and values, and
        remember which tensor it ran on (to name the cause if a penalty asks for it)."""
        if not p.records:
            return
        same = p._input is not None and new._input is not None and p._input() is new._input()
        if same:
            return  # the new pass on the same tensor is the one a penalty on it reads
        self.superseded[p.sampling] += 1
        if p._input is not None:
            p.records, p.data = {}, None
            self.dropped.append(p)

    def _undrop(self, inputs: Tensor | None) -> None:
        """Forget that a pass on ``inputs`` was superseded: a newer one on it began, or was
        read."""
        if inputs is not None:
            kept = [p for p in self.dropped if p._input is not None and p._input() is not inputs]
            if len(kept) < len(self.dropped):
                self.dropped = deque(kept, maxlen=MAX_DROPPED)

    def record(self, site: Site, record: LayerRecord, sampling: bool = False) -> None:
        """Store a layer's record in the pass in progress (``sampling``: a record of the
        layer's latent-to-data call, kept only in a sampling pass)."""
        current = self.active
        if sampling or (current is not None and current.sampling):
            if current is None or current.sampling != sampling:
                return  # the other direction's pass, or a sampling call outside any
            if current.grad and not torch.is_grad_enabled():
                current.untracked.append(site.name)
            current.records[site.name] = record
            return
        if not self.data:
            return  # attached for sampling passes only
        if current is None:
            if _local.books:
                return  # the layer is running in another model's pass (in this thread)
            current = self.implicit
            if current is None or site.name in current.records:
                current = self.implicit = Pass(None, None, None)
                self._keep(current)
        if current.grad and not torch.is_grad_enabled():
            current.untracked.append(site.name)
        current.records[site.name] = record

    def has_record(self, site: Site) -> bool:
        """Whether ``site`` recorded in the pass in progress (of either direction)."""
        current = self.active or self.implicit
        return current is not None and site.name in current.records

    def clear(self) -> None:
        """Forget every pass, the one in progress in this thread included (``detach``, or a
        pass left open: e.g. one layer of a list-of-transforms model called by hand, which
        would otherwise keep this thread's other models from recording outside a pass)."""
        self.active = None
        if self in _local.books:
            _local.books.remove(self)
        self.grad.clear()
        self.latest_no_grad = None
        self.implicit = None
        self.superseded = {False: 0, True: 0}
        self.dropped.clear()

    @contextmanager
    def suspended(self) -> Iterator[None]:
        """Record nothing inside the block (the fallback estimators' own passes, in this
        thread): no pass begins, and records outside a pass go nowhere."""
        active, saved = _local.books, self.active
        self.paused += 1
        self.active = None
        active.append(self)  # as if a pass were open: layers called outside one record nothing
        try:
            yield
        finally:
            self.paused -= 1
            if self in active:
                active.remove(self)
            self.active = saved

    def latest(self) -> Pass | None:
        """The latest pass with records (grad-mode first), without taking it."""
        for p in reversed(self.grad):
            if p.records:
                return p
        if self.latest_no_grad is not None and self.latest_no_grad.records:
            return self.latest_no_grad
        return None

    # Reading ------------------------------------------------------------------------------

    def take(
        self, x: Tensor | None, any_mode: bool = False, direction: str | None = None
    ) -> Pass | None:
        """The pass a penalty on ``x`` reads (removed), or ``None`` when there is none to
        read (the penalty then runs its own).

        ``x`` is looked up among the passes' entry inputs by identity, then as a view of the
        same memory, then by value (see the module's docstring); a pass on nothing (implicit)
        is read for an ``x`` of its shape. An ``x`` that matches no waiting pass raises
        :class:`CaptureError` naming the mismatch (or that its pass was superseded). Without
        ``x``, the latest grad-mode pass (or, with gradients off, the latest no-grad one);
        raises if a pass was superseded unread since the last penalty. ``any_mode``: a
        no-grad pass may be read with gradients on (diagnostics). ``direction`` (``"data"``
        or ``"sample"``): only passes of that direction are read; ``None``: either.
        """
        no_grad_ok = any_mode or not torch.is_grad_enabled()

        def wanted(p: Pass) -> bool:
            return bool(p.records) and (direction is None or p.sampling == (direction == "sample"))

        grad = [p for p in self.grad if wanted(p)]
        no_grad = self.latest_no_grad
        if no_grad is not None and not wanted(no_grad):
            no_grad = None
        if x is None:
            found = grad[-1] if grad else None
            if (
                no_grad is not None
                and no_grad_ok
                and (found is None or no_grad.order > found.order)
            ):
                found = no_grad  # gradients off: the latest pass, a no-grad one
            if found is not None and found is not no_grad:
                self._check_unambiguous(found, grad)
        else:
            found = self._find(x, grad, no_grad, no_grad_ok)
        if found is None:
            return None
        self._drop(found, no_grad)
        return found

    def _find(
        self, x: Tensor, grad: list[Pass], no_grad: Pass | None, no_grad_ok: bool
    ) -> Pass | None:
        """The pass that ran on ``x``: identity, then view, then value; a pass on nothing if
        it is the only one (its shape checked); ``None`` if there is none at all."""
        candidates = grad[::-1] + ([no_grad] if no_grad is not None else [])
        for match in (Pass.ran_on, Pass.ran_on_view, Pass.holds):
            found = next((p for p in candidates if match(p, x)), None)
            if found is not None:
                return found
        if grad and _entry_is_not_the_flows_input(grad[-1], x):
            _check_shape(grad[-1], x, self.model_name)  # a condition given before x
            return grad[-1]
        dropped = next((p for p in reversed(self.dropped) if _ran_on_tensor(p, x)), None)
        if dropped is not None:
            raise _superseded(dropped, self.model_name)
        if grad and all(p._input is None for p in grad):
            self._check_unambiguous(grad[-1], grad)
            _check_shape(grad[-1], x, self.model_name)
            return grad[-1]
        if grad:
            raise _mismatch(x, grad, self.model_name)
        if no_grad is not None and no_grad._input is None and no_grad_ok:
            _check_shape(no_grad, x, self.model_name)
            return no_grad
        return None

    def _check_unambiguous(self, found: Pass, grad: list[Pass]) -> None:
        """A penalty without ``x`` reads ``found``, the latest pass of its direction: raise
        if an unread one was superseded since the last penalty, which may be the one meant
        (forgetting the passes of that direction, so that the next step is not blocked)."""
        superseded = self.superseded[found.sampling]
        if not superseded:
            return
        self.grad = [p for p in self.grad if p.sampling != found.sampling]
        self.superseded[found.sampling] = 0
        kind = "sampling passes" if found.sampling else "passes"
        raise CaptureError(
            f"{superseded + 1} grad-mode {kind} of {self.model_name} ran since its last "
            "penalty, and a penalty without x reads only the latest: klj-reg cannot tell "
            "which one this penalty is for. Take each penalty right after its pass (before "
            "the model's next pass), pass x (the tensor the pass ran on) where the pass has "
            "one, and run the passes you do not train on (samples for a plot, evaluation) "
            "under torch.no_grad(), or call klj_reg.clear(model) after them. The waiting "
            "passes are dropped."
        )

    def _drop(self, found: Pass, no_grad: Pass | None) -> None:
        """Take ``found``: reading a pass drops it and the older ones of its direction."""
        if found is no_grad:
            self.latest_no_grad = None
        else:
            self.grad = [p for p in self.grad if p is not found]
            self.superseded[found.sampling] = 0
            if found._input is not None and self.dropped:
                self._undrop(found._input())
        if self.implicit is found:
            self.implicit = None


def _entry_is_not_the_flows_input(p: Pass, x: Tensor) -> bool:
    """Whether ``p``'s entry input cannot be ``x``'s batch (another number of elements per
    sample) while ``x`` has the flow's own dimension: the model's first input is something
    else (a condition given before ``x``), so that ``x`` can be checked by shape only."""
    data = p.data
    if data is None or data.numel() == x.numel() or x.dim() == 0:
        return False
    return x.shape[1:].numel() == flow_dim(list(p.records.values())) != p.dim


def _ran_on_tensor(p: Pass, x: Tensor) -> bool:
    """Whether ``p`` ran on ``x`` or on a view of the tensor ``x`` is (no computation)."""
    if p.ran_on(x):
        return True
    base = x._base
    return p._root is not None and p._root() is (x if base is None else base)


def _superseded(p: Pass, model: str) -> CaptureError:
    """``x`` is the tensor of a pass that a later one replaced before it was read."""
    what = "sampling pass" if p.sampling else "pass"
    return CaptureError(
        f"the {what} of {model} on x was dropped unread when the model's next grad-mode "
        f"{what} began: klj-reg keeps one unread grad-mode {what} per model (the latest), so "
        "that passes nobody reads hold no memory. Take each penalty right after its pass, "
        "before the model's next one: for gradient accumulation, loss_i = nll(x_i) + "
        "klj_reg.penalty(model, x_i, ...) per micro-batch."
    )


def _mismatch(x: Tensor, grad: list[Pass], model: str) -> CaptureError:
    """``x`` is not the input of the waiting pass, a view of it, or equal to it in value."""
    latest = grad[-1]
    batch, dim = batch_and_dim(latest)
    shape = "?" if latest.data is None else tuple(latest.data.shape)
    return CaptureError(
        f"x (shape {tuple(x.shape)}) is not the batch of the pass of {model} waiting for a "
        f"penalty, which ran on {batch} samples of dimension {dim} (input shape {shape}): x is "
        "neither that tensor, a view of it, nor equal to it in value, and klj-reg never reads "
        "another batch's pass. Pass the tensor you gave the model (penalty(model, x) after "
        "the model's pass on x); to penalise another batch, run the model on it first."
    )


def _check_shape(found: Pass, x: Tensor, model: str) -> None:
    """``x`` is not the pass's input: it must at least hold as many samples of the same
    dimension (zuko flattens batch shapes, so ``(2, 3, D)`` and ``(6, D)`` agree)."""
    batch, dim = batch_and_dim(found)
    per_sample = x.shape[1:].numel() if x.dim() > 1 else 1
    last = x.shape[-1] if x.dim() else 1
    # the model's first input (an image around a flow prior, a condition before x) or the
    # flow's own dimension, as its captured layers saw it
    dims = {dim, flow_dim(list(found.records.values()))}
    if not any(x.numel() == batch * d and d in (per_sample, last) for d in dims):
        shape = "?" if found.inputs is None else tuple(found.inputs.shape)
        raise CaptureError(
            f"x has shape {tuple(x.shape)} but the captured pass of {model} ran on {batch} "
            f"samples of dimension {dim} (input shape {shape}): x must be the batch the "
            "model's pass ran on."
        )


def _shape_of(found: Pass) -> tuple[int, int]:
    """``(batch, D)`` of an implicit pass, from its records."""
    records = list(found.records.values())
    sizes = {f.batch for r in records for f in r.factors} - {1}
    return (max(sizes) if sizes else 1), flow_dim(records)


def batch_and_dim(found: Pass) -> tuple[int, int]:
    """``(batch, D)`` of a pass: from its entry, or read from its records."""
    if found.batch is not None and found.dim is not None:
        return found.batch, found.dim
    return _shape_of(found)
