"""The report: machine, versions, the JSON and the Markdown tables."""

from __future__ import annotations

import datetime
import json
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..common.records import commit_text, machine_text
from .clock import PHASES
from .settings import REFERENCE, TARGET, VARIANTS, ZOO_TARGET, ZOO_VARIANTS, Settings


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
    if s["models"] == ["zoo"]:
        return zoo_markdown(report)
    lines = [
        f"# KLJ penalty overhead per training step ({report['device']})",
        "",
        f"{report['date']}, commit `{commit_text(report['commit'])}`, torch "
        f"{report['versions']['torch']}, {machine_text(report['machine'], False)}; load average "
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


def write_report(
    out: Path,
    settings: Settings,
    metadata: dict[str, Any],
    load_before: list[float],
    results: list[dict[str, Any]],
) -> str:
    """Write ``<device>.json`` and ``<device>.md`` under ``out``; returns the Markdown.
    ``metadata``: :func:`~benchmarks.common.records.run_metadata`'s, taken before the run."""
    report = {
        "device": settings.device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **metadata,
        "settings": asdict(settings),
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "target": ZOO_TARGET if settings.models == ["zoo"] else TARGET,
        "results": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = settings.device + ("-zoo" if settings.models == ["zoo"] else "")
    stem += "-quick" if settings.quick else ""
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (out / f"{stem}.md").write_text(text + "\n")
    return text


def _ratio(entry: dict[str, Any] | None) -> str:
    return "—" if entry is None or "ratio" not in entry else f"{entry['ratio']:.3f}"


def _quotient(v: dict[str, Any]) -> str:
    """``compiled+capture`` over ``compiled``: the capture's cost with the model compiled."""
    a, b = v.get("compiled+capture", {}), v.get("compiled", {})
    if "ratio" not in a or "ratio" not in b:
        return "—"
    return f"{a['ratio'] / b['ratio']:.3f}"


def _excess_cell(found: dict[str, Any] | None) -> str:
    if found is None:
        return "—"
    return f"{found['median']:+.3f} [{found['q25']:+.3f}, {found['q75']:+.3f}]"


def _phase_excess(found: dict[str, Any] | None) -> str:
    if found is None:
        return "—"
    return " / ".join(f"{found['phases'][p]:+.3f}" for p in PHASES)


def _main_phase(found: dict[str, Any]) -> str:
    """The phase where most of the capture's excess over the floor is."""
    phases = found["phases"]
    return max(PHASES, key=lambda p: phases[p])


def _per_layer_us(r: dict[str, Any]) -> float | None:
    """The capture's excess over the floor in microseconds per step and captured layer."""
    layers = r.get("captured_layers")
    if not layers:
        return None
    excess_us = 1e3 * r["capture_minus_floor"]["median"] * r["variants"]["plain"]["median_ms"]
    return float(excess_us / layers)


def _per_layer_text(r: dict[str, Any], target: float) -> str:
    """``; N µs per layer (L layers, P µs of plain step each; TARGET needs Q)``."""
    per_layer = _per_layer_us(r)
    if per_layer is None:
        return ""
    layers = r["captured_layers"]
    plain_us = 1e3 * r["variants"]["plain"]["median_ms"] / layers
    return (
        f"; {per_layer:.0f} µs per captured layer ({layers} layers, {plain_us:.0f} µs of plain "
        f"step each; {target} needs {per_layer / target:.0f})"
    )


def zoo_markdown(report: dict[str, Any]) -> str:
    """The zoo table: per model the reference variants' ratios to plain, (capture - floor)
    with its interquartile range, and that excess split by phase."""
    s = report["settings"]
    target = report.get("target", ZOO_TARGET)
    clock = (
        "the timing thread's CPU time (`time.thread_time`, one torch thread)"
        if s.get("clock") == "cpu"
        else "wall time"
    )
    loads = [r["load"] for r in report["results"] if "load" in r]
    load_range = (
        f" (1-minute load {min(loads):.2f}-{max(loads):.2f} while models ran)" if loads else ""
    )
    rows = [r for r in report["results"] if r.get("model") == "zoo"]
    compiled = any("compiled" in r.get("variants", {}) for r in rows)
    lines = [
        f"# KLJ capture overhead over the arithmetic floor: model zoo ({report['device']})",
        "",
        f"{report['date']}, commit `{commit_text(report['commit'])}`, torch "
        f"{report['versions']['torch']}, {machine_text(report['machine'], False)}; clock: {clock}; "
        "load average "
        f"{report['load_before']} before, {report['load_after']} after{load_range}.",
        "",
        f"Per model, up to {s.get('zoo_reps')} interleaved rounds (fewer where a round is long: "
        f"about {s.get('zoo_seconds')} s of steps per model, at least 8 rounds) after "
        f"{s['warmup']} warm-up steps and the layers' self-checks; batch {s['batch']} "
        f"(images {s['image_batch']}), Adam lr {s['lr']}, alpha {s['alpha']}. Columns "
        "plain-again / dispatch / hooks / floor / capture: median over rounds of the step's "
        "ratio to the "
        "round's plain step. **capture - floor**: median over rounds of (capture - floor) / "
        "plain [interquartile range], the cost of the capture beyond the penalty's own "
        f"arithmetic; target <= {target}. By phase: (capture - floor) of the median "
        "forward / penalty / backward / optimiser times, over the plain step's median.",
        "",
        "| model | params | plain ms | plain-again | dispatch | hooks | floor | capture | "
        "capture - floor [IQR] | by phase (fwd / pen / bwd / opt) |"
        + (" compiled | compiled + capture | their ratio |" if compiled else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" * 3 if compiled else ""),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error']} |")
            continue
        v = r["variants"]
        params = r["parameters"]
        size = f"{params / 1e6:.2f}M" if params >= 1e5 else f"{params / 1e3:.1f}k"
        plain_ms = v.get("plain", {}).get("median_ms")
        found = r.get("capture_minus_floor")
        cells = [
            r["name"],
            size,
            "—" if plain_ms is None else f"{plain_ms:.2f}",
            *(_ratio(v.get(name)) for name in ZOO_VARIANTS[1:]),
            _excess_cell(found),
            _phase_excess(found),
        ]
        if compiled:
            cells += [_ratio(v.get("compiled")), _ratio(v.get("compiled+capture")), _quotient(v)]
        lines.append("| " + " | ".join(cells) + " |")
    measured = [r for r in rows if "capture_minus_floor" in r]
    within = [r for r in measured if r["capture_minus_floor"]["median"] <= target]
    lines += ["", f"Within {target}: {len(within)} of {len(measured)} models."]
    over = [r for r in measured if r["capture_minus_floor"]["median"] > target]
    if over:
        lines += ["", f"Over {target}, where the excess is (largest phase):", ""]
        for r in over:
            found = r["capture_minus_floor"]
            lines.append(
                f"- {r['name']}: {found['median']:+.3f}, mostly {_main_phase(found)} "
                f"({_phase_excess(found)}); hooks alone {r.get('hooks_minus_plain', 0):+.3f}, "
                f"of which dispatch {r.get('dispatch_minus_plain', 0):+.3f}"
                + _per_layer_text(r, target)
            )
    families: dict[str, list[dict[str, Any]]] = {}
    for r in measured:
        families.setdefault(r["family"], []).append(r)
    if families:
        lines += [
            "",
            "Per family: the largest (capture - floor) of its models; the median over its "
            "models of that excess by phase, of hooks alone (hooks - plain) and of torch's "
            "hook dispatch alone (dispatch - plain); and the excess in microseconds of host "
            "time per step and per captured layer (median over its models):",
            "",
            "| family | models | largest capture - floor | by phase (fwd / pen / bwd / opt) "
            "| hooks alone | dispatch alone | µs per step | µs per captured layer |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for family, found in families.items():
            excess = [r["capture_minus_floor"] for r in found]
            phases = " / ".join(
                f"{statistics.median(e['phases'][p] for e in excess):+.3f}" for p in PHASES
            )
            hooks = statistics.median(r.get("hooks_minus_plain", 0.0) for r in found)
            dispatch = statistics.median(r.get("dispatch_minus_plain", 0.0) for r in found)
            micro = statistics.median(
                1e3 * r["capture_minus_floor"]["median"] * r["variants"]["plain"]["median_ms"]
                for r in found
            )
            largest = max(e["median"] for e in excess)
            layered = [u for r in found if (u := _per_layer_us(r)) is not None]
            per_layer = f"{statistics.median(layered):.0f}" if layered else "—"
            lines.append(
                f"| {family} | {len(found)} | {largest:+.3f} | {phases} | {hooks:+.3f} "
                f"| {dispatch:+.3f} | {micro:.0f} | {per_layer} |"
            )
    errors = [
        f"- {r['name']}/{name}: {e['error']}"
        for r in rows
        for name, e in r.get("variants", {}).items()
        if "error" in e
    ]
    if errors:
        lines += ["", "## Failures", "", *errors]
    return "\n".join(lines) + "\n"
