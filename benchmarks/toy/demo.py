"""``python -m benchmarks demo``: digits, with and without KLJ, every installed backend.

No download: scikit-learn's 8x8 digits (1,797 images, 17 grey levels) are the in-distribution
data. A fixed stratified split (1,437 train / 360 test). Pixels are dequantised,
:math:`u = (v + \\mathcal U[0, 1)) / 17 \\in [0, 1)` (fresh noise every training batch), and
mapped to the flow's input by one fixed scalar affine map (the clean training split's pixel
mean and standard deviation). For each backend a RealNVP-style flow
(:func:`benchmarks.common.tabular.tabular_flow`) is trained on ``mean NLL / D`` with and without
``klj_reg.penalty(model, x, alpha=alpha, normaliser="dim")`` (per dimension, like the NLL), under

(a) outliers: a fraction ``r`` of the training images (exactly ``round(r n)``) plus fixed
    Gaussian noise of standard deviation 1 in the [0, 1] scale (the paper's Table 2 protocol,
    no clipping);
(b) small training sets: a class-balanced fraction ``p`` of the training split (exactly
    ``round(p n_c)`` images of each class c; subsets nested in p).

``r = 0`` and ``p = 1`` are the same run. Every run takes the same number of Adam steps.
Reported: test NLL in bits per dimension of the 17-level data (clean test images, fixed
dequantisation; uniform guessing is log2 17 = 4.09), and OoD AUROC (scikit-learn, score =
NLL, higher = OoD) of the test images against four OoD sets made from them: Gaussian noise
(sigma = 0.03), left-right mirrored, transposed and inverted (1 - u) digits; and their mean.

A run's training subset, outliers, initialisation, batches and dequantisation noise depend
only on its seed, so plain and KLJ runs differ only in the loss; runs are single-threaded, so
results are the same on rerun on the same machine, whatever ``--jobs``. Writes
``demo.json``, ``demo.png`` and ``summary.md`` to ``--out``: by default
``benchmarks/runs/demo`` (ignored by git, so that ``make demo`` leaves a checkout clean); the
committed results were written with ``--out benchmarks/results/demo``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import klj_reg

from ..common.backends import BackendFlow, parse
from ..common.records import machine_text, parameter_count, run_metadata
from ..common.tabular import tabular_flow

RATIOS = (0.0, 0.05, 0.1, 0.15)
FRACTIONS = (0.2, 0.4, 0.6, 0.8, 1.0)
OOD_SETS = ("noisy", "mirrored", "transposed", "inverted")
LEVELS = 17  # digits pixels are integers 0..16
OUTLIER_SIGMA = 1.0
OOD_NOISE_SIGMA = 0.03
TEST_SIZE = 360


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides its (backend, r, p, seed, alpha)."""

    layers: int = 4
    hidden: int = 64
    kind: str = "realnvp"
    steps: int = 250
    batch: int = 256
    lr: float = 2e-3
    clip: float = 10.0


QUICK = Settings(layers=2, hidden=16, steps=12, batch=128)


@dataclass(frozen=True)
class Run:
    backend: str
    ratio: float
    fraction: float
    seed: int
    alpha: float


# --- data -------------------------------------------------------------------------------------


def digits() -> dict[str, np.ndarray]:
    """The fixed split: integer pixels (0..16) and labels, train and test."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x.astype(np.float32), y, test_size=TEST_SIZE, stratify=y, random_state=0
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def dequantise(v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Integer levels ``v`` to ``(v + U[0, 1)) / 17`` in [0, 1)."""
    return ((v + rng.random(v.shape, dtype=np.float32)) / LEVELS).astype(np.float32)


def balanced_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of exactly ``round(fraction * n_c)`` images of each class c; for one generator
    state the subsets are nested in ``fraction`` (prefixes of one permutation per class)."""
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        order = rng.permutation(members)
        picked.append(order[: int(round(fraction * len(members)))])
    return np.sort(np.concatenate(picked))


def outlier_offsets(n: int, dim: int, ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Additive corruption: exactly ``round(ratio * n)`` rows of N(0, 1), the rest zero; for
    one generator state the corrupted sets are nested in ``ratio``, with the same noise."""
    noise = OUTLIER_SIGMA * rng.standard_normal((n, dim)).astype(np.float32)
    bad = rng.permutation(n)[: int(round(ratio * n))]
    offsets = np.zeros((n, dim), dtype=np.float32)
    offsets[bad] = noise[bad]
    return offsets


