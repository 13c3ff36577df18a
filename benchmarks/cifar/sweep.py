"""``python -m benchmarks sweep``: the paper's Fig. 4, KLJ weight alpha x IB trade-off beta.

The IB objective for beta (the paper's γ) in {0.03, 0.17, 1, 5.62, 31.6} and alpha in
{0, 1e-3, 1e-2, 1e-1}: typicality AUROC per OoD set against beta, one line per alpha, as in
Fig. 4. The paper gives Fig. 4 only as a plot, so there are no paper numbers beside ours.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import ood, report

ALPHAS = (0.0, 1e-3, 1e-2, 1e-1)
BETAS = (0.03, 0.17, 1.0, 5.62, 31.6)


def main(argv: list[str] | None = None) -> int:
    p = ood.parser("sweep", "Fig. 4: KLJ alpha x IB beta sweep on CIFAR-10")
    p.add_argument("--alphas", default=",".join(f"{a:g}" for a in ALPHAS))
    p.add_argument("--betas", default=",".join(f"{b:g}" for b in BETAS))
    args = p.parse_args(argv)
    s = ood.settings(args, "sweep")
    jobs = []
    for alpha in (float(a) for a in args.alphas.split(",")):
        rows = [
            ood.Row(f"b{beta:g}_a{alpha:g}", f"IB γ={beta:g}, α={alpha:g}", "ib", beta, alpha > 0)
            for beta in (float(b) for b in args.betas.split(","))
        ]
        jobs += ood.make_jobs(s, "sweep", rows, lambda b: s.out / b, alpha=alpha)
    if s.rank == 0:
        print(f"sweep: preset {s.preset.name}, {len(jobs)} runs to do on {s.device}")
    records = ood.run_jobs(jobs, s.parallel, desc="sweep")
    return ood.finish(s, "sweep", "fig4", records, markdown, chart)


def _beta(run: dict[str, Any]) -> float:
    return float(run["config"]["beta"])


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per backend and OoD set: alpha (rows) x beta (columns), typicality AUROC %."""
    lines = ["# KLJ alpha x IB beta sweep (Fig. 4)", "", *report.summary_lines(runs)]
    lines.append("- the paper gives Fig. 4 as a plot only: no paper numbers beside ours")
    metrics = [(o, f"{report.OOD_TITLES[o]}: typicality AUROC %") for o in report.OOD_SETS]
    metrics.append(("accuracy", "Accuracy %"))
    for (backend,), backend_runs in sorted(report.group(runs, "backend").items()):
        betas = sorted({_beta(x) for x in backend_runs})
        by_alpha = report.group(backend_runs, "alpha")
        lines += ["", f"## {backend}"]
        for metric, title in metrics:
            head = ["alpha", *(f"β = {b:g}" for b in betas)]
            lines += ["", f"### {title}", "", "| " + " | ".join(head) + " |"]
            lines.append("|" + "---|" * len(head))
            for (alpha,), group in sorted(by_alpha.items()):
                cells = [f"{alpha:g}"]
                for b in betas:
                    sel = [x for x in group if _beta(x) == b]
                    cells.append(report.metric_cell(sel, metric))
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def chart(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Fig. 4's layout: one panel per OoD set, typicality AUROC against beta (log scale),
    one line per alpha; one row of panels per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend = sorted(report.group(runs, "backend").items())
    n = max(1, len(by_backend))
    fig, axes = plt.subplots(n, 4, figsize=(14, 2.9 * n + 0.5), squeeze=False, sharey=True)
    for i, ((backend,), backend_runs) in enumerate(by_backend):
        by_alpha = sorted(report.group(backend_runs, "alpha").items())
        for j, ood_set in enumerate(report.OOD_SETS):
            ax = axes[i][j]
            for (alpha,), group in by_alpha:
                betas = sorted({_beta(x) for x in group})
                ys = []
                for b in betas:
                    sel = [x for x in group if _beta(x) == b]
                    stats = report.mean_std(report.value(x, "auroc_typical", ood_set) for x in sel)
                    ys.append(stats[0] if stats else np.nan)
                ax.plot(betas, ys, marker="o", label=f"α = {alpha:g}")
            ax.set_xscale("log")
            ax.set_title(f"{backend}: {report.OOD_TITLES[ood_set]}", fontsize=9)
            ax.set_xlabel("IB β (γ)", fontsize=8)
            if j == 0:
                ax.set_ylabel("typicality AUROC %", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=len(labels) or 1, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
