r"""The regulariser users add to their loss.

.. math::

    \text{penalty} = \frac{\alpha}{\text{normaliser}} \, \operatorname{mean}_{b}\,
    \sum_i \sum_j \big(d_{ij}(x_b)^2 - 1 - 2\log|d_{ij}(x_b)|\big)
    \;+\; \tau \sum \|W\|_F^2

over captured layers :math:`i` and their Jacobian diagonal entries :math:`j` (paper Eq. 10-11
with :math:`s_i` the true diagonal; summed over layers the log terms are the model's
log-determinant, the paper's R3). The default normaliser is 1: the penalty is per sample, in
the units of ``-log_prob(x).mean()``, and ``loss = nll_per_sample + penalty`` (or, for a
per-dimension loss, ``nll_per_sample / D + penalty(..., normaliser="dim")``) gives ``alpha``
the same relative strength for any :math:`D`.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from . import registry
from .capture import Capture, attach, get_capture, not_a_module_fix, unwrap
from .checks import FiniteWatch, check
from .divergence import FORMS, divergence, mean_divergence
from .errors import CaptureError, UnsupportedModelError
from .fallback import exact_klj, hutchinson_klj
from .fused import fused_divergence
from .monitor import monitors_of
from .passes import Pass
from .records import LayerRecord, as_row, flow_dim

ESTIMATORS = ("capture", "exact", "hutchinson")
NORMALISERS = ("dim", "layers", "none")
REDUCTIONS = ("mean", "sum", "none")


NO_DEFAULT = (
    "klj_reg.penalty needs alpha=...: it has no default, because no single value served on "
    "the tabular benchmark (the best alpha per data set and flow ranged from 0.1 to 10, "
    "python -m benchmarks tabular). Choose it on validation data with "
    "klj_reg.choose_alpha (docs/choosing-alpha.md), or start from alpha=1 and sweep by "
    "decades."
)
"""The message when ``alpha`` is left out."""


def _number(name: str, value: Any) -> float:
    """A 0-d real tensor ``alpha`` or ``tau`` as a float; anything else as it is (checked by
    :func:`_validate`). A tensor that requires grad is refused: its float would cut the
    gradient the caller expects to flow into it."""
    if not isinstance(value, Tensor):
        return value
    if value.dim() != 0 or value.is_complex() or value.dtype == torch.bool:
        raise ValueError(
            f"{name} must be a number or a 0-d real tensor, got a {value.dtype} tensor of shape "
            f"{tuple(value.shape)}"
        )
    if value.requires_grad:
        learn = f", or, to learn it, {name} * klj_reg.penalty(model, x, {name}=1.0)"
        raise ValueError(
            f"{name} is a tensor that requires grad, but klj-reg takes {name} as a constant and "
            f"would cut its gradient: pass {name}.item()" + (learn if name == "alpha" else "")
        )
    return float(value)


def _validate(alpha: float, tau: float, form: str, estimator: str, reduction: str) -> None:
    for name, value in (("alpha", alpha), ("tau", tau)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number, not {type(value).__name__}")
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _normaliser(normaliser: str | float | None, form: str, dim: int, layers: int) -> float:
    """The divisor of the summed divergence. The default keeps the penalty in the units of
    a per-sample NLL: 1 for ``"jacobian"``; ``layers / D`` for ``"released-code"``, the
    authors' ``alpha * KLJ / layers`` next to a per-dimension NLL, times D."""
    if normaliser is None:
        return 1.0 if form == "jacobian" else layers / dim
    if isinstance(normaliser, str):
        if normaliser not in NORMALISERS:
            raise ValueError(f"normaliser must be one of {NORMALISERS} or a number > 0")
        if normaliser == "dim":
            return float(dim)
        return float(layers) if normaliser == "layers" else 1.0
    if isinstance(normaliser, bool) or not isinstance(normaliser, (int, float)):
        raise ValueError(f"normaliser must be one of {NORMALISERS} or a number > 0")
    if not (math.isfinite(normaliser) and normaliser > 0):
        raise ValueError(f"normaliser must be > 0, got {normaliser}")
    return float(normaliser)


