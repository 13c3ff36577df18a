"""``python -m benchmarks outliers``: the paper's Table 2, training with outliers.

A fraction ``r`` in {0.05, 0.1, 0.15} of the training images (of the preset's training set)
gets Gaussian noise ``sigma = 1`` (pixel units, :func:`benchmarks.cifar.data.corrupt`); the six rows
of Table 1 are trained on it and evaluated as in :mod:`benchmarks.cifar.ood` (typicality AUROC per
OoD set and ID accuracy). Default ``alpha = 0.01`` (the Table 2 caption).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ood, report

FRACTIONS = (0.05, 0.1, 0.15)
SIGMA = 1.0
_ROWS = ("ib1", "ib1_klj", "ibinf", "ibinf_klj", "cnll", "cnll_klj")
_COLS = ("rot_rgb", "quickdraw", "tinyimagenet", "noisy", "accuracy")
_PAPER = {  # Table 2: Rot, QuickDraw, TinyImageNet, Noisy, Acc per row
    0.05: [
        [75.9, 67.6, 66.4, 74.1, 85.9],
        [84.7, 74.9, 75.6, 83.2, 84.8],
        [64.9, 59.3, 63.1, 46.2, 89.2],
        [86.8, 86.1, 74.3, 68.4, 87.1],
        [67.9, 82.3, 73.8, 90.2, 45.0],
        [75.8, 85.2, 76.4, 90.1, 41.4],
    ],
    0.1: [
        [70.6, 63.4, 67.8, 73.1, 80.5],
        [83.5, 74.3, 74.2, 83.5, 83.5],
        [60.5, 57.4, 62.7, 47.8, 85.1],
        [86.5, 85.6, 72.2, 66.8, 84.6],
        [62.5, 77.7, 70.6, 87.1, 46.7],
        [72.8, 84.6, 75.3, 88.1, 39.5],
    ],
    0.15: [
        [74.6, 66.6, 59.7, 61.4, 65.0],
        [79.2, 82.8, 72.9, 71.9, 79.7],
        [77.9, 54.4, 54.9, 57.4, 46.5],
        [80.3, 84.0, 83.2, 70.8, 62.6],
        [43.8, 57.4, 75.3, 65.8, 71.5],
        [39.4, 71.6, 81.5, 73.1, 84.9],
    ],
}
PAPER_TABLE2: dict[float, dict[str, dict[str, float]]] = {
    r: {row: dict(zip(_COLS, vals, strict=True)) for row, vals in zip(_ROWS, table, strict=True)}
    for r, table in _PAPER.items()
}


def _folder(out: pathlib.Path, r: float) -> pathlib.Path:
    return out / f"r{r:g}"


def main(argv: list[str] | None = None) -> int:
    p = ood.parser("outliers", "Table 2: CIFAR-10 training set with outliers (Gaussian noise)")
    p.set_defaults(alpha=0.01)
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="outlier ratios r")
    p.add_argument("--sigma", type=float, default=SIGMA, help="noise std (pixels in [0, 1])")
    p.add_argument("--rows", default=None, help="comma-separated row keys (default: all six)")
    args = p.parse_args(argv)
    s = ood.settings(args, "outliers")
    rows = ood.table_rows()
    if args.rows:
        rows = [r for r in rows if r.key in args.rows.split(",")]
    fractions = [float(f) for f in args.fractions.split(",")]
    jobs = []
    for r in fractions:
        variant = {"outlier_fraction": r, "sigma": args.sigma}
        folder = _folder(s.out, r)
        jobs += ood.make_jobs(s, "outliers", rows, lambda b, f=folder: f / b, variant)  # type: ignore[misc]
    if s.rank == 0:
        print(f"outliers: preset {s.preset.name}, {len(jobs)} runs to do on {s.device}")
    records = ood.run_jobs(jobs, s.parallel, desc="outliers")
    return ood.finish(s, "outliers", "table2", records, markdown, chart)


def _fraction(run: dict[str, Any]) -> float:
    return float(run["config"]["variant"]["outlier_fraction"])


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per backend and outlier ratio: Table 2's rows, ours (paper)."""
    lines = ["# CIFAR-10 with outliers (Table 2)", "", *report.summary_lines(runs)]
    lines.append("- outliers: Gaussian noise, sigma in pixel units ([0, 1] images)")
    head = ["method", "Rot", "QuickDraw", "TinyImageNet", "Noisy", "Acc"]
    for (backend,), backend_runs in sorted(report.group(runs, "backend").items()):
        lines += ["", f"## {backend}"]
        for r in sorted({_fraction(x) for x in backend_runs}):
            rr = [x for x in backend_runs if _fraction(x) == r]
            lines += ["", f"### r = {r:g} (typicality AUROC %, accuracy %)", ""]
            lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            rows = report.group(rr, "row")
            for key in report.ordered_rows(rows):
                group = rows[(key,)]
                paper = PAPER_TABLE2.get(r, {}).get(key, {})
                cells = [report.row_label(group)]
                for o in _COLS[:4]:
                    stats = report.mean_std(report.value(x, "auroc_typical", o) for x in group)
                    cells.append(report.cell(stats, paper.get(o)))
                stats = report.mean_std(report.value(x, "accuracy") for x in group)
                cells.append(report.cell(stats, paper.get("accuracy")))
                lines.append("| " + " | ".join(cells) + " |")
            lines += report.paired_lines(rr, heading="####")
        lines += pooled_lines(backend_runs)
    lines += ["", "Numbers in brackets: the paper's Table 2 (alpha = 0.01, 450 epochs).", ""]
    lines.append(report.PAIRED_NOTE)
    return "\n".join(lines) + "\n"


