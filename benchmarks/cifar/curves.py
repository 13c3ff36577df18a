"""Learning curves of the CIFAR-10 runs that recorded them (``--curves``, the ``converged``
preset): per epoch, training accuracy (running, augmented batches), test accuracy and test
``L_x`` (eval mode, before the final batch-norm refresh).

A run counts as *plateaued* when the least-squares trend of its training accuracy over the last
third of its epochs (slope times the span: the gain a straight line through those epochs
makes) is at most :data:`PLATEAU` points. Training accuracy is a running mean over every
augmented training image of the epoch, less noisy than 1,000 test images (whose accuracy has a
binomial standard deviation of about 1.5 points).
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from typing import Any

from . import report

PLATEAU = 1.0
"""Largest trend of training accuracy (points) over the last third of the epochs."""


def has_curves(run: dict[str, Any]) -> bool:
    """Whether the run recorded a test accuracy after every epoch."""
    history = run.get("history") or []
    return bool(history) and all("test_accuracy" in e for e in history)


def summary(run: dict[str, Any]) -> dict[str, float]:
    """Final training and test accuracy, the best test accuracy, the training accuracy's trend
    and the test accuracy's range over the last third of the epochs (points)."""
    history = run["history"]
    tail = history[-max(2, len(history) // 3) :]
    train = [e["accuracy"] for e in tail]
    test = [e["test_accuracy"] for e in tail]
    return {
        "epochs": len(history),
        "train_accuracy": history[-1]["accuracy"],
        "test_accuracy": history[-1]["test_accuracy"],
        "best_test_accuracy": max(e["test_accuracy"] for e in history),
        "train_trend": trend(train),
        "test_range": max(test) - min(test),
        "final_accuracy": run["metrics"]["accuracy"] if run.get("metrics") else float("nan"),
    }


def markdown(runs: Sequence[dict[str, Any]]) -> str:
    """Per run: epochs, final training / test accuracy, best test accuracy, the training
    accuracy's trend and the test accuracy's range over the last third of the epochs, and
    whether training plateaued."""
    runs = sorted((r for r in runs if has_curves(r)), key=_order)
    lines = ["# Learning curves", "", *report.summary_lines(runs)]
    lines += [
        f"- plateaued: the training accuracy's least-squares trend over the last third of the "
        f"epochs is at most {PLATEAU:g} point; test accuracy per epoch is measured before the "
        "batch-norm refresh, the final one (Table 1's) after it",
        "",
        "| backend | method | seed | epochs | train acc | test acc (last epoch) | best | "
        "last third: train trend / test range | plateaued | final test acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = summary(r)
        cfg = r["config"]
        lines.append(
            f"| {cfg['backend']} | {r['label']} | {cfg['seed']} | {s['epochs']} | "
            f"{s['train_accuracy']:.1f} | {s['test_accuracy']:.1f} | "
            f"{s['best_test_accuracy']:.1f} | {s['train_trend']:+.1f} / {s['test_range']:.1f} | "
            f"{'yes' if abs(s['train_trend']) <= PLATEAU else 'no'} | {s['final_accuracy']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def chart(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Three panels: training accuracy, test accuracy and test ``L_x`` against epoch, one line
    per run (colour: method; dashed: seeds after the first)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted((r for r in runs if has_curves(r)), key=_order)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    colours: dict[str, Any] = {}
    palette = plt.get_cmap("tab10")
    for r in runs:
        key = f"{r['config']['backend']} {r['label']}"
        colour = colours.setdefault(key, palette(len(colours) % 10))
        epochs = range(1, len(r["history"]) + 1)
        style = "-" if r["config"]["seed"] == min(x["config"]["seed"] for x in runs) else "--"
        for ax, name in zip(axes, ("accuracy", "test_accuracy", "test_l_x"), strict=True):
            ax.plot(epochs, [e[name] for e in r["history"]], style, color=colour, lw=1.2,
                    label=key if style == "-" else None)  # fmt: skip
    titles = ("training accuracy % (augmented)", "test accuracy %", "test L_x (nats/dim)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels) or 1), fontsize=7)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def trend(values: Sequence[float]) -> float:
    """Least-squares slope of ``values`` against their index, times the span."""
    n = len(values)
    mean_i, mean_v = (n - 1) / 2, sum(values) / n
    cov = sum((i - mean_i) * (v - mean_v) for i, v in enumerate(values))
    var = sum((i - mean_i) ** 2 for i in range(n))
    return cov / var * (n - 1) if var else 0.0


def _order(run: dict[str, Any]) -> tuple[Any, ...]:
    cfg = run["config"]
    rows = report.ROW_ORDER
    row = rows.index(cfg["row"]) if cfg["row"] in rows else len(rows)
    return cfg["backend"], row, cfg["row"], cfg["seed"]
