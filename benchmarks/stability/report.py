"""The gallery's summary: cells per (configuration, method), the Markdown table, the figure."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from .runner import METHOD_TEXT, METHODS, WARNING_WINDOW


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values))


def cells(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (configuration, method) over seeds: failures, held-out NLL over the survivors,
    steps to failure, and the monitor's warnings (for failed and surviving runs)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        if r["split"] == "test":
            groups.setdefault((r["config"], r["method"]), []).append(r)
    out = []
    for (config, method), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        failed = [r for r in rs if r["failed"]]
        alive = [r for r in rs if not r["failed"]]
        final_mean, final_std = _mean_std([r["final_nll"] for r in alive])
        best_mean, best_std = _mean_std([r["best_nll"] for r in alive])
        steps = [r["failure"]["step"] for r in failed]
        reached = [_best_before(r) for r in rs]
        reached = [v for v in reached if v is not None]
        trends = [t for t in (end_trend(r) for r in alive) if t is not None]
        warned = [r for r in failed if r["monitor"]["warning"]["flagged"]]
        early = [r for r in warned if r["monitor"]["warning"]["lead"] > 0]
        ever = [r for r in failed if r["monitor"]["warning"]["flags"]]
        layers = Counter(r["monitor"]["warning"]["layer"] for r in warned)
        out.append({
            "config": config, "method": method, "alpha": rs[0]["alpha"], "seeds": len(rs),
            "failures": len(failed), "failure_rate": len(failed) / len(rs),
            "reasons": dict(Counter(r["failure"]["reason"] for r in failed)),
            "survivors": len(alive),
            "final_nll": final_mean, "final_nll_std": final_std,
            "best_nll": best_mean, "best_nll_std": best_std,
            "best_reached_median": float(np.median(reached)) if reached else None,
            "best_reached": reached,
            "end_trend": float(np.mean(trends)) if trends else None,
            "end_trends": trends,
            "rising_at_end": sum(t > 0 for t in trends),
            "median_steps_to_failure": float(np.median(steps)) if steps else None,
            "steps_to_failure": steps,
            "threshold": float(np.mean([r["threshold"] for r in rs])),
            "thresholds": [r["threshold"] for r in rs],
            "skipped_steps": int(sum(r["skipped_steps"] for r in rs)),
            "flagged_failures": len(warned),
            "flagged_any_time_before": len(ever),
            "flagged_before_failure": len(early),
            "median_lead": float(np.median([r["monitor"]["warning"]["lead"] for r in early]))
            if early else None,
            "flag_layers": dict(layers),
            "flagged_survivors": sum(r["monitor"]["warning"]["flagged"] for r in alive),
            "seconds": float(np.sum([r["train_seconds"] for r in rs])),
        })  # fmt: skip
    return out


END_FRACTION = 0.25
"""The end of a run whose held-out NLL trend is reported: its last quarter of steps."""


def end_trend(run: dict[str, Any]) -> float | None:
    """Least-squares slope of the held-out NLL over the last :data:`END_FRACTION` of a run's
    steps, in nats/dim per 100 steps (positive: still rising when the run stopped); ``None``
    for a failed run or fewer than 3 finite evaluations there."""
    if run["failed"]:
        return None
    steps = run["settings"]["steps"]
    points = [
        (c["step"], c["nll"]) for c in run["curve"]
        if c["step"] >= (1 - END_FRACTION) * steps and math.isfinite(c["nll"])
    ]  # fmt: skip
    if len(points) < 3:
        return None
    x, y = np.array(points, dtype=float).T
    return float(np.polyfit(x, y, 1)[0] * 100)


def _best_before(run: dict[str, Any]) -> float | None:
    """The lowest finite held-out NLL a run reached, failed or not (before any failure)."""
    values = [c["nll"] for c in run["curve"] if math.isfinite(c["nll"])]
    return min(values) if values else None


def _nll(cell: dict[str, Any], key: str) -> str:
    if cell[key] is None:
        return "–"
    text = f"{cell[key]:.3f}"
    return text + (f" ± {cell[key + '_std']:.3f}" if cell["survivors"] > 1 else "")


def _steps(cell: dict[str, Any]) -> str:
    return (
        "–" if cell["median_steps_to_failure"] is None else f"{cell['median_steps_to_failure']:g}"
    )


def main_table(summary: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    """Markdown: one row per (configuration, method)."""
    lookup = {(c["config"], c["method"]): c for c in summary}
    lines = [
        "| configuration (backend) | method | alpha | failed | final held-out NLL (survivors) "
        "| best held-out NLL (survivors) | best reached, all runs (median) "
        "| median steps to failure | failure reasons | skipped steps "
        "| end trend (survivors; rising) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for method in METHODS:
            cell = lookup.get((cfg["name"], method))
            if cell is None:
                continue
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(cell["reasons"].items())) or "–"
            alpha = f"{cell['alpha']:g}" if cell["alpha"] else "–"
            reached = cell["best_reached_median"]
            reached_text = "–" if reached is None else f"{reached:.3f}"
            lines.append(
                f"| {cfg['name']} ({cfg['backend']}) | {method} | {alpha} "
                f"| {cell['failures']}/{cell['seeds']} | {_nll(cell, 'final_nll')} "
                f"| {_nll(cell, 'best_nll')} | {reached_text} | {_steps(cell)} | {reasons} "
                f"| {cell['skipped_steps']} | {_trend(cell)} |"
            )
    return "\n".join(lines)


def _trend(cell: dict[str, Any]) -> str:
    """``"+0.081 (5/5)"``: the survivors' mean end trend (nats/dim per 100 steps) and how
    many of them were still rising."""
    trend = cell.get("end_trend")
    if trend is None:
        return "–"
    return f"{trend:+.3f} ({cell['rising_at_end']}/{len(cell['end_trends'])})"


def failure_matrix(summary: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    """Markdown: failures k/n, configurations x methods (the headline)."""
    lookup = {(c["config"], c["method"]): c for c in summary}
    methods = [m for m in METHODS if any((c["name"], m) in lookup for c in configs)]
    lines = [
        "| configuration (backend) | " + " | ".join(methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    for cfg in configs:
        row = []
        for m in methods:
            cell = lookup.get((cfg["name"], m))
            row.append("–" if cell is None else f"{cell['failures']}/{cell['seeds']}")
        lines.append(f"| {cfg['name']} ({cfg['backend']}) | " + " | ".join(row) + " |")
    total = []
    for m in methods:
        cs = [lookup[(c["name"], m)] for c in configs if (c["name"], m) in lookup]
        total.append(f"{sum(c['failures'] for c in cs)}/{sum(c['seeds'] for c in cs)}")
    lines.append("| **all** | " + " | ".join(total) + " |")
    return "\n".join(lines)


def monitor_table(summary: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    """Markdown: the monitor on plain runs: failures flagged shortly before they happened,
    the lead, the layer; false alarms on runs that survived."""
    lookup = {(c["config"], c["method"]): c for c in summary}
    lines = [
        "| configuration | plain failures | flagged at any step before | flagged within "
        f"{WARNING_WINDOW} steps before | of which >= 1 step before | median lead (steps) "
        "| layer of the last flag | surviving runs flagged (false alarms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        cell = lookup.get((cfg["name"], "plain"))
        if cell is None:
            continue
        layers = ", ".join(f"`{k}` ({v})" for k, v in cell["flag_layers"].items()) or "–"
        lead = "–" if cell["median_lead"] is None else f"{cell['median_lead']:g}"
        lines.append(
            f"| {cfg['name']} | {cell['failures']}/{cell['seeds']} "
            f"| {cell['flagged_any_time_before']} | {cell['flagged_failures']} "
            f"| {cell['flagged_before_failure']} | {lead} | {layers} "
            f"| {cell['flagged_survivors']}/{cell['survivors']} |"
        )
    return "\n".join(lines)


def monitor_runs(runs: list[dict[str, Any]]) -> str:
    """One line per failed plain run: its failure and the monitor's first flag."""
    lines = []
    for r in sorted(runs, key=lambda r: (r["config"], r["seed"])):
        if r["split"] != "test" or r["method"] != "plain" or not r["failed"]:
            continue
        w = r["monitor"]["warning"]
        if w["flags"]:
            flag = (
                f"{w['flags']} flag(s) before, the first at step {w['first_step']}, the last "
                f"on `{w['layer']}` {w['lead']} steps before the failure"
            )
        else:
            flag = "not flagged"
        lines.append(
            f"- {r['config']} seed {r['seed']}: failed at step {r['failure']['step']} "
            f"({r['failure']['reason']}); {flag}"
        )
    return "\n".join(lines) or "- (no plain run failed)"


