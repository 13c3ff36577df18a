"""Interleaved timing of the variants' steps, memory, operator counts: one model's row."""

from __future__ import annotations

import contextlib
import copy
import os
import random
import statistics
import time
from collections import Counter
from typing import Any

import numpy as np
import torch

import klj_reg
from klj_reg.capture import get_capture
from klj_reg.kit import MAX_CHECKS, lifted

from ..common.backends import BackendFlow
from ..common.records import parameter_count
from . import zoo
from .clock import PHASES, PhaseClock, sync
from .models import batch_of, image, tabular
from .settings import COMPILED_VARIANTS, REVERSE_VARIANTS, ZOO_VARIANTS, Settings
from .variants import Step, make_reverse_step, make_step
from .zoo import ZooModel


def checks_pending(flow: BackendFlow) -> int:
    """Captured layers still being checked against their own log-det (on sampling passes,
    for a model attached with ``direction="sample"``)."""
    capture = get_capture(flow.model)
    if capture is None:
        return 0
    left = "sample_checks_left" if capture.direction == "sample" else "checks_left"
    return sum(getattr(s, left) > 0 for s in capture.sites.values())


UNATTACHED = frozenset({"plain", "plain-again", "floor", "dispatch"})
"""Variants whose model is not attached: timed with klj-reg's wrappers lifted
(:func:`klj_reg.kit.lifted`), as that model would run in a process of its own. While another
model is attached, its classes' watched methods and the framework functions it taps run
through klj-reg's wrappers for every instance; timed so, the plain step (the denominator)
and the floor would carry part of the capture's cost."""


def time_steps(
    steps: dict[str, Step],
    reps: int,
    device: torch.device,
    seed: int,
    clock: str = "wall",
    unattached: frozenset[str] = UNATTACHED,
) -> tuple[dict[str, list[float]], dict[str, list[list[float]]]]:
    """Seconds per step of each variant, ``reps`` interleaved rounds in shuffled order, and
    the seconds of each step's :data:`PHASES`; ``clock="cpu"``: the thread's CPU time. The
    ``unattached`` variants run with klj-reg's wrappers lifted (outside the timed part)."""
    order = list(steps)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in steps}
    phases: dict[str, list[list[float]]] = {name: [] for name in steps}
    marks = PhaseClock(device, clock)
    now = time.thread_time if clock == "cpu" else time.perf_counter
    for _ in range(reps):
        rng.shuffle(order)
        for name in order:
            with lifted() if name in unattached else contextlib.nullcontext():
                sync(device)
                start = now()
                steps[name](marks)
                sync(device)
                times[name].append(now() - start)
            phases[name].append(marks.durations())
    return times, phases


def peak_memory(step: Step, device: torch.device) -> float:
    """Peak bytes allocated during one step above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
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
        sync(device)
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
    reps = settings.reps if model_kind == "image" else settings.tabular_reps
    result: dict[str, Any] = {"model": model_kind, "backend": backend}
    return measure_flow(result, original, x, variants, reps, settings, device, reverse=reverse)


def measure_zoo(entry: ZooModel, settings: Settings, device: torch.device) -> dict[str, Any]:
    """The zoo model ``entry``: its variants (:data:`ZOO_VARIANTS` of ``settings.variants``),
    timed in ``settings.zoo_reps`` rounds or as many as ``settings.zoo_seconds`` allow, and
    the capture's excess over the floor."""
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    original = zoo.build(entry, settings).to(device)
    x = zoo.batch(entry, original, settings).to(device)
    variants = [v for v in settings.variants if v in ZOO_VARIANTS or v in COMPILED_VARIANTS]
    result: dict[str, Any] = {
        "model": "zoo",
        "name": entry.name,
        "family": entry.family,
        "backend": entry.backend,
        "size": entry.size,
    }
    result.update(captured(original, x))
    result = measure_flow(result, original, x, variants, settings.zoo_reps, settings, device)
    result.update(excess(result))
    result["load"] = round(os.getloadavg()[0], 2)
    return result


def captured(flow: BackendFlow, x: torch.Tensor) -> dict[str, int]:
    """How many layers record in one pass of a copy of ``flow`` on ``x``, and their factors:
    what the capture's per-layer costs scale with."""
    twin = copy.deepcopy(flow)
    capture = klj_reg.attach(twin.model)
    with torch.no_grad():
        twin(x)
    records = capture.take()
    klj_reg.detach(twin.model)
    return {"captured_layers": len(records), "factors": sum(len(r.factors) for r in records)}


def excess(result: dict[str, Any]) -> dict[str, Any]:
    """(capture - floor) / plain per round (median, interquartile range), and per phase the
    difference of the capture's and the floor's median phase times over the plain step's
    median time; the same for hooks - plain (forward) where both were measured."""
    entries = result.get("variants", {})
    found: dict[str, Any] = {}
    if not all("paired" in entries.get(v, {}) for v in ("capture", "floor")):
        return found
    rounds = [
        c - f for c, f in zip(entries["capture"]["paired"], entries["floor"]["paired"], strict=True)
    ]
    plain_ms = entries["plain"]["median_ms"]
    found["capture_minus_floor"] = {
        "median": statistics.median(rounds),
        "q25": _quantile(rounds, 0.25),
        "q75": _quantile(rounds, 0.75),
        "phases": {
            p: (entries["capture"]["phases_ms"][p] - entries["floor"]["phases_ms"][p]) / plain_ms
            for p in PHASES
        },
    }
    for variant in ("floor", "hooks", "dispatch", "plain-again"):
        if "paired" in entries.get(variant, {}):
            paired = entries[variant]["paired"]
            found[f"{variant}_minus_plain"] = statistics.median(paired) - 1
    return found


def measure_flow(
    result: dict[str, Any],
    original: BackendFlow,
    x: torch.Tensor,
    variants: list[str],
    reps: int,
    settings: Settings,
    device: torch.device,
    reverse: bool = False,
) -> dict[str, Any]:
    """Every variant of ``original`` on ``x``, each on its own copy, into ``result``."""
    original = original.to(device)
    if "plain" not in variants:
        variants = ["plain", *variants]
    result.update(
        parameters=parameter_count(original),
        batch=int(x.shape[0]),
        dim=int(x[0].numel()),
        variants={},
    )
    steps: dict[str, Step] = {}
    flows: dict[str, BackendFlow] = {}
    warm_times: list[float] = []
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
            start = time.perf_counter()
            step()
            warm_times.append(time.perf_counter() - start)
            steps[variant] = step
            result["variants"][variant] = {"extra_warmup": extra}
        except Exception as error:  # report and go on with the other variants
            result["variants"][variant] = {"error": f"{type(error).__name__}: {error}"}
            print(
                f"  {result.get('name', result['model'])}/{variant} failed: "
                f"{type(error).__name__}: {error}"
            )
    if "plain" not in steps:
        return result
    if result["model"] == "zoo" and warm_times:
        # a budget of timed seconds per model: long steps get fewer rounds (at least 8)
        affordable = int(settings.zoo_seconds / max(sum(warm_times), 1e-9))
        reps = max(min(reps, affordable), min(reps, 8))
    times, phases = time_steps(steps, reps, device, settings.seed, settings.clock)
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
            paired=paired,
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