def ood_sets(u_test: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """OoD images made from the (dequantised) test images, in the [0, 1] scale."""
    images = u_test.reshape(-1, 8, 8)
    noise = OOD_NOISE_SIGMA * rng.standard_normal(u_test.shape).astype(np.float32)
    return {
        "noisy": u_test + noise,
        "mirrored": images[:, :, ::-1].reshape(len(u_test), -1),
        "transposed": images.transpose(0, 2, 1).reshape(len(u_test), -1),
        "inverted": 1.0 - u_test,
    }


class Data:
    """The split, its fixed test/OoD sets, and the scalar input map."""

    def __init__(self) -> None:
        split = digits()
        self.v_train, self.y_train = split["x_train"], split["y_train"]
        rng = np.random.default_rng(12345)
        clean = dequantise(self.v_train, rng)
        self.mean, self.std = float(clean.mean()), float(clean.std())
        self.u_test = dequantise(split["x_test"], rng)
        self.y_test = split["y_test"]
        self.ood = ood_sets(self.u_test, rng)
        self.dim = self.v_train.shape[1]

    def inputs(self, u: np.ndarray) -> Tensor:
        """[0, 1] pixels to the flow's input scale."""
        return torch.from_numpy(np.ascontiguousarray((u - self.mean) / self.std, np.float32))

    def bits_per_dim(self, nll: Tensor) -> Tensor:
        """NLL (nats) of flow inputs to bits/dim of the 17-level data (``v + U`` scale)."""
        return (nll + self.dim * math.log(LEVELS * self.std)) / (self.dim * math.log(2))


# --- one run ----------------------------------------------------------------------------------


def nll_nats(flow: BackendFlow, x: Tensor) -> Tensor:
    """Per-sample negative log-likelihood under the standard normal base, in nats."""
    z, log_det = flow(x)
    return 0.5 * z.square().sum(1) + 0.5 * z.shape[1] * math.log(2 * math.pi) - log_det


def train_set(data: Data, run: Run) -> dict[str, np.ndarray]:
    """The run's training images (integer levels), labels and fixed outlier offsets; the same
    for every backend and for plain / KLJ runs of one seed."""
    index = balanced_subset(data.y_train, run.fraction, np.random.default_rng([run.seed, 0]))
    offsets = outlier_offsets(len(index), data.dim, run.ratio, np.random.default_rng([run.seed, 1]))
    return {"v": data.v_train[index], "y": data.y_train[index], "offsets": offsets}


def evaluate(flow: BackendFlow, data: Data) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    flow.eval()
    with torch.no_grad():
        test = data.bits_per_dim(nll_nats(flow, data.inputs(data.u_test))).double().numpy()
        auroc = {}
        for name, u in data.ood.items():
            ood = data.bits_per_dim(nll_nats(flow, data.inputs(u))).double().numpy()
            # a NaN / infinite NLL ranks as most OoD (test_bpd stays NaN / inf: visible)
            scores = np.nan_to_num(np.concatenate([test, ood]), nan=1e30, posinf=1e30)
            labels = np.r_[np.zeros(len(test)), np.ones(len(ood))]
            auroc[name] = 100.0 * float(roc_auc_score(labels, scores))
    auroc["mean"] = float(np.mean([auroc[k] for k in OOD_SETS]))
    return {
        "test_bpd": float(test.mean()),
        "test_bpd_median": float(np.median(test)),
        "auroc": auroc,
    }


def train_one(run: Run, settings: Settings) -> dict[str, Any]:
    """Train one flow and evaluate it; deterministic given (run, settings)."""
    torch.set_num_threads(1)
    data = _data()
    chosen = train_set(data, run)
    torch.manual_seed(run.seed)
    np.random.seed(run.seed)  # FrEIA draws its permutations from numpy's global generator
    flow = tabular_flow(run.backend, data.dim, settings.layers, settings.hidden, settings.kind)
    opt = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    rng = np.random.default_rng([run.seed, 2])  # batches and their dequantisation noise
    n = len(chosen["v"])
    batch = min(settings.batch, n)
    start, order, at, losses = time.perf_counter(), rng.permutation(n), 0, []
    flow.train()
    for _ in range(settings.steps):
        if at + batch > n:  # epoch done: reshuffle, drop the remainder
            order, at = rng.permutation(n), 0
        idx, at = order[at : at + batch], at + batch
        u = dequantise(chosen["v"][idx], rng) + chosen["offsets"][idx]
        x = data.inputs(u)
        loss = nll_nats(flow, x).mean() / data.dim
        if run.alpha:
            # a per-dimension NLL, so a per-dimension penalty (docs/choosing-alpha.md)
            loss = loss + klj_reg.penalty(flow.model, x, alpha=run.alpha, normaliser="dim")
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(flow.parameters(), settings.clip)
        opt.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    counts = np.bincount(chosen["y"], minlength=10)
    return {
        **asdict(run),
        "n_train": n,
        "n_corrupted": int((chosen["offsets"] != 0).any(1).sum()),
        "class_counts": counts.tolist(),
        "parameters": parameter_count(flow),
        "final_loss": losses[-1],
        "train_seconds": seconds,
        **evaluate(flow, data),
    }


_DATA: Data | None = None


def _data() -> Data:
    global _DATA
    if _DATA is None:
        _DATA = Data()
    return _DATA


# --- grid, tables, figure -----------------------------------------------------------------------


def grid(backends: list[str], seeds: int, alpha: float) -> list[Run]:
    """Every (backend, setting, seed, +-KLJ) run; r = 0, p = 1 appears once."""
    settings = [(r, 1.0) for r in RATIOS] + [(0.0, p) for p in FRACTIONS if p != 1.0]
    return [
        Run(b, r, p, s, a)
        for b in backends
        for r, p in settings
        for s in range(seeds)
        for a in (0.0, alpha)
    ]


def run_all(runs: list[Run], settings: Settings, jobs: int) -> list[dict[str, Any]]:
    from tqdm import tqdm

    results: list[dict[str, Any]] = [{} for _ in runs]
    bar = tqdm(total=len(runs), desc="demo runs", unit="run", file=sys.stderr)
    if jobs <= 1:
        for i, run in enumerate(runs):
            results[i] = train_one(run, settings)
            bar.update()
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
            futures = {pool.submit(train_one, run, settings): i for i, run in enumerate(runs)}
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                bar.update()
    bar.close()
    return results


def cells(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and std over seeds per (backend, r, p, alpha)."""
    groups: dict[tuple[str, float, float, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["backend"], r["ratio"], r["fraction"], r["alpha"]), []).append(r)
    out = []
    for (backend, ratio, fraction, alpha), rs in groups.items():
        metrics = {"test_bpd": [r["test_bpd"] for r in rs]}
        for k in (*OOD_SETS, "mean"):
            metrics[f"auroc_{k}"] = [r["auroc"][k] for r in rs]
        cell: dict[str, Any] = {
            "backend": backend, "ratio": ratio, "fraction": fraction, "alpha": alpha,
            "seeds": len(rs),
        }  # fmt: skip
        for k, v in metrics.items():
            cell[k] = float(np.mean(v))
            cell[f"{k}_std"] = float(np.std(v))
        out.append(cell)
    return out


def _fmt(cell: dict[str, Any], key: str, digits: int) -> str:
    text = f"{cell[key]:.{digits}f}"
    return text + (f" ± {cell[key + '_std']:.{digits}f}" if cell["seeds"] > 1 else "")


LEGEND = (
    "r: fraction of training images with N(0, 1) noise added (outliers); p: class-balanced "
    "fraction of the training images kept (small sets); bits/dim lower, AUROC % higher is better"
)
"""Printed under the table (one line): what the settings' r and p are."""


def table(summary: list[dict[str, Any]], alpha: float) -> str:
    """Markdown: one row per (backend, setting), plain vs KLJ side by side."""
    lookup = {(c["backend"], c["ratio"], c["fraction"], c["alpha"]): c for c in summary}
    head = (
        f"| backend | setting | test bits/dim | + KLJ (alpha={alpha:g}) "
        "| mean OoD AUROC % | + KLJ |" + "".join(f" {k} | + KLJ |" for k in OOD_SETS)
    )
    lines = [head, "|" + "---|" * (6 + 2 * len(OOD_SETS))]
    for backend in dict.fromkeys(c["backend"] for c in summary):
        for ratio, fraction in [(r, 1.0) for r in RATIOS] + [(0.0, p) for p in FRACTIONS[:-1]]:
            plain = lookup.get((backend, ratio, fraction, 0.0))
            reg = lookup.get((backend, ratio, fraction, alpha))
            if plain is None or reg is None:
                continue
            setting = f"r = {ratio:g}" if fraction == 1.0 else f"p = {fraction:g}"
            if ratio == 0 and fraction == 1.0:
                setting = "r = 0 (p = 1)"
            row = [backend, setting, _fmt(plain, "test_bpd", 3), _fmt(reg, "test_bpd", 3)]
            row += [_fmt(plain, "auroc_mean", 1), _fmt(reg, "auroc_mean", 1)]
            for k in OOD_SETS:
                row += [_fmt(plain, f"auroc_{k}", 1), _fmt(reg, f"auroc_{k}", 1)]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def figure(summary: list[dict[str, Any]], alpha: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    backends = list(dict.fromkeys(c["backend"] for c in summary))
    colours = {b: f"C{i}" for i, b in enumerate(backends)}
    for col, (axis, values, label) in enumerate(
        (("ratio", RATIOS, "outlier fraction r (p = 1)"),
         ("fraction", FRACTIONS, "training fraction p (r = 0)"))
    ):  # fmt: skip
        for row, (metric, name) in enumerate(
            (("test_bpd", "clean test NLL (bits/dim)"), ("auroc_mean", "mean OoD AUROC (%)"))
        ):
            ax = axes[row, col]
            shown: list[tuple[float, float, str]] = []
            for backend in backends:
                for a, style in ((0.0, "--"), (alpha, "-")):
                    pts = sorted(
                        (c[axis], c[metric], c[metric + "_std"])
                        for c in summary
                        if c["backend"] == backend and c["alpha"] == a
                        and (c["fraction"] == 1.0 if axis == "ratio" else c["ratio"] == 0.0)
                        and c[axis] in values
                    )  # fmt: skip
                    xs, ys, es = (list(t) for t in zip(*pts, strict=True))
                    tag = f"{backend} + KLJ" if a else f"{backend}"
                    ax.errorbar(xs, ys, es, ls=style, marker="o", ms=3, color=colours[backend],
                                label=tag, capsize=2)  # fmt: skip
                    shown += [(x, y, colours[backend]) for x, y in zip(xs, ys, strict=True)]
            _clip_outliers(ax, shown)
            ax.set_xlabel(label)
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
    axes[0, 1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"digits: dashed = plain MLE, solid = + KLJ (alpha = {alpha:g}); mean ± std over seeds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _clip_outliers(ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Keep a diverged cell (e.g. a test NLL of 1000 bits/dim) from flattening the rest:
    cap the y-axis and write the off-scale values at the top edge."""
    ys = np.array([y for _, y, _ in points])
    kept = ys[ys <= 4 * np.median(ys)] if (ys > 0).all() else ys
    if len(kept) == len(ys):
        return
    low, high = kept.min(), kept.max()
    cap = high + 0.1 * (high - low)
    ax.set_ylim(low - 0.1 * (high - low), cap)
    for x, y, colour in points:
        if y > cap:
            ax.plot([x], [cap], marker="^", color=colour, clip_on=False)
            ax.annotate(f"{y:.4g}", (x, cap), textcoords="offset points", xytext=(5, -10),
                        fontsize=7, color=colour)  # fmt: skip


def effects(summary: list[dict[str, Any]], alpha: float) -> str:
    """How often and by how much KLJ changed each metric, per regime (r > 0; p < 1)."""
    lookup = {(c["backend"], c["ratio"], c["fraction"], c["alpha"]): c for c in summary}
    lines = []
    for regime, keep in (
        ("outliers (r > 0, p = 1)", lambda c: c["ratio"] > 0),
        ("small sets (p < 1, r = 0)", lambda c: c["fraction"] < 1),
        ("clean, full set (r = 0, p = 1)", lambda c: c["ratio"] == 0 and c["fraction"] == 1),
    ):
        pairs = [
            (lookup[(c["backend"], c["ratio"], c["fraction"], 0.0)], c)
            for c in summary
            if c["alpha"] == alpha and keep(c)
        ]
        if not pairs:
            continue
        nll = np.array([reg["test_bpd"] - plain["test_bpd"] for plain, reg in pairs])
        auc = np.array([reg["auroc_mean"] - plain["auroc_mean"] for plain, reg in pairs])
        lines.append(
            f"- {regime}: KLJ lowered test NLL in {int((nll < 0).sum())}/{len(pairs)} cells "
            f"(median change {np.median(nll):+.3f} bits/dim, range {nll.min():+.3f} .. "
            f"{nll.max():+.3f}); raised mean AUROC in {int((auc > 0).sum())}/{len(pairs)} "
            f"(median change {np.median(auc):+.2f} points, range {auc.min():+.2f} .. "
            f"{auc.max():+.2f})."
        )
    return "\n".join(lines)


def _commit_text(payload: dict[str, Any]) -> str:
    """The commit the runs were made at, ``-dirty`` with uncommitted changes."""
    found = payload.get("commit") or {}
    head = found.get("commit") or "unknown"
    return f"{head[:7]}{'-dirty' if found.get('dirty') else ''}"


def summary_md(payload: dict[str, Any]) -> str:
    cfg = payload["config"]
    return (
        "# Demo: digits, with and without KLJ\n\n"
        f"Command: `{payload['command']}`; {cfg['seeds']} seed(s); alpha = {cfg['alpha']:g}; "
        f"{cfg['settings']['layers']}-layer {cfg['settings']['kind']} flows, hidden "
        f"{cfg['settings']['hidden']}, {cfg['settings']['steps']} Adam steps (lr "
        f"{cfg['settings']['lr']:g}, batch {cfg['settings']['batch']}) per run; "
        f"wall time {payload['wall_seconds']:.0f} s with {cfg['jobs']} worker(s) on "
        f"{machine_text(payload['machine'])}; commit {_commit_text(payload)}.\n\n"
        "Test NLL: bits/dim of the clean 360 test digits (17 levels; lower is better). "
        "AUROC: test digits vs OoD sets by NLL (higher is better). "
        "r: fraction of training images with N(0, 1) noise added; p: class-balanced "
        "fraction of the 1,437 training images.\n\n"
        + effects(payload["cells"], cfg["alpha"])
        + "\n\n"
        + table(payload["cells"], cfg["alpha"])
        + "\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--backend", default="all", help="comma-separated, or 'all' (installed)")
    parser.add_argument("--alpha", type=float, default=1e-2, help="KLJ weight (library default)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0 .. n-1 per cell")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/runs/demo"),
        help="output folder (default: benchmarks/runs/demo, ignored by git; the committed "
        "results: --out benchmarks/results/demo)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny flows, few steps (tests)")
    parser.add_argument("--kind", default="realnvp", choices=("realnvp", "maf"))
    parser.add_argument("--steps", type=int, default=None, help="override the Adam steps")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
    if args.alpha <= 0 or args.seeds < 1:
        parser.error("--alpha must be > 0 and --seeds >= 1")
    settings = QUICK if args.quick else Settings()
    settings = Settings(**{**asdict(settings), "kind": args.kind})
    if args.steps is not None:
        settings = Settings(**{**asdict(settings), "steps": args.steps})
    backends = parse(args.backend)
    if args.kind == "maf":
        backends = [b for b in backends if b != "freia"]

    metadata = run_metadata("cpu", backends)
    start = time.perf_counter()
    results = run_all(grid(backends, args.seeds, args.alpha), settings, args.jobs)
    summary = cells(results)
    payload = {
        "command": " ".join(
            ["python -m benchmarks demo", *(sys.argv[2:] if argv is None else argv)]
        ),
        "config": {
            "backends": backends,
            "alpha": args.alpha,
            "seeds": args.seeds,
            "jobs": args.jobs,
            "quick": args.quick,
            "settings": asdict(settings),
            "ratios": list(RATIOS),
            "fractions": list(FRACTIONS),
            "ood_sets": list(OOD_SETS),
            "outlier_sigma": OUTLIER_SIGMA,
            "ood_noise_sigma": OOD_NOISE_SIGMA,
            "n_train_full": int(len(_data().v_train)),
            "n_test": int(len(_data().u_test)),
        },  # fmt: skip
        **metadata,
        "wall_seconds": time.perf_counter() - start,
        "runs": results,
        "cells": summary,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "demo.json").write_text(json.dumps(payload, indent=1))
    (args.out / "summary.md").write_text(summary_md(payload))
    figure(summary, args.alpha, args.out / "demo.png")
    print(table(summary, args.alpha))
    print(LEGEND)
    print("\n" + effects(summary, args.alpha))
    print(f"\n{len(results)} runs in {payload['wall_seconds']:.0f} s; wrote {args.out}/demo.json, "
          "summary.md, demo.png")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