def _reduce(per_sample: Tensor, reduction: str, batch: int) -> Tensor:
    if reduction == "none":
        return per_sample.expand(batch) if per_sample.shape[0] == 1 else per_sample
    if reduction == "sum":
        return per_sample.sum() * (batch if per_sample.shape[0] == 1 else 1)
    return per_sample.mean()


def _flow_fn(model: Any, context: Any) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """A function x -> (z, log_det) for a model: its framework's runner, or the callable."""
    target = unwrap(model)
    runner = registry.runner_for(type(target)) if isinstance(target, nn.Module) else None
    if runner is not None:
        return lambda x: runner(target, x, context)
    if not callable(model):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not callable; " + not_a_module_fix(model)
        )
    if context is None:
        return model
    return lambda x: model(x, context)


def _batch_of(records: list[LayerRecord]) -> int:
    # Factor.batch, inline (one per factor, each step).
    sizes = {f.source.shape[0] for r in records for f in r.factors if f.log_abs is not as_row}
    sizes.discard(1)
    if len(sizes) > 1:
        raise CaptureError(
            f"captured layers disagree on the batch size ({sorted(sizes)}) within one pass: a "
            "layer ran on a batch of another size. Report the model; meanwhile use "
            "estimator='hutchinson'."
        )
    return sizes.pop() if sizes else 1


def _no_gradient(model: Any, found: Pass) -> CaptureError:
    where = (
        f"layers {', '.join(found.untracked[:3])} ran with gradients off inside it"
        if found.grad
        else "it ran with gradients off"
    )
    return CaptureError(
        f"the captured {found.describe()} of {type(unwrap(model)).__name__} cannot give the "
        f"penalty a gradient: {where} (torch.no_grad, or torch.utils.checkpoint with "
        "use_reentrant=True, which runs the forward without gradients and again in backward). "
        "Use torch.utils.checkpoint(..., use_reentrant=False); to log the value only, call the "
        "penalty under torch.no_grad()."
    )


SAMPLING_CALLS = (
    "normflows' sample / reverse_kld, zuko's flow().rsample_and_log_prob(), nflows' "
    "sample_and_log_prob, FrEIA's model(z, rev=True)"
)


def _captured(
    model: Any,
    x: Tensor | None,
    context: Any,
    need_grad: bool = True,
    direction: str | None = None,
) -> tuple[Pass, Capture]:
    name = type(unwrap(model)).__name__
    if direction not in (None, "data", "sample"):
        raise ValueError(
            f"direction must be None (the latest pass), 'data' or 'sample', got {direction!r}"
        )
    capture = get_capture(model)
    first_use = capture is None
    if capture is None:
        if direction == "sample":
            raise CaptureError(
                f"{name} is not attached for sampling passes: call klj_reg.attach(model, "
                "direction='sample') (or 'both') before its first sampling pass "
                f"({SAMPLING_CALLS})."
            )
        capture = attach(model)
    book = capture.book
    if direction is not None and not (book.sampling if direction == "sample" else book.data):
        raise CaptureError(
            f"penalty(..., direction={direction!r}) but {name} is attached with direction="
            f"{capture.direction!r}, which records no {direction} pass: call "
            f"klj_reg.detach(model), then klj_reg.attach(model, direction={direction!r}) (or "
            "'both') before its first pass."
        )
    found = capture.take_pass(x, not need_grad, direction)
    if found is None and (not book.data or direction == "sample"):
        if need_grad and book.latest_no_grad is not None and book.latest_no_grad.records:
            raise _no_gradient(model, book.latest_no_grad)
        raise CaptureError(
            f"no captured sampling pass of {name}"
            + ("" if x is None else " to read for x")
            + f": run the model's sampling pass ({SAMPLING_CALLS}) before "
            "klj_reg.penalty(model) (the penalty cannot run a sampling pass itself)."
        )
    if found is None:
        if x is None:
            no_grad = book.latest_no_grad
            if need_grad and no_grad is not None and no_grad.records:
                raise _no_gradient(model, no_grad)
            hint = (
                ""
                if book.sampling
                else " Sampling passes (reverse KL) are recorded only for a model attached with "
                "klj_reg.attach(model, direction='sample')."
            )
            raise CaptureError(
                f"no captured forward pass of {name} and no x: run "
                "the model's forward pass (e.g. its log_prob) before klj_reg.penalty(model), "
                "or pass x so that the penalty runs one." + hint
            )
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise CaptureError(
                "no captured forward pass under DistributedDataParallel, where an extra pass "
                "would desynchronise gradient reduction: call klj_reg.attach(model) before "
                "wrapping it in DDP, and the penalty after the DDP forward pass."
            )
        # On first use the hooks did not exist during the user's pass: one extra pass, once.
        if not first_use and not capture.warned_own_pass:
            capture.warned_own_pass = True
            warnings.warn(
                "klj_reg.penalty found no captured forward pass on x and ran its own, which "
                "doubles the cost of a step: call it after your own forward pass on x (pass "
                "the same tensor object). If the model was compiled, attach before compiling.",
                stacklevel=3,
            )
        if context is not None and book.user_ran:
            raise _refuse_own_pass(name)
        book.running_own = True
        try:
            _flow_fn(model, context)(x)
        finally:
            book.running_own = False
        found = capture.take_pass(x, not need_grad, "data")
        if found is None or not found.records:
            raise CaptureError(
                f"running {name} on x recorded no layer: the pass "
                "did not go data-to-latent through any captured layer."
            )
    if need_grad and torch.is_grad_enabled() and (not found.grad or found.untracked):
        raise _no_gradient(model, found)
    return found, capture


