"""``python -m benchmarks overhead``: what the KLJ penalty costs per training step.

For each backend, a tabular flow (D = 64, 8 layers, :func:`benchmarks.tabular.tabular_flow`)
and a Glow-like image flow (3x32x32, a few million parameters), the median wall time of a full
training step (``zero_grad``, forward, loss, backward, Adam step) for each variant:

==============  ===============================================================================
plain           NLL only, on a copy of the model without capture hooks
plain-again     the same on another copy: how far a ratio of two identical steps reads from 1
                (the measurement's own bias and noise on this machine)
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

Writes ``<device>.json`` (machine, versions, commit, settings, raw times) and ``<device>.md``
(``-quick`` appended with ``--quick``) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture
from klj_reg.kit import MAX_CHECKS

from . import backends
from .backends import BackendFlow

VARIANTS = (
    "plain",
    "plain-again",
    "hooks",
    "floor",
    "capture",
    "capture+check",
    "fused",
    "second-pass",
    "hutchinson",
    "exact",
)
MODELS = ("tabular", "image")
"""Model kinds run by default."""
ALL_MODELS = (*MODELS, "reverse-kl")
REVERSE_VARIANTS = ("plain", "plain-again", "hooks", "capture", "second-pass")
"""Variants of the reverse-KL step (``--models reverse-kl``)."""
TARGET = 1.02
"""The capture path should cost at most this many plain steps."""
REFERENCE = (
    "first reference implementation (hooks recomputing the scales from each subnet's output), "
    "FrEIA Glow on an H200: 2000 -> 1720 images/s, i.e. 1.16x the step time"
)
DEFAULT_OUT = Path("benchmarks/results/overhead")
IMAGE_SHAPE = (3, 32, 32)


@dataclass
class Settings:
    """What a run measured, recorded with its results."""

    device: str
    reps: int = 20
    tabular_reps: int = 100
    warmup: int = 5
    batch: int = 256
    image_batch: int = 8
    dim: int = 64
    layers: int = 8
    hidden: int = 64
    lr: float = 1e-3
    alpha: float = 1e-2
    seed: int = 0
    quick: bool = False
    backends: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: list(MODELS))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))


# ------------------------------------------------------------------------------ models


def tabular(backend: str, settings: Settings) -> BackendFlow:
    """The tabular flow of ``benchmarks.tabular`` (RealNVP-style, ``layers`` layers)."""
    from .tabular import tabular_flow

    return tabular_flow(backend, settings.dim, layers=settings.layers, hidden=settings.hidden)


def _freia_image() -> BackendFlow:
    """IB-INN-style FrEIA flow (AllInOneBlock conv stages, learned downsampling, DCT, one
    fully connected GLOW coupling), ~2.5M parameters."""
    from .image_flows import freia_ibinn

    inn = freia_ibinn(IMAGE_SHAPE, blocks=(2, 4, 4), widths=(32, 64, 128), fc_width=256)
    return BackendFlow("freia", inn, lambda model, x: model(x))


def _nflows_image() -> BackendFlow:
    """Glow with nflows' layers: 3 levels of squeeze, 4 x (ActNorm, 1x1 LU convolution,
    affine coupling with a ConvResidualNet), half the channels factored out per level."""
    from nflows import transforms as T
    from nflows.nn.nets import ConvResidualNet

    def net(c_in: int, c_out: int) -> nn.Module:
        return ConvResidualNet(c_in, c_out, hidden_channels=128, num_blocks=1)

    levels, steps = 3, 4
    multiscale = T.MultiscaleCompositeTransform(levels, split_dim=1)
    c, h, w = IMAGE_SHAPE
    for _ in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        layers: list[nn.Module] = [T.SqueezeTransform()]
        for k in range(steps):
            mask = (torch.arange(c) + k) % 2
            layers += [T.ActNorm(c), T.OneByOneConvolution(c), T.AffineCouplingTransform(mask, net)]
        next_shape = multiscale.add_transform(T.CompositeTransform(layers), (c, h, w))
        if next_shape is not None:
            c, h, w = next_shape
    return BackendFlow("nflows", multiscale, lambda model, x: model(x))


def _normflows_image() -> BackendFlow:
    """Glow with normflows' layers: 3 levels of ``Squeeze`` and 4 ``GlowBlock``s (affine
    coupling, 1x1 LU convolution, ActNorm) in a ``NormalizingFlow``, data to latent through
    ``inverse_and_log_det``."""
    import normflows as nf

    levels, steps, hidden = 3, 4, 128
    c = IMAGE_SHAPE[0]
    data_to_latent: list[nn.Module] = []
    for _ in range(levels):
        c *= 4
        data_to_latent.append(nf.flows.Squeeze())
        data_to_latent += [nf.flows.GlowBlock(c, hidden) for _ in range(steps)]
    size = IMAGE_SHAPE[1] >> levels
    base = nf.distributions.DiagGaussian((c, size, size), trainable=False)
    model = nf.NormalizingFlow(base, data_to_latent[::-1])  # normflows lists latent -> data
    return BackendFlow("normflows", model, _inverse_and_log_det)


def _inverse_and_log_det(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model.inverse_and_log_det(x)


def _zuko_image() -> BackendFlow:
    """zuko has no convolutional layers: 6 affine couplings (MLP 2 x 128) on the flattened
    image with random masks."""
    import zuko

    features = math.prod(IMAGE_SHAPE)
    transforms = [
        zuko.flows.GeneralCouplingTransform(
            features, mask=torch.randperm(features) % 2 == i % 2, hidden_features=(128, 128)
        )
        for i in range(6)
    ]
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(features), torch.ones(features), buffer=True
    )
    flow = zuko.flows.Flow(transforms, base)
    return BackendFlow("zuko", flow, lambda model, x: model().transform.call_and_ladj(x))


IMAGE_BUILDERS: dict[str, Callable[[], BackendFlow]] = {
    "freia": _freia_image,
    "nflows": _nflows_image,
    "normflows": _normflows_image,
    "zuko": _zuko_image,
}


def image(backend: str, settings: Settings) -> BackendFlow:
    """The Glow-like image flow of ``backend`` (``--quick``: ``image_flows``' tiny one)."""
    if settings.quick:
        from .image_flows import build

        return build(backend, "tiny", IMAGE_SHAPE, seed=settings.seed)
    return IMAGE_BUILDERS[backend]()


def batch_of(model_kind: str, backend: str, settings: Settings, device: torch.device) -> Tensor:
    """A fixed synthetic batch: Gaussian features with unequal scales, or images in [-2, 2]
    (flattened for zuko, whose flows take flat vectors: the penalty's own pass needs the
    model's input)."""
    g = torch.Generator().manual_seed(settings.seed)
    if model_kind == "tabular":
        scales = torch.rand(settings.dim, generator=g) * 2 + 0.5
        x = torch.randn(settings.batch, settings.dim, generator=g) * scales
    else:
        x = (torch.rand(settings.image_batch, *IMAGE_SHAPE, generator=g) - 0.5) * 4
        if backend == "zuko":
            x = x.flatten(1)
    return x.to(device)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ------------------------------------------------------------------------------- steps


def nll(flow: BackendFlow, x: Tensor) -> Tensor:
    """Negative log-likelihood per dimension under a standard normal base."""
    z, log_det = flow(x)
    dim = z.shape[1]
    return (0.5 * z.square().sum(1) - log_det).mean() / dim + 0.5 * math.log(2 * math.pi)


def captured_log_abs_d(flow: BackendFlow, x: Tensor) -> Tensor:
    r"""The captured :math:`\log|d|` of one pass of a copy of ``flow`` on ``x``, detached, as
    ``(B, n)``: every per-sample factor's entries (factors shared by the batch left out)."""
    twin = copy.deepcopy(flow)
    capture = klj_reg.attach(twin.model)
    with torch.no_grad():
        twin(x)
    rows = [
        f.log_abs_d().reshape(x.shape[0], -1)
        for r in capture.take()
        for f in r.factors
        if f.source.shape[0] == x.shape[0] and f.selected().stride(0) != 0
    ]
    klj_reg.detach(twin.model)
    return torch.cat(rows, dim=1).detach()


class Step(Protocol):
    """One training step; marks its phase boundaries on the clock it is given, if any."""

    def __call__(self, clock: PhaseClock | None = None) -> None: ...


def make_step(variant: str, flow: BackendFlow, x: Tensor, settings: Settings) -> Step:
    """One training step of ``variant`` on ``flow`` (which it owns) with its own Adam."""
    model = flow.model
    floor = captured_log_abs_d(flow, x).requires_grad_() if variant == "floor" else None
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    capture = (
        klj_reg.attach(model)
        if variant in ("hooks", "capture", "capture+check", "fused", "second-pass")
        else None
    )
    alpha = settings.alpha

    def penalty() -> Tensor:
        with torch.profiler.record_function("klj_penalty"):
            if variant in ("capture", "capture+check"):
                return klj_reg.penalty(model, x, alpha=alpha)
            if variant == "fused":
                return klj_reg.penalty(model, x, alpha=alpha, fused=True)
            if variant == "floor":
                assert floor is not None
                floor.grad = None
                return klj_reg.klj_sum(floor) * (alpha / x[0].numel() / x.shape[0])
            if variant == "second-pass":
                klj_reg.clear(model)  # discard the user's pass: the penalty runs its own
                return klj_reg.penalty(model, x, alpha=alpha)
            return klj_reg.penalty(model, x, alpha=alpha, estimator=variant)

    def step(clock: PhaseClock | None = None) -> None:
        if variant == "capture+check":
            assert capture is not None
            for site in capture.sites.values():
                site.checks_left = MAX_CHECKS
        mark = clock.mark if clock is not None else _no_mark
        mark()
        optimiser.zero_grad(set_to_none=True)
        with torch.profiler.record_function("nll"):
            loss = nll(flow, x)
        mark()
        if variant == "hooks":
            klj_reg.clear(model)
        elif variant not in ("plain", "plain-again"):
            loss = loss + penalty()
        mark()
        loss.backward()
        mark()
        with torch.profiler.record_function("optimiser"):
            optimiser.step()
        mark()

    return step


def banana_log_prob(x: Tensor) -> Tensor:
    """Unnormalised log-density of the reverse-KL target: a banana in the first two
    coordinates, a unit Gaussian in the others."""
    bend = x[:, 1] - 0.5 * x[:, 0].square()
    return -0.5 * (x[:, 0].square() / 4 + bend.square() / 0.25 + x[:, 2:].square().sum(1))


def sample_and_log_q(flow: BackendFlow, n: int, dim: int) -> tuple[Tensor, Tensor]:
    """``n`` samples of ``flow`` and their log-density, through the framework's own sampling
    API (the latent-to-data pass)."""
    model: Any = flow.model
    if flow.backend == "zuko":
        x, log_q = model().rsample_and_log_prob((n,))
        return x, log_q
    if flow.backend == "nflows":
        x, log_q = model.sample_and_log_prob(n)
        return x, log_q
    if flow.backend == "normflows":
        x, log_q = model.sample(n)
        return x, log_q
    like = next(model.parameters())
    z = torch.randn(n, dim, dtype=like.dtype, device=like.device)
    x, log_det = model(z, rev=True, jac=True)
    log_base = -0.5 * z.square().sum(1) - 0.5 * dim * math.log(2 * math.pi)
    return x, log_base - log_det


def make_reverse_step(variant: str, flow: BackendFlow, settings: Settings) -> Step:
    """One reverse-KL training step of ``variant`` on ``flow`` with its own Adam."""
    if variant not in REVERSE_VARIANTS:
        raise ValueError(f"{variant!r} has no reverse-KL step ({', '.join(REVERSE_VARIANTS)})")
    model = flow.model
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    if variant in ("hooks", "capture"):
        klj_reg.attach(model, direction="sample")
    elif variant == "second-pass":
        klj_reg.attach(model)
    dim, alpha = settings.dim, settings.alpha

    def step(clock: PhaseClock | None = None) -> None:
        mark = clock.mark if clock is not None else _no_mark
        mark()
        optimiser.zero_grad(set_to_none=True)
        with torch.profiler.record_function("nll"):
            x, log_q = sample_and_log_q(flow, settings.batch, dim)
            loss = (log_q - banana_log_prob(x)).mean() / dim
        mark()
        if variant == "hooks":
            klj_reg.clear(model)
        elif variant in ("capture", "second-pass"):
            with torch.profiler.record_function("klj_penalty"):
                loss = loss + klj_reg.penalty(
                    model, x if variant == "second-pass" else None, alpha=alpha
                )
        mark()
        loss.backward()
        mark()
        with torch.profiler.record_function("optimiser"):
            optimiser.step()
        mark()

    return step


def _no_mark() -> None:
    pass


PHASES = ("forward", "penalty", "backward", "optimiser")
"""The parts of a step a :class:`PhaseClock` times: ``zero_grad`` and the NLL forward pass,
the penalty (and the loss's sum), ``loss.backward()``, ``optimiser.step()``."""


class PhaseClock:
    """The durations of a step's :data:`PHASES`, from marks at their boundaries: host time
    on CPU; on CUDA, events recorded in the stream (no synchronisation inside the step; read
    after the step's own synchronisation), so the phases are the device's time."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.events = (
            [torch.cuda.Event(enable_timing=True) for _ in range(len(PHASES) + 1)]
            if self.cuda
            else []
        )
        self.marks: list[float] = []
        self.count = 0

    def mark(self) -> None:
        if self.cuda:
            self.events[self.count].record()
        else:
            self.marks.append(time.perf_counter())
        self.count += 1

    def durations(self) -> list[float]:
        """Seconds per phase of the step just marked (after the device is synchronised);
        resets the clock."""
        if self.count != len(PHASES) + 1:
            raise RuntimeError(f"a step made {self.count} marks, not {len(PHASES) + 1}")
        if self.cuda:
            spans = [1e-3 * a.elapsed_time(b) for a, b in itertools.pairwise(self.events)]
        else:
            spans = [b - a for a, b in itertools.pairwise(self.marks)]
        self.marks, self.count = [], 0
        return spans


def checks_pending(flow: BackendFlow) -> int:
    """Captured layers still being checked against their own log-det (on sampling passes,
    for a model attached with ``direction="sample"``)."""
    capture = get_capture(flow.model)
    if capture is None:
        return 0
    left = "sample_checks_left" if capture.direction == "sample" else "checks_left"
    return sum(getattr(s, left) > 0 for s in capture.sites.values())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- measuring


def time_steps(
    steps: dict[str, Step], reps: int, device: torch.device, seed: int
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Seconds per step of each variant, ``reps`` interleaved rounds in shuffled order, and
    the seconds of each step's :data:`PHASES`."""
    order = list(steps)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    phases: dict[str, list[list[float]]] = {name: [] for name in steps}
    clock = PhaseClock(device)
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            _sync(device)
            start = time.perf_counter()
            steps[name](clock)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            phases[name].append(clock.durations())
    return times, phases


def peak_memory(step: Step, device: torch.device) -> float:
    """Peak bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        _sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events = [e for e in events if e.device_type() == torch.autograd.DeviceType.CPU]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return float(peak)


def _phase(event: Any) -> str:
    """Which part of a step a profiled operator belongs to."""
    node = event.cpu_parent
    while node is not None:
        name = node.name
        if name.startswith("autograd::engine::evaluate_function"):
            return "backward"
        if name in ("klj_penalty", "nll", "optimiser"):
            return {"klj_penalty": "penalty", "nll": "forward", "optimiser": "optimiser"}[name]
        node = node.cpu_parent
    return "other"


def count_ops(step: Step, device: torch.device) -> dict[str, Any]:
    """Top-level aten operators of one step by phase, host reads and CUDA kernel launches.

    Host reads: ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``, ``bool(t)``) on
    CPU, ``cudaStreamSynchronize`` calls on CUDA (``tolist()`` shows only there); both
    outside the optimiser (Adam reads its CPU step counters).
    """
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step()
        _sync(device)
    phases: Counter[str] = Counter()
    names: Counter[str] = Counter()
    syncs = kernels = 0
    sync_name = "cudaStreamSynchronize" if device.type == "cuda" else "aten::_local_scalar_dense"
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            kernels += 1
            continue
        if event.name == sync_name and _phase(event) != "optimiser":
            syncs += 1
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        if parent is not None and parent.name.startswith("aten::"):
            continue  # counted through its caller
        phase = _phase(event)
        phases[phase] += 1
        names[f"{phase}:{event.name}"] += 1
    result: dict[str, Any] = {"ops": dict(phases), "syncs": syncs, "by_name": dict(names)}
    if device.type == "cuda":
        result["kernels"] = kernels
    return result


def _quantile(values: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(values), q))


def measure(
    model_kind: str, backend: str, settings: Settings, device: torch.device
) -> dict[str, Any]:
    """Every variant of one model and backend: times, ratios, memory, operator counts."""
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    reverse = model_kind == "reverse-kl"
    build = tabular if model_kind in ("tabular", "reverse-kl") else image
    original = build(backend, settings).to(device)
    x = batch_of("tabular" if reverse else model_kind, backend, settings, device)
    variants = [v for v in settings.variants if not (v == "exact" and model_kind == "image")]
    if reverse:
        variants = [v for v in variants if v in REVERSE_VARIANTS]
    if "plain" not in variants:
        variants.insert(0, "plain")
    result: dict[str, Any] = {
        "model": model_kind,
        "backend": backend,
        "parameters": parameter_count(original),
        "batch": int(x.shape[0]),
        "dim": int(x[0].numel()),
        "variants": {},
    }
    steps: dict[str, Step] = {}
    flows: dict[str, BackendFlow] = {}
    for variant in variants:
        flows[variant] = copy.deepcopy(original)
        try:
            step = (
                make_reverse_step(variant, flows[variant], settings)
                if reverse
                else make_step(variant, flows[variant], x, settings)
            )
            for _ in range(settings.warmup):
                step()
            extra = 0  # until every layer's adapter is verified: the steady state
            while (
                variant not in ("capture+check", "hooks")  # (hooks: no penalty, no checks)
                and checks_pending(flows[variant])
                and extra < MAX_CHECKS
            ):
                step()
                extra += 1
            steps[variant] = step
            result["variants"][variant] = {"extra_warmup": extra}
        except Exception as error:  # report and go on with the other variants
            result["variants"][variant] = {"error": f"{type(error).__name__}: {error}"}
            print(f"  {model_kind}/{backend}/{variant} failed: {type(error).__name__}: {error}")
    if "plain" not in steps:
        return result
    reps = settings.reps if model_kind == "image" else settings.tabular_reps
    times, phases = time_steps(steps, reps, device, settings.seed)
    plain = statistics.median(times["plain"])
    for variant, step in steps.items():
        t = times[variant]
        paired = [a / b for a, b in zip(t, times["plain"], strict=True)]
        entry = result["variants"][variant]
        entry.update(
            median_ms=1e3 * statistics.median(t),
            q25_ms=1e3 * _quantile(t, 0.25),
            q75_ms=1e3 * _quantile(t, 0.75),
            ratio=statistics.median(paired),
            ratio_of_medians=statistics.median(t) / plain,
            paired_q25=_quantile(paired, 0.25),
            paired_q75=_quantile(paired, 0.75),
            times_ms=[1e3 * s for s in t],
            phases_ms={
                phase: 1e3 * statistics.median(spans)
                for phase, spans in zip(PHASES, zip(*phases[variant], strict=True), strict=True)
            },
            checks_pending=checks_pending(flows[variant]),
        )
        try:
            entry["peak_mb"] = peak_memory(step, device) / 2**20
            entry.update(count_ops(step, device))
        except Exception as error:  # profiling is secondary to the timings
            entry["profile_error"] = f"{type(error).__name__}: {error}"
    return result


# ------------------------------------------------------------------------------ report


def _git_commit() -> str:
    """``git describe`` of the checkout, or ``$KLJ_COMMIT`` where there is no repository."""
    if os.environ.get("KLJ_COMMIT"):
        return os.environ["KLJ_COMMIT"]
    try:
        run = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        )
        return run.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _versions(names: list[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ["torch", "numpy", *names]:
        package = {"freia": "FrEIA"}.get(name, name)
        try:
            found[name] = version(package)
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cell(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "—"
    if "error" in entry:
        return "error"
    if "ratio" not in entry:
        return "—"
    if entry["ratio"] == 1.0 and entry["paired_q25"] == entry["paired_q75"] == 1.0:
        return f"1 ({entry['median_ms']:.1f})"
    return (
        f"{entry['ratio']:.3f} [{entry['paired_q25']:.2f}-{entry['paired_q75']:.2f}] "
        f"({entry['median_ms']:.1f})"
    )


def _references(entries: dict[str, Any]) -> str:
    """``; hooks 1.021, floor 1.031, plain-again 1.004``: the reference variants a row has."""
    shown = [
        f"{v} {entries[v]['ratio']:.3f}"
        for v in ("hooks", "floor", "plain-again")
        if "ratio" in entries.get(v, {})
    ]
    return "; " + ", ".join(shown) if shown else ""


def _variant_table(
    caption: str,
    rows: list[dict[str, Any]],
    shown: list[str],
    cell: Callable[[dict[str, Any] | None], str],
) -> list[str]:
    """Markdown lines: ``caption``, then a row per backend and a ``cell`` per variant."""
    lines = [
        "",
        caption,
        "",
        "| backend | " + " | ".join(shown) + " |",
        "|---|" + "---:|" * len(shown),
    ]
    for r in rows:
        if "error" not in r:
            cells = [cell(r["variants"].get(v)) for v in shown]
            lines.append(f"| {r['backend']} | " + " | ".join(cells) + " |")
    return lines


def _phase_cell(entry: dict[str, Any] | None) -> str:
    spans = None if entry is None else entry.get("phases_ms")
    return "—" if spans is None else " / ".join(f"{spans[p]:.2f}" for p in PHASES)


def _memory_cell(entry: dict[str, Any] | None) -> str:
    if entry is None or "peak_mb" not in entry:
        return "—"
    ops = entry["ops"]
    fwd = ops.get("forward", 0) + ops.get("penalty", 0)
    kernels = f", {entry['kernels']} kernels" if "kernels" in entry else ""
    return (
        f"{entry['peak_mb']:.1f} MiB, {fwd}/{ops.get('backward', 0)} ops{kernels}, "
        f"{entry['syncs']} syncs"
    )


PHASE_CAPTION = (
    "Median milliseconds per phase of a step: " + " / ".join(PHASES) + " (zero_grad and the "
    "NLL's forward pass; the penalty and its sum with the NLL; loss.backward(); Adam's step):"
)
MEMORY_CAPTION = (
    "Peak memory of a step above the memory held before it (MiB), and top-level aten "
    "operators per step (forward + penalty / backward), reads of a tensor to the host "
    "(syncs on an accelerator) outside the optimiser:"
)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# KLJ penalty overhead per training step ({report['device']})",
        "",
        f"{report['date']}, commit `{report['commit']}`, torch {report['versions']['torch']}, "
        f"{report['machine'].get('gpu', report['machine']['processor'])}, "
        f"{report['machine']['torch_threads']} torch threads; load average "
        f"{report['load_before']} before, {report['load_after']} after.",
        "",
        f"Median of {s.get('tabular_reps', s['reps'])} (tabular) and {s['reps']} (image) "
        f"interleaved rounds after {s['warmup']} warm-up steps (and until "
        "every layer's self-check finished); each cell is the median over rounds of the ratio "
        "to the round's plain NLL step [interquartile range], with the median step time in "
        "ms. Tabular: D = "
        f"{s['dim']}, {s['layers']} layers, hidden {s['hidden']}, batch {s['batch']}. Image: "
        f"3x32x32, batch {s['image_batch']}. Adam, lr {s['lr']}, alpha {s['alpha']}.",
        f"Target: capture <= {TARGET}x plain; {REFERENCE}.",
        "",
    ]
    variants = [v for v in VARIANTS if v in s["variants"] or v == "plain"]
    for model_kind in s["models"]:
        rows = [r for r in report["results"] if r["model"] == model_kind]
        if not rows:
            continue
        shown = [v for v in variants if any(v in r.get("variants", {}) for r in rows)]
        lines += [f"## {model_kind}", ""]
        if model_kind == "reverse-kl":
            lines += [
                "Reverse-KL steps on the tabular flow: samples through the flow's own sampling "
                "API; capture reads the sampling pass (direction='sample'), second-pass runs a "
                "data-to-latent pass on the samples. Ratios to the plain reverse-KL step.",
                "",
            ]
        lines += [
            "| backend | params | " + " | ".join(shown) + " |",
            "|---|---:|" + "---:|" * len(shown),
        ]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['backend']} | error: {r['error']} |")
                continue
            cells = [_cell(r["variants"].get(v)) for v in shown]
            size = (
                f"{r['parameters'] / 1e6:.2f}M"
                if r["parameters"] >= 1e5
                else f"{r['parameters'] / 1e3:.1f}k"
            )
            lines.append(f"| {r['backend']} | {size} | " + " | ".join(cells) + " |")
        verdicts = [
            f"{r['backend']} {'yes' if e['ratio'] <= TARGET else 'no'} ({e['ratio']:.3f}"
            + _references(r["variants"])
            + ")"
            for r in rows
            if "ratio" in (e := r.get("variants", {}).get("capture", {}))
        ]
        if verdicts:
            lines += ["", f"capture <= {TARGET}x plain: " + ", ".join(verdicts) + "."]
        if any("phases_ms" in e for r in rows for e in r.get("variants", {}).values()):
            lines += _variant_table(PHASE_CAPTION, rows, shown, _phase_cell)
        lines += _variant_table(MEMORY_CAPTION, rows, shown, _memory_cell)
        lines.append("")
    errors = [
        f"- {r['model']}/{r['backend']}/{v}: {e['error']}"
        for r in report["results"]
        for v, e in r.get("variants", {}).items()
        if "error" in e
    ] + [f"- {r['model']}/{r['backend']}: {r['error']}" for r in report["results"] if "error" in r]
    if errors:
        lines += ["## Failures", "", *errors, ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks overhead", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--backend", default="all", help="comma-separated backends, or all")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds of the image flows (default 20; --quick 3)",
    )
    parser.add_argument(
        "--tabular-reps",
        type=int,
        default=None,
        help="timed rounds of the tabular flows, whose steps are short and noisy (default 100)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default 5; --quick 1)"
    )
    parser.add_argument("--batch", type=int, default=None, help="tabular batch (default 256)")
    parser.add_argument(
        "--image-batch", type=int, default=None, help="image batch (default 8 on CPU, 64 on CUDA)"
    )
    parser.add_argument(
        "--models", default=",".join(MODELS), help="tabular,image (or reverse-kl: see above)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=",".join(VARIANTS))
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny models, few reps (for tests)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [m for m in args.models.split(",") if m]
    variants = [v for v in args.variants.split(",") if v]
    for name, chosen, allowed in (("model", models, ALL_MODELS), ("variant", variants, VARIANTS)):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            raise SystemExit(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
    s = Settings(
        device=device, backends=backends.parse(args.backend), models=models, variants=variants
    )
    if args.quick:
        s.quick, s.reps, s.tabular_reps, s.warmup, s.batch, s.image_batch = True, 3, 3, 1, 32, 2
        s.dim, s.layers, s.hidden = 8, 2, 16
    elif device == "cuda":
        s.image_batch = 64
    for name in ("reps", "tabular_reps", "warmup", "batch", "image_batch"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "warmup" else 1):
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
            setattr(s, name, value)
    return s


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    load_before = [round(v, 2) for v in os.getloadavg()]
    commit = _git_commit()  # before the report files make the checkout dirty
    results: list[dict[str, Any]] = []
    warnings.filterwarnings("ignore", message=".*ran its own.*")
    text = ""
    for model_kind in settings.models:
        for backend in settings.backends:
            print(f"{model_kind}/{backend} ...", flush=True)
            start = time.perf_counter()
            try:
                results.append(measure(model_kind, backend, settings, device))
            except Exception as error:
                results.append(
                    {
                        "model": model_kind,
                        "backend": backend,
                        "error": f"{type(error).__name__}: {error}",
                    }
                )
                print(f"  failed: {type(error).__name__}: {error}")
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
            # written after every model/backend, so that a run cut short keeps what it measured
            text = write_report(args.out, settings, device, commit, load_before, results)
    print(text)
    return 0


def write_report(
    out: Path,
    settings: Settings,
    device: torch.device,
    commit: str,
    load_before: list[float],
    results: list[dict[str, Any]],
) -> str:
    """Write ``<device>.json`` and ``<device>.md`` under ``out``; returns the Markdown."""
    report = {
        "device": settings.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": machine(device),
        "versions": _versions(settings.backends),
        "settings": asdict(settings),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "target": TARGET,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = settings.device + ("-quick" if settings.quick else "")
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