def config_table(configs: list[dict[str, Any]], summary: list[dict[str, Any]]) -> str:
    """Markdown: the configurations, their reports and their thresholds (per seed: the
    identity flow's NLL depends on each seed's test split)."""
    thresholds: dict[str, list[float]] = {}
    for c in summary:
        thresholds.setdefault(c["config"], []).extend(c["thresholds"])
    lines = [
        "| configuration | backend | failure mode | public reports (what each shows: below) "
        "| steps | lr | threshold "
        "(nats/dim; range over seeds) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        sources = ", ".join(c["sources"]) or "none found"
        values = thresholds.get(c["name"]) or [c["threshold"]]
        low, high = min(values), max(values)
        span = f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f} – {high:,.2f}"
        lines.append(
            f"| {c['name']} | {c['backend']} | {c['mode']} | {sources} | {c['steps']} "
            f"| {c['lr']:g} | identity + {c['margin']:g} = {span} |"
        )
    return "\n".join(lines)


def headline(summary: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    """Sentences: per configuration, which methods failed fewer runs than plain."""
    lookup = {(c["config"], c["method"]): c for c in summary}
    lines = []
    for cfg in configs:
        plain = lookup.get((cfg["name"], "plain"))
        if plain is None:
            continue
        others = [(m, lookup[(cfg["name"], m)]) for m in METHODS[1:] if (cfg["name"], m) in lookup]
        fewer = [f"{m} {c['failures']}/{c['seeds']}" for m, c in others
                 if c["failures"] < plain["failures"]]  # fmt: skip
        more = [f"{m} {c['failures']}/{c['seeds']}" for m, c in others
                if c["failures"] > plain["failures"]]  # fmt: skip
        text = (
            f"- **{cfg['name']}** ({cfg['backend']}): plain failed "
            f"{plain['failures']}/{plain['seeds']}"
        )
        if plain["failures"] == 0:
            text += " (the failure did not reproduce)"
        if fewer:
            text += "; fewer failures: " + ", ".join(fewer)
        if more:
            text += "; more failures: " + ", ".join(more)
        if not fewer and not more:
            text += "; no method changed the failure count"
        lines.append(text + ".")
    return "\n".join(lines)


def methods_text() -> str:
    return "\n".join(f"- `{m}`: {METHOD_TEXT[m]}" for m in METHODS)


def figure(summary: list[dict[str, Any]], configs: list[dict[str, Any]], path: Path) -> None:
    """Left: failure rate, configurations x methods (k/n written in each cell). Right: final
    held-out NLL over the surviving runs per method, one panel per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lookup = {(c["config"], c["method"]): c for c in summary}
    names = [c["name"] for c in configs]
    methods = [m for m in METHODS if any((n, m) in lookup for n in names)]
    rate = np.full((len(names), len(methods)), np.nan)
    for i, n in enumerate(names):
        for j, m in enumerate(methods):
            if (n, m) in lookup:
                rate[i, j] = lookup[(n, m)]["failure_rate"]
    cols = 2
    rows = max(1, math.ceil(len(names) / cols))
    fig = plt.figure(figsize=(15, max(4.5, 2.2 * rows)))
    grid = fig.add_gridspec(rows, 1 + cols, width_ratios=[1.6] + [1] * cols)
    ax = fig.add_subplot(grid[:, 0])
    image = ax.imshow(rate, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i, n in enumerate(names):
        for j, m in enumerate(methods):
            if (n, m) in lookup:
                c = lookup[(n, m)]
                ax.text(j, i, f"{c['failures']}/{c['seeds']}", ha="center", va="center",
                        fontsize=8, color="white" if rate[i, j] > 0.6 else "black")  # fmt: skip
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), [f"{c['name']}\n({c['backend']})" for c in configs],
                  fontsize=8)  # fmt: skip
    ax.set_title("failed runs (of seeds)")
    fig.colorbar(image, ax=ax, fraction=0.04, label="failure rate")
    for k, n in enumerate(names):
        sub = fig.add_subplot(grid[k // cols, 1 + k % cols])
        for j, m in enumerate(methods):
            c = lookup.get((n, m))
            if c is None or c["final_nll"] is None:
                continue
            sub.errorbar([j], [c["final_nll"]], [c["final_nll_std"]], marker="o", ms=4,
                         color=f"C{j}", capsize=2)  # fmt: skip
            sub.annotate(str(c["survivors"]), (j, c["final_nll"]), textcoords="offset points",
                         xytext=(4, 2), fontsize=6)  # fmt: skip
        sub.set_xticks(range(len(methods)), methods, rotation=45, ha="right", fontsize=6)
        sub.tick_params(axis="y", labelsize=6)
        sub.set_title(f"{n}: final held-out NLL (survivors)", fontsize=7)
        sub.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


KLJ_METHODS = ("klj", "klj-val")
"""The methods with the penalty alone, compared with plain and each usual fix."""
FIXES = ("plain", "clip", "wd", "low-lr")


def _by_seed(runs: list[dict[str, Any]], config: str, method: str) -> dict[int, dict[str, Any]]:
    return {
        r["seed"]: r for r in runs
        if r["split"] == "test" and r["config"] == config and r["method"] == method
    }  # fmt: skip


def paired_seeds(
    runs: list[dict[str, Any]], config: str, method: str, other: str
) -> dict[str, Any] | None:
    """``method`` against ``other`` in one configuration, paired by seed (same data,
    initialisation and batches): how many seeds only ``method`` survived, only ``other``,
    both, neither; the differences ``method - other`` of the final held-out NLL over the
    seeds both survived, and of the best held-out NLL reached (before any failure) over every
    seed (nats/dim; negative: ``method`` lower). ``None`` if no seed has both."""
    a, b = _by_seed(runs, config, method), _by_seed(runs, config, other)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    out: dict[str, Any] = {"seeds": seeds, "only": 0, "only_other": 0, "both": 0, "neither": 0,
                           "final": [], "best": []}  # fmt: skip
    for s in seeds:
        x, y = a[s], b[s]
        key = {(False, False): "both", (False, True): "only", (True, False): "only_other",
               (True, True): "neither"}[(x["failed"], y["failed"])]  # fmt: skip
        out[key] += 1
        if key == "both":
            out["final"].append(x["final_nll"] - y["final_nll"])
        bx, by = _best_before(x), _best_before(y)
        if bx is not None and by is not None:
            out["best"].append(bx - by)
    return out


def _diff_text(diffs: list[float]) -> str:
    """``"-0.120 [-0.300, +0.010] 4/5 lower"``; ``–`` without a pair."""
    if not diffs:
        return "–"
    lower = sum(d < 0 for d in diffs)
    return (
        f"{np.mean(diffs):+.3f} [{min(diffs):+.3f}, {max(diffs):+.3f}] {lower}/{len(diffs)} lower"
    )


def paired_table(runs: list[dict[str, Any]], configs: list[dict[str, Any]]) -> str:
    """Markdown: per configuration, ``klj`` and ``klj-val`` against plain and each usual fix,
    paired by seed."""
    lines = [
        "| configuration | KLJ method | against | survived: only KLJ / only other / both / "
        "neither | Δ final held-out NLL (both survived) | Δ best held-out NLL reached "
        "(every seed) |",
        "|---|---|---|---|---|---|",
    ]
    for cfg in configs:
        for method in KLJ_METHODS:
            for other in FIXES:
                p = paired_seeds(runs, cfg["name"], method, other)
                if p is None:
                    continue
                lines.append(
                    f"| {cfg['name']} | {method} | {other} | {p['only']} / {p['only_other']} "
                    f"/ {p['both']} / {p['neither']} | {_diff_text(p['final'])} "
                    f"| {_diff_text(p['best'])} |"
                )
    return "\n".join(lines)


def config_notes(configs: list[dict[str, Any]]) -> str:
    """Markdown: per configuration, its description (the configuration's docstring): what
    each cited report shows and how the failure measured here differs from it."""
    return "\n".join(f"- **{c['name']}**: {c['doc']}" for c in configs if c.get("doc"))