UNSUPPORTED_TRANSFORMS = {
    "jvp": "forward-mode differentiation: the divergence's autograd function has no jvp rule",
    "functionalize": "its hooks record into Python state a functionalized program cannot see",
}
"""torch.func transforms the penalty refuses, and why."""


def _transform() -> str | None:
    """The innermost ``torch.func`` transform this call runs under (``"grad"``, ``"vmap"``,
    ``"jvp"``, ...), or ``None``."""
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is None:
        return None
    return str(interpreter.key().name).lower()


def _refuse_own_pass(name: str) -> CaptureError:
    """The penalty would run its own pass with ``context=`` on a model the user runs."""
    return CaptureError(
        f"klj_reg.penalty found no pass of {name} on x to read and would run one itself with "
        f"the context you gave. Your code has run {name} (its passes are captured), and the "
        "penalty's own pass may not be the computation yours did: work your code does outside "
        f"{name} (z-scoring, an embedding of the condition, ...) would be skipped, and a "
        "different value returned. So it refuses: call klj_reg.penalty(model, x) right after "
        "your own pass on x, without context= (it reads that pass), or attach and pass the "
        "module that does the whole computation."
    )


_warned_untrainable: weakref.WeakSet[Capture] = weakref.WeakSet()


def untrainable_layers(records: list[LayerRecord]) -> list[str]:
    """Layers whose record carries no gradient (no factor's log|d| requires grad: a layer
    without trainable parameters, such as a fixed standardisation). A factor's map may hold
    the parameter (a batch norm's weight beside the batch's variance), so the maps run: once
    per capture, off the hot path."""
    return [
        r.name or "<model>"
        for r in records
        if not any(f.source.requires_grad or f.log_abs_d().requires_grad for f in r.factors)
    ]


def warn_untrainable(capture: Capture, records: list[LayerRecord]) -> None:
    """Warn once per capture, at its first penalty with gradients on, when no captured layer
    carries a gradient: the penalty then trains nothing. (Some layers without one, such as a
    fixed standardisation, only add a constant to the value: see docs/training-loops.md.)"""
    if capture in _warned_untrainable:
        return
    _warned_untrainable.add(capture)
    fixed = untrainable_layers(records)
    if not records or len(fixed) < len(records):
        return
    names = ", ".join(fixed[:6]) + (f" and {len(fixed) - 6} more" if len(fixed) > 6 else "")
    warnings.warn(
        f"nothing klj-reg captured in {capture.model_name} trains: its captured layers "
        f"({names}) have no trainable parameters, so the penalty is a constant without "
        "gradient and regularises nothing. The layers that train are not captured: register "
        "them with klj_reg.register_adapter, or use estimator='hutchinson'.",
        stacklevel=3,
    )