def pooled(runs: Sequence[dict[str, Any]], row: str, column: str) -> report.Paired | None:
    """``row`` minus its baseline row, paired by (outlier ratio, seed) over every ratio in
    ``runs`` (one backend): each pair shares the ratio, the seed and so the corrupted subset,
    initialisation and batches."""
    base = report.baseline_of(row)
    seeds: list[int] = []
    diffs: list[float] = []
    for r in sorted({_fraction(x) for x in runs}):
        at = [x for x in runs if _fraction(x) == r]
        p = report.paired(
            [x for x in at if x["config"]["row"] == row],
            [x for x in at if x["config"]["row"] == base],
            column,
        )
        if p is not None:
            seeds += p.seeds
            diffs += p.diffs
    return report.Paired(tuple(seeds), tuple(diffs)) if diffs else None


def pooled_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Markdown: every + KLJ row's paired differences pooled over the outlier ratios."""
    rows = report.group(runs, "row")
    keys = [k for k in report.ordered_rows(rows) if report.baseline_of(k) and
            (report.baseline_of(k),) in rows]  # fmt: skip
    if not keys:
        return []
    ratios = ", ".join(f"{r:g}" for r in sorted({_fraction(x) for x in runs}))
    header = ["method", "minus", *(report.PAIRED_TITLES[c] for c in report.PAIRED_COLUMNS)]
    lines = [
        "",
        f"### Paired differences pooled over r = {ratios} (pairs: ratio x seed)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in keys:
        cells = [report.row_label(rows[(key,)]), report.row_label(rows[(report.baseline_of(key),)])]
        cells += [report.paired_text(pooled(runs, key, c)) for c in report.PAIRED_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def chart(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Per backend (rows) and OoD set + accuracy (columns): metric against r, one line per
    row of the table (solid: + KLJ), the paper's values as crosses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend = sorted(report.group(runs, "backend").items())
    cols = [("rot_rgb", "Rot"), ("quickdraw", "QuickDraw"), ("tinyimagenet", "TinyImageNet")]
    cols += [("noisy", "Noisy"), ("accuracy", "Acc")]
    colours = {"ib1": "#1f77b4", "ibinf": "#d62728", "cnll": "#2ca02c"}
    fig, axes = plt.subplots(
        max(1, len(by_backend)), 5, figsize=(15, 2.8 * max(1, len(by_backend)) + 0.5),
        squeeze=False,
    )  # fmt: skip
    for i, ((backend,), backend_runs) in enumerate(by_backend):
        rows = report.group(backend_runs, "row")
        for j, (col, title) in enumerate(cols):
            ax = axes[i][j]
            for (key,), group in rows.items():
                base = key.removesuffix("_klj")
                style = "-" if key.endswith("_klj") else "--"
                rs = sorted({_fraction(x) for x in group})
                ys = []
                for r in rs:
                    sel = [x for x in group if _fraction(x) == r]
                    metric = "accuracy" if col == "accuracy" else "auroc_typical"
                    ood_set = None if col == "accuracy" else col
                    stats = report.mean_std(report.value(x, metric, ood_set) for x in sel)
                    ys.append(stats[0] if stats else np.nan)
                colour = colours.get(base, "grey")
                ax.plot(rs, ys, style, marker="o", color=colour, label=report.row_label(group))
                paper = [PAPER_TABLE2.get(r, {}).get(key, {}).get(col, np.nan) for r in rs]
                ax.scatter(rs, paper, marker="x", color=colour, alpha=0.6)
            ax.set_title(f"{backend}: {title}", fontsize=9)
            ax.set_xlabel("outlier ratio r", fontsize=8)
            ax.set_ylim(0, 100)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=6, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
