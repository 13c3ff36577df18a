"""Records belong to a pass: the data-to-latent passes a capture has seen (and, for a model
attached with ``direction="sample"`` or ``"both"``, its latent-to-data sampling passes), and
which one a penalty reads.

A pass begins at the model's entry (its ``forward``, ``log_prob``, ``forward_kld``, ... as
each framework's adapter says) and is known by the tensor it was given there (by identity:
no computation, no synchronisation). Grad-mode passes are kept until a penalty reads them or a
later one (up to :data:`MAX_PASSES`), so that gradient accumulation works; passes under
``torch.no_grad`` / ``inference_mode`` are kept apart (only the latest) and never replace
them. A layer called outside any pass of an attached model (a hand-written loop over the
layers) opens an *implicit* pass, which ends when a layer records a second time.

A sampling pass begins at the model's sampling entry (``sample``, ``reverse_kld``,
``rsample_and_log_prob``, ``rev=True``, ...), on its latent input when it is given one (else
on nothing: ``penalty(model)`` reads the latest). Records go only into a pass of their own
direction: a data-to-latent call inside a sampling pass (normflows' ``reverse_kld(...,
score_fn=False)`` runs the inverse) records nothing, and sampling records never open an
implicit pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import CaptureError
from .kit import Site
from .records import LayerRecord, flow_dim

MAX_PASSES = 8
"""Grad-mode passes kept, not yet read by a penalty; the oldest goes first."""

DIRECTIONS = ("data", "sample", "both")
"""What ``attach(model, direction=...)`` captures: data-to-latent passes (the default),
latent-to-data sampling passes, or both."""

_active: list[object] = []
"""Books with a pass in progress (any model), innermost last."""


class Pass:
    """One pass: its entry input and its layers' records.

    Attributes:
        inputs: The tensor given to the model's entry, or ``None`` for an implicit pass (or
            a sampling pass given no tensor, e.g. ``sample(num_samples)``).
        batch: Samples in the pass (``None``: read from the records).
        dim: Data dimension ``D`` of one sample (``None``: read from the records).
        grad: Whether gradients were being recorded when the pass began.
        records: The records of its layers, by layer name.
        untracked: Layers that ran with gradients off inside a grad-mode pass (reentrant
            checkpointing, ``torch.no_grad`` around a block).
        sampling: Whether it is a latent-to-data (sampling) pass.
    """

    __slots__ = ("inputs", "batch", "dim", "grad", "records", "untracked", "sampling")

    def __init__(
        self, inputs: Tensor | None, batch: int | None, dim: int | None, sampling: bool = False
    ) -> None:
        self.sampling = sampling
        self.inputs = inputs
        self.batch = batch
        self.dim = dim
        self.grad = torch.is_grad_enabled()
        self.records: dict[str, LayerRecord] = {}
        self.untracked: list[str] = []

    def describe(self) -> str:
        shape = "?" if self.inputs is None else tuple(self.inputs.shape)
        mode = "grad-mode" if self.grad else "no-grad"
        if self.sampling:
            return f"{mode} sampling pass" + ("" if self.inputs is None else f" on {shape}")
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
        if not (self.sampling if sampling else self.data):
            return
        if self in _active:
            _active.remove(self)  # a pass that ended with an exception
        new = Pass(inputs, batch, dim, sampling)
        self._keep(new)
        self.active = new
        self.implicit = None
        _active.append(self)

    def end(self) -> None:
        """The pass in progress ended."""
        self.active = None
        if self in _active:
            _active.remove(self)

    def _keep(self, new: Pass) -> None:
        if not new.grad:
            self.latest_no_grad = new
            return
        # Ended passes that recorded nothing, or ran on the same tensor, are of no more use.
        self.grad = [
            p for p in self.grad if p.records and (p.inputs is None or p.inputs is not new.inputs)
        ]
        self.grad.append(new)
        if len(self.grad) > MAX_PASSES:
            del self.grad[0]

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
            if _active:
                return  # the layer is running in another model's pass
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
        """Forget every pass."""
        self.grad.clear()
        self.latest_no_grad = None
        self.implicit = None

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
        """The pass a penalty on ``x`` reads (removed, with the grad-mode passes before it),
        or ``None`` when there is none to read (the penalty then runs its own).

        ``x`` is looked up by identity among the passes' entry inputs. Otherwise the penalty
        reads the only grad-mode pass there is (or, with gradients off, the latest no-grad
        one), after checking that ``x`` has its shape; with several, it cannot tell which
        and raises :class:`CaptureError`. ``any_mode``: a no-grad pass may be read with
        gradients on (diagnostics). ``direction`` (``"data"`` or ``"sample"``): only passes
        of that direction are read; ``None``: either.
        """
        no_grad_ok = any_mode or not torch.is_grad_enabled()

        def wanted(p: Pass) -> bool:
            return bool(p.records) and (direction is None or p.sampling == (direction == "sample"))

        grad = [p for p in self.grad if wanted(p)]
        no_grad = self.latest_no_grad
        if no_grad is not None and not wanted(no_grad):
            no_grad = None
        found: Pass | None = None
        if x is not None:
            found = next((p for p in reversed(grad) if p.inputs is x), None)
            if found is None and no_grad is not None and no_grad.inputs is x:
                found = no_grad
            if found is None:
                if len(grad) > 1:
                    raise CaptureError(
                        f"{len(grad)} grad-mode passes of {self.model_name} are waiting for a "
                        "penalty and x is the input of none of them, so klj-reg cannot tell "
                        "which pass x is: pass the same tensor object you gave the model "
                        "(penalty(model, x) right after model's pass on x), or call "
                        "klj_reg.clear(model) before the pass."
                    )
                found = grad[0] if grad else None
                if found is None and no_grad is not None and no_grad_ok:
                    found = no_grad
                if found is not None:
                    _check_shape(found, x, self.model_name)
        elif grad:
            found = grad[-1]
        elif no_grad is not None and no_grad_ok:
            found = no_grad
        if found is None:
            return None
        if found is no_grad:
            self.latest_no_grad = None
        else:
            # Reading a pass drops it and the older ones of its direction.
            index = next(i for i, p in enumerate(self.grad) if p is found)
            self.grad = [
                p for i, p in enumerate(self.grad) if i > index or p.sampling != found.sampling
            ]
        if self.implicit is found:
            self.implicit = None
        return found


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
