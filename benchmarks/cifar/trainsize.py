"""``python -m benchmarks trainsize``: the paper's Fig. 6, training on a fraction of CIFAR-10.

Each run trains on a class-balanced random fraction ``p`` in {0.2, 0.4, 0.6, 0.8} of the
preset's training set (:func:`benchmarks.cifar.data.subset`, drawn per seed) with the IB rows
(γ = 1 and γ → ∞, each without and with KLJ), and reports the typicality AUROC on Rot-RGB and
Noisy CIFAR-10 (Fig. 6's two panels) besides the other OoD sets and the accuracy. The paper
gives Fig. 6 only as a plot, so there are no paper numbers to print beside ours.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ood, report

FRACTIONS = (0.2, 0.4, 0.6, 0.8)
DEFAULT_ROWS = ("ib1", "ib1_klj", "ibinf", "ibinf_klj")
PANELS = (("rot_rgb", "(a) Rot-RGB CIFAR-10"), ("noisy", "(b) Noisy CIFAR-10"))


def main(argv: list[str] | None = None) -> int:
    p = ood.parser("trainsize", "Fig. 6: CIFAR-10 with a fraction p of the training set")
    p.add_argument("--fractions", default=",".join(map(str, FRACTIONS)), help="fractions p")
    p.add_argument("--rows", default=",".join(DEFAULT_ROWS), help="row keys (see ood --rows)")
    args = p.parse_args(argv)
    s = ood.settings(args, "trainsize")
    rows = [r for r in ood.table_rows() if r.key in args.rows.split(",")]
    jobs = []
    for frac in (float(f) for f in args.fractions.split(",")):
        folder = s.out / f"p{frac:g}"
        variant = {"train_fraction": frac}
        jobs += ood.make_jobs(s, "trainsize", rows, lambda b, f=folder: f / b, variant)  # type: ignore[misc]
    if s.rank == 0:
        print(f"trainsize: preset {s.preset.name}, {len(jobs)} runs to do on {s.device}")
    records = ood.run_jobs(jobs, s.parallel, desc="trainsize")
    return ood.finish(s, "trainsize", "fig6", records, markdown, chart)


def _fraction(run: dict[str, Any]) -> float:
    return float(run["config"]["variant"]["train_fraction"])


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per backend: one table per OoD set, rows x fractions p (typicality AUROC %), and
    accuracy."""
    lines = [
        "# CIFAR-10 with a fraction of the training set (Fig. 6)",
        "",
        *report.summary_lines(runs),
    ]
    lines.append("- the paper gives Fig. 6 as a plot only: no paper numbers beside ours")
    metrics = [(o, f"{report.OOD_TITLES[o]}: typicality AUROC %") for o in report.OOD_SETS]
    metrics.append(("accuracy", "Accuracy %"))
    for (backend,), backend_runs in sorted(report.group(runs, "backend").items()):
        fractions = sorted({_fraction(x) for x in backend_runs})
        sizes = {f: _train_size(backend_runs, f) for f in fractions}
        lines += ["", f"## {backend}"]
        rows = report.group(backend_runs, "row")
        for metric, title in metrics:
            head = ["method", *(f"p = {f:g} ({sizes[f]})" for f in fractions)]
            lines += ["", f"### {title}", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "---|" * len(head))
            for key in report.ordered_rows(rows):
                group = rows[(key,)]
                cells = [report.row_label(group)]
                for f in fractions:
                    sel = [x for x in group if _fraction(x) == f]
                    cells.append(report.metric_cell(sel, metric))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _train_size(runs: Sequence[dict[str, Any]], fraction: float) -> str:
    """Training images of a fraction, from the runs' data source (``n/a`` if unknown)."""
    sizes = {x.get("train_images") for x in runs if _fraction(x) == fraction}
    sizes.discard(None)
    return f"{sizes.pop()} images" if len(sizes) == 1 else "n/a"


def chart(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Fig. 6's layout: typicality AUROC against p, panels Rot-RGB and Noisy, one line per
    row (solid: + KLJ); one row of panels per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend = sorted(report.group(runs, "backend").items())
    n = max(1, len(by_backend))
    fig, axes = plt.subplots(n, 2, figsize=(9, 3 * n + 0.5), squeeze=False)
    colours = {"ib1": "#1f77b4", "ibinf": "#d62728", "cnll": "#2ca02c"}
    for i, ((backend,), backend_runs) in enumerate(by_backend):
        rows = report.group(backend_runs, "row")
        for j, (ood_set, title) in enumerate(PANELS):
            ax = axes[i][j]
            for key in report.ordered_rows(rows):
                group = rows[(key,)]
                ps = sorted({_fraction(x) for x in group})
                ys = []
                for f in ps:
                    sel = [x for x in group if _fraction(x) == f]
                    stats = report.mean_std(report.value(x, "auroc_typical", ood_set) for x in sel)
                    ys.append(stats[0] if stats else np.nan)
                style = "-" if key.endswith("_klj") else "--"
                colour = colours.get(key.removesuffix("_klj"), "grey")
                ax.plot(ps, ys, style, marker="o", color=colour, label=report.row_label(group))
            ax.set_title(f"{backend}: {title}", fontsize=9)
            ax.set_xlabel("fraction p of the training set", fontsize=8)
            ax.set_ylabel("typicality AUROC %", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
