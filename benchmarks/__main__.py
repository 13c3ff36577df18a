"""``python -m benchmarks <command> [options]``: one module per command, imported lazily."""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "demo": (
        "benchmarks.toy.demo",
        "digits, with and without KLJ, every installed backend (~2 min)",
    ),
    "linear": ("benchmarks.toy.linear", "the linear-flow figure (paper Fig. 2) and Theorem 3"),
    "ood": (
        "benchmarks.cifar.ood",
        "CIFAR-10 out-of-distribution table (paper Table 1) per backend",
    ),
    "outliers": ("benchmarks.cifar.outliers", "CIFAR-10 with corrupted training images (Table 2)"),
    "trainsize": (
        "benchmarks.cifar.trainsize",
        "CIFAR-10 with a fraction of the training set (Fig. 6)",
    ),
    "calibrated": (
        "benchmarks.cifar.calibrated",
        "the paper's OoD gain at its strengths, regimes A/B (pre-registered, resumable)",
    ),
    "sweep": ("benchmarks.cifar.sweep", "alpha x IB beta sweep (Fig. 4)"),
    "mapping": ("benchmarks.cifar.mapping", "the paper's alpha in klj-reg's units, measured"),
    "tabular": ("benchmarks.tabular", "alpha grid on scikit-learn's tables, 8 flows (~70 min)"),
    "overhead": ("benchmarks.overhead", "cost of the penalty per training step, per backend"),
    "stability": ("benchmarks.stability", "training-failure gallery: KLJ vs the usual fixes"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: python -m benchmarks <command> [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