def penalty(
    model: Any,
    x: Tensor | None = None,
    *,
    alpha: float | Tensor | None = None,
    tau: float | Tensor = 0.0,
    form: str = "jacobian",
    normaliser: str | float | None = None,
    reduction: str = "mean",
    context: Any = None,
    estimator: str = "capture",
    n_samples: int = 1,
    check_finite: bool | None = None,
    fused: bool = False,
    direction: str | None = None,
) -> Tensor:
    r"""The KLJ penalty of ``model`` on the captured pass that ran on ``x``.

    After a sampling pass of a model attached with ``klj_reg.attach(model,
    direction="sample")`` (or ``"both"``), ``penalty(model)`` is the KLJ term of the sampling
    map :math:`g = f^{-1}` that pass computed, per layer, with diagonal :math:`e = 1/d`:
    :math:`e^2 - 1 - 2\log|e|` per entry, from the same tensors (no extra pass).

    Args:
        model: A FrEIA, nflows, normflows or zuko model (or any module with registered
            adapters). With ``estimator="exact"|"hutchinson"``, any callable
            ``x -> (z, log_det)``.
        x: The batch the model's pass ran on: the penalty reads that pass's records (found
            by identity of the tensor given to the model, else as a view of the same memory,
            else by equal values; an ``x`` that is none of these raises). ``None``: the
            latest grad-mode pass. One unread grad-mode pass is kept per direction (see
            docs/training-loops.md): take each penalty right after its pass. If there is no
            pass to read, the penalty runs the model on ``x`` itself, which doubles the cost
            (warned once).
        alpha: Weight :math:`\alpha \ge 0` against a per-sample NLL: add the penalty to
            ``-log_prob(x).mean()`` (next to a per-dimension loss, ``normaliser="dim"``).
            Required: no single value served on the tabular benchmark (the best per data
            set and flow ranged from 0.1 to 10); pick it on validation data with
            :func:`klj_reg.choose_alpha`. A number or a 0-d tensor that does not require
            grad (as for ``tau``).
        tau: Weight :math:`\tau \ge 0` of :math:`\sum\|W\|_F^2` over coupling subnetworks
            (the paper's R1; weight decay plays the same role).
        form: ``"jacobian"``: :math:`d^2 - 1 - 2\log|d|` on the true Jacobian diagonal.
            ``"released-code"``: the authors' code, squared raw pre-activations minus twice
            the log-det (see :mod:`klj_reg.divergence`).
        normaliser: ``None`` (default): 1 for ``"jacobian"`` (per sample); for
            ``"released-code"`` the number of captured layers over :math:`D`, the authors'
            weighting in per-sample units (``"layers"`` next to a per-dimension NLL is their
            loss at their ``alpha``).
            ``"dim"``: the flow's dimension :math:`D` (the longest Jacobian diagonal among
            the captured layers, whatever else the model's call takes); ``"layers"``: the
            number of captured layers; ``"none"``: 1; or a number > 0.
        reduction: ``"mean"`` over the batch (default), ``"sum"``, or ``"none"`` for the
            per-sample vector (without the ``tau`` term).
        context: Conditioning input, used only when the penalty runs its own pass: on first
            use, or on a model whose passes the user never ran while attached (after that,
            a penalty that would need one raises, because its pass could skip work the
            user's code does around the model).
        estimator: ``"capture"`` (default), or a fallback for models without an adapter:
            ``"exact"`` (full Jacobian, small D) or ``"hutchinson"`` (``n_samples`` probes).
        check_finite: ``None`` (default): a non-finite penalty is returned as it is, with
            a :class:`NonFiniteScaleWarning` naming the first layers whose Jacobian diagonal
            is not finite (on CUDA read without blocking, a few steps later). ``True``:
            raise :class:`NonFiniteScaleError` instead. ``False``: no check.
        fused: Compute the divergence through ``torch.compile`` (one fused kernel forward
            and backward instead of a few per layer; compiled once per model, which takes
            seconds). Worth it when the penalty is a visible share of a step.
        direction: Which pass to read: ``None`` (default) the pass on ``x`` or the latest,
            of either direction the model is attached for; ``"data"`` a data-to-latent pass;
            ``"sample"`` a sampling pass (the penalty cannot run one itself, so one must have
            run).

    Returns:
        A scalar tensor (or ``(B,)`` with ``reduction="none"``) connected to the graph.
    """
    if alpha is None:
        raise TypeError(NO_DEFAULT)
    alpha, tau = _number("alpha", alpha), _number("tau", tau)
    _validate(alpha, tau, form, estimator, reduction)
    _normaliser(normaliser, form, 1, 1)  # raises ValueError before any pass is looked up
    if estimator != "capture":
        if x is None:
            raise ValueError(f"estimator={estimator!r} needs x")
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        fn = _flow_fn(model, context)
        capture = get_capture(model)
        with nullcontext() if capture is None else capture.book.suspended():
            per_sample = (
                exact_klj(fn, x) if estimator == "exact" else hutchinson_klj(fn, x, n_samples)
            )
        scale = alpha / _normaliser(normaliser, "jacobian", x.shape[1:].numel(), 1)
        value = _reduce(per_sample, reduction, x.shape[0]) * scale
        return value + tau * _weight_norm(model) if reduction != "none" and tau else value

    transform = _transform()
    if transform in UNSUPPORTED_TRANSFORMS:
        raise CaptureError(
            f"klj_reg.penalty does not support torch.func.{transform} "
            f"({UNSUPPORTED_TRANSFORMS[transform]}): compute it under torch.func.grad, vjp, "
            "jacrev or vmap, or with ordinary autograd (loss.backward())."
        )
    found, capture = _captured(model, x, context, direction=direction)
    records = list(found.records.values())
    batch = _batch_of(records)
    dim = flow_dim(records)
    if batch == 0 or (found.batch == 0):
        value = _empty(records, reduction)
    else:
        if reduction == "mean":
            value = (
                fused_divergence(records, form, True, capture.compiled)
                if fused
                else mean_divergence(records, form)
            )
        else:
            per_sample = (
                fused_divergence(records, form, False, capture.compiled)
                if fused
                else divergence(records, form)
            )
            value = _reduce(per_sample, reduction, found.batch or batch)
        value = value * (alpha / _normaliser(normaliser, form, dim, len(records)))
        if transform is None:  # inside torch.func, values are not plain tensors: no checks
            if value.device.type == "cuda" and capture.finite is None:
                capture.finite = FiniteWatch()
            check(records, capture.sites, value, check_finite, capture.finite, found.sampling)
            if torch.is_grad_enabled():
                warn_untrainable(capture, records)
            for monitor in monitors_of(model):
                monitor.observe_records(records)
    if tau and reduction != "none":
        weights = list(capture.subnet_parameters())
        if not weights:
            raise ValueError(
                "tau > 0 but no captured layer identifies its subnetworks (register_adapter("
                "..., subnets=lambda layer: [...]) does); use weight decay instead"
            )
        value = value + tau * torch.stack([w.square().sum() for w in weights]).sum()
    return value


def _empty(records: list[LayerRecord], reduction: str) -> Tensor:
    """The penalty of an empty batch: 0 (an empty vector for ``reduction="none"``), still
    connected to the captured tensors."""
    zero = torch.stack([f.source.sum() for r in records for f in r.factors]).sum() * 0.0
    return zero.reshape(1)[:0] if reduction == "none" else zero


def _weight_norm(model: Any) -> Tensor:
    target = unwrap(model)
    if not isinstance(target, nn.Module):
        raise ValueError("tau > 0 needs an nn.Module whose weights it can regularise")
    params = [p for p in target.parameters() if p.dim() >= 2]
    return torch.stack([p.square().sum() for p in params]).sum()
