"""``python -m benchmarks overhead``: what the KLJ penalty costs per training step.

For each backend, a tabular flow (D = 64, 8 layers, :func:`benchmarks.common.tabular.tabular_flow`)
and a Glow-like image flow (3x32x32, a few million parameters), the median wall time of a full
training step (``zero_grad``, forward, loss, backward, Adam step) for each variant:

==============  ===============================================================================
plain           NLL only, on a copy of the model without capture hooks
plain-again     the same on another copy: how far a ratio of two identical steps reads from 1
                (the measurement's own bias and noise on this machine)
dispatch        NLL on a copy with a no-op forward hook on every module klj-reg hooks (no
                capture): what torch's hooked call path alone costs (methods klj-reg wraps,
                e.g. zuko's, not included)
hooks           NLL on a model with capture attached, its records dropped and no penalty:
                what capturing costs the forward pass (hooks and records)
floor           NLL + only the penalty's arithmetic, ``klj_sum`` (``expm1(2s) - 2s`` summed),
                forward and backward, on a stored copy of the captured s = log|d|
                (per-sample entries; no hooks, no activation recomputed, no gradient into
                the model): what any implementation of the penalty adds at least here
capture         NLL + ``klj_reg.penalty(model, x)`` after the user's own forward (normal path)
capture+check   the same with every layer's log-det self-check on (what the first batches of
                a training run pay, until each layer's scales are verified)
fused           NLL + ``penalty(model, x, fused=True)`` (divergence through ``torch.compile``)
second-pass     NLL + the penalty on a fresh pass (records cleared, so the penalty runs the
                model on ``x`` again): what a plug-in that recomputes the scales costs
hutchinson      NLL + ``penalty(model, x, estimator="hutchinson")`` (one probe)
exact           NLL + ``penalty(model, x, estimator="exact")`` (tabular only: D backward passes)
==============  ===============================================================================

``--models reverse-kl`` (not run by default) measures the reverse-KL step of variational
inference instead, on the tabular flow: samples drawn through the flow's own sampling API
(normflows ``sample``, zuko ``rsample_and_log_prob``, nflows ``sample_and_log_prob``, FrEIA
``rev=True``), the loss ``mean(log q(x) - log p(x)) / D`` for a fixed banana-shaped target,
with the variants ``plain``, ``plain-again``, ``hooks`` and ``capture`` (the model attached
with ``direction="sample"``, ``penalty(model)`` read from the sampling pass: no extra pass)
and ``second-pass`` (attached as by default, ``penalty(model, x)`` on the samples, which runs
a data-to-latent pass of its own: what a reverse-KL loop paid before sampling passes were
captured).

Every variant trains its own copy of the same initial model with its own optimiser. Steps
are interleaved: after a warm-up, each of ``--reps`` rounds (``--tabular-reps`` for the short,
noisier tabular steps) times one step of every variant in
a shuffled order, synchronising the device around each timed step, so that drifts in machine
load hit all variants alike. Ratios are to ``plain`` in the same process: the median over
rounds of the round's variant step over its plain step (with their interquartile range; the
ratio of the median times is in the JSON too). Each timed step also marks its phases
(``zero_grad`` and the NLL forward pass, the penalty, the backward, Adam's step; for ``hooks``
the penalty phase is dropping the records): host time on CPU, CUDA events on a GPU, reported as
medians, so that a ratio's excess can be read as forward (hooks), penalty and backward time.
Then, per variant,
one more step is measured for peak memory (CUDA: ``max_memory_allocated`` above the allocation
before the step; CPU: the peak of the torch profiler's allocation events during the step) and
one is profiled for operator counts: top-level aten operators in the forward pass, the
penalty, the backward and the optimiser, host reads (syncs on an accelerator) and, on CUDA,
device kernels.

Sections (one module each): ``settings`` (names, :class:`Settings`), ``models`` (the
default tabular and image flows), ``zoo`` (``--models zoo``: every captured layer family of
every framework), ``variants`` (one training step per variant), ``clock`` and ``timing``
(interleaved rounds, phases, memory, operator counts), ``report`` (JSON and Markdown),
``command`` (the command line).

Writes ``<device>.json`` (machine, versions, commit, settings, raw times) and ``<device>.md``
(``-quick`` appended with ``--quick``) under ``--out``.
"""

from __future__ import annotations

import time

from ..common.records import parameter_count
from .clock import PHASES, PhaseClock
from .command import main, parse_args, settings_from
from .models import IMAGE_BUILDERS, batch_of, image, tabular
from .report import markdown, write_report
from .settings import (
    ALL_MODELS,
    DEFAULT_OUT,
    IMAGE_SHAPE,
    MODELS,
    REFERENCE,
    REVERSE_VARIANTS,
    TARGET,
    VARIANTS,
    ZOO_TARGET,
    ZOO_VARIANTS,
    Settings,
)
from .timing import checks_pending, count_ops, measure, peak_memory, time_steps
from .variants import (
    Step,
    banana_log_prob,
    captured_log_abs_d,
    make_reverse_step,
    make_step,
    nll,
    sample_and_log_q,
)

__all__ = [
    "ALL_MODELS",
    "DEFAULT_OUT",
    "IMAGE_BUILDERS",
    "IMAGE_SHAPE",
    "MODELS",
    "PHASES",
    "REFERENCE",
    "REVERSE_VARIANTS",
    "TARGET",
    "VARIANTS",
    "ZOO_TARGET",
    "ZOO_VARIANTS",
    "PhaseClock",
    "Settings",
    "Step",
    "banana_log_prob",
    "batch_of",
    "captured_log_abs_d",
    "checks_pending",
    "count_ops",
    "image",
    "main",
    "make_reverse_step",
    "make_step",
    "markdown",
    "measure",
    "nll",
    "parameter_count",
    "parse_args",
    "peak_memory",
    "sample_and_log_q",
    "settings_from",
    "tabular",
    "time",
    "time_steps",
    "write_report",
]
