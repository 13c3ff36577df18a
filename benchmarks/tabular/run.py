"""Training, the grid, resuming and the command line of ``python -m benchmarks tabular``.

One run = one (data set, model, seed, alpha): :func:`train_one` trains the flow on the seed's
training split and evaluates it on the validation and test splits, and returns one record,
which the parent process appends to ``runs.jsonl`` as one JSON line (flushed), so a killed
grid resumes where it stopped: finished (data set, model, seed, alpha, steps) keys are skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import klj_reg

from ..common.records import ROOT, parameter_count, run_metadata
from . import data as tables
from .models import DEFAULT_MODELS, MODELS, build, nll

ALPHAS = (0.0, 0.001, 0.01, 0.1, 1.0, 10.0)
SEEDS = (0, 1, 2)
BLOW_UP_NATS_PER_DIM = 10.0
OUT = ROOT / "benchmarks" / "results" / "tabular"
QUICK_OUT = ROOT / "benchmarks" / "runs" / "tabular-quick"
RUNS_FILE = "runs.jsonl"


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on besides its (data set, model, seed, alpha)."""

    steps: int = 1000
    batch: int = 64
    lr: float = 1e-3
    layers: int = 4
    hidden: int = 64


QUICK = Settings(steps=20, hidden=16)


@dataclass(frozen=True)
class Task:
    dataset: str
    model: str
    seed: int
    alpha: float
    settings: Settings

    @property
    def key(self) -> tuple[str, str, int, float, int]:
        return (self.dataset, self.model, self.seed, self.alpha, self.settings.steps)


def record_key(record: dict[str, Any]) -> tuple[str, str, int, float, int]:
    """The key a finished run is skipped by on resume."""
    steps = record["settings"]["steps"]
    return (record["dataset"], record["model"], record["seed"], float(record["alpha"]), steps)


# Thread CPU time per step (ms; penalty on, alpha = 0.1, 100 steps, one probe on the 2-core
# machine): weights for the time estimate only, so that the estimate printed after the first
# (cheap) runs is not far off. RUN_MS: building, evaluating, recording (per run).
STEP_MS = {
    "freia-allinone": (6.8, 7.0, 7.2, 5.2, 6.2),
    "freia-glow": (9.1, 10.4, 6.6, 6.7, 6.5),
    "nflows-realnvp": (6.5, 8.4, 6.1, 6.9, 5.5),
    "nflows-maf": (4.8, 5.0, 4.7, 5.1, 6.6),
    "normflows-realnvp": (5.0, 5.5, 4.9, 4.8, 5.2),
    "normflows-maf": (3.8, 4.7, 4.5, 3.7, 7.0),
    "normflows-maf-loop": (7, 20, 83, 22, 290),
    "zuko-realnvp": (8.1, 7.7, 5.5, 6.0, 7.6),
    "zuko-nsf": (15.7, 17.1, 27.7, 13.3, 41.5),
}
RUN_MS = 500.0


def weight(task: Task) -> float:
    """A task's expected cost in ms of one process's time (for the estimate)."""
    row = STEP_MS.get(task.model, (10.0,) * len(tables.DATASETS))
    column = tables.DATASETS.index(task.dataset) if task.dataset in tables.DATASETS else 0
    return row[column] * task.settings.steps + RUN_MS


def init_seed(dataset: str, model: str, seed: int) -> int:
    """The seed torch and numpy get before the flow is built: one per (data set, model, seed),
    the same for every alpha."""
    return tables.name_code(f"{dataset}/{model}/{seed}")


def batch_order(n: int, batch: int, steps: int, dataset: str, seed: int) -> Iterator[np.ndarray]:
    """Indices of each step's batch: epochs of a seeded shuffle of the ``n`` training rows,
    the remainder of each epoch dropped; the same for every model and alpha of a seed."""
    rng = np.random.default_rng([seed, tables.name_code(dataset), 1])
    order, at = rng.permutation(n), 0
    for _ in range(steps):
        if at + batch > n:
            order, at = rng.permutation(n), 0
        yield order[at : at + batch]
        at += batch


_TABLES: dict[str, np.ndarray] = {}


def _table(name: str) -> np.ndarray:
    if name not in _TABLES:
        _TABLES[name] = tables.load(name)
    return _TABLES[name]


def _per_dim(flow: Any, x: np.ndarray) -> np.ndarray:
    """Per-sample NLL in nats per dimension (float64 numpy), no gradient, eval mode."""
    flow.eval()
    with torch.no_grad():
        values = nll(flow, torch.as_tensor(x, dtype=torch.float32)) / x.shape[1]
    return values.double().numpy()


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def train_one(task: Task) -> dict[str, Any]:
    """Train and evaluate one flow; deterministic given ``task`` (single-threaded)."""
    torch.set_num_threads(1)
    s = task.settings
    split = tables.split(task.dataset, task.seed, _table(task.dataset))
    seed = init_seed(task.dataset, task.model, task.seed)
    flow = build(task.model, split.dim, s.layers, s.hidden, seed)
    model = flow.model
    optimiser = torch.optim.Adam(flow.parameters(), lr=s.lr)
    monitor = klj_reg.Monitor(model, warn=False)
    train = torch.as_tensor(split.train, dtype=torch.float32)
    batch = min(s.batch, len(train))
    times: list[float] = []
    cpu_times: list[float] = []
    done, blow_up_step = 0, None
    last_nll, last_klj = math.nan, math.nan
    start = time.perf_counter()
    flow.train()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NonFiniteScaleWarning etc.: the record says it
        batches = batch_order(len(train), batch, s.steps, task.dataset, task.seed)
        for step, idx in enumerate(batches, 1):
            t0, c0 = time.perf_counter(), time.thread_time()
            x = train[torch.as_tensor(idx)]
            loss = nll(flow, x).mean()
            if task.alpha:
                penalty = klj_reg.penalty(model, x, alpha=task.alpha)
                klj = penalty.detach() / task.alpha
                total = loss + penalty
            else:  # plain training; the penalty is read for the monitor and record, in grad
                # mode (the monitor skips no_grad penalties) but left out of the loss
                klj = klj_reg.penalty(model, x, alpha=1.0).detach()
                total = loss
            if not torch.isfinite(total):
                blow_up_step = step
                break
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.thread_time() - c0)
            done = step
            last_nll, last_klj = float(loss.detach()), float(klj)
        train_seconds = time.perf_counter() - start
        monitor.close()
        val = _per_dim(flow, split.val)
        test = _per_dim(flow, split.test)
    test_mean = float(test.mean())
    flags = monitor.flags
    return {
        "dataset": task.dataset,
        "D": split.dim,
        "n_train": len(split.train),
        "n_val": len(split.val),
        "n_test": len(split.test),
        "model": task.model,
        "backend": MODELS[task.model][0],
        "seed": task.seed,
        "alpha": task.alpha,
        "settings": asdict(s),
        "init_seed": seed,
        "parameters": parameter_count(flow),
        "steps_done": done,
        "blow_up_step": blow_up_step,
        "val_nll": float(val.mean()),
        "test_nll": test_mean,
        "test_nll_median": float(np.median(test)),
        "test_nll_max": float(np.max(test)),
        "test_nonfinite": float(np.mean(~np.isfinite(test))),
        "blow_up": bool(
            blow_up_step is not None
            or not math.isfinite(test_mean)
            or test_mean > BLOW_UP_NATS_PER_DIM
        ),
        "train_nll_end": last_nll / split.dim,
        "klj_end": last_klj,
        "penalty_end": task.alpha * last_klj,
        "monitor_flags": len(flags),
        "monitor_first_flag_step": flags[0].step if flags else None,
        "monitor_first_flag_layer": flags[0].layer if flags else None,
        "step_ms_median": 1e3 * float(np.median(times)) if times else math.nan,
        "step_cpu_ms_median": 1e3 * float(np.median(cpu_times)) if cpu_times else math.nan,
        "train_seconds": train_seconds,
        **run_metadata("cpu", ("freia", "nflows", "normflows", "zuko", "scikit-learn")),
    }


# --- the grid, resuming, parallel runs ---------------------------------------------------------


def grid(
    datasets: Iterable[str],
    models: Iterable[str],
    seeds: Iterable[int],
    alphas: Iterable[float],
    settings: Settings,
) -> list[Task]:
    """Every run, cell by cell: all alphas of a (data set, model, seed) before the next cell,
    all cells of a seed before the next seed (a partial file holds complete paired cells)."""
    models, datasets, alphas = list(models), list(datasets), list(alphas)
    return [
        Task(d, m, s, a, settings) for s in seeds for d in datasets for m in models for a in alphas
    ]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records in a ``runs.jsonl`` (a line cut off by a kill is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"skipping an unreadable line in {path}", file=sys.stderr)
    return records


def _append(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as f:
        f.seek(0, 2)
        if f.tell():
            f.seek(f.tell() - 1)
            last = f.read(1)
            if last != "\n":  # a line cut off by a kill: start a fresh one
                f.write("\n")
        f.write(json.dumps(record) + "\n")
        f.flush()


def _init_worker() -> None:
    torch.set_num_threads(1)


def run_tasks(tasks: list[Task], path: Path, workers: int) -> int:
    """Run ``tasks`` (those not in ``path`` yet), appending each record; returns the number
    run. Prints an estimate of the total time after the first few runs."""
    done_keys = {record_key(r) for r in read_records(path)}
    todo = [t for t in tasks if t.key not in done_keys]
    skipped = len(tasks) - len(todo)
    print(
        f"{len(tasks)} runs, {skipped} already in {path}, {len(todo)} to run "
        f"with {workers} worker(s)",
        file=sys.stderr,
    )
    if not todo:
        return 0
    total_weight = sum(weight(t) for t in todo)
    start, done_weight, finished = time.perf_counter(), 0.0, 0
    report_at = {min(len(todo), max(2 * workers, 4))} | {
        round(len(todo) * f / 10) for f in range(1, 10)
    }

    def finish(task: Task, record: dict[str, Any]) -> None:
        nonlocal done_weight, finished
        _append(path, record)
        done_weight += weight(task)
        finished += 1
        if finished in report_at and finished < len(todo):
            elapsed = time.perf_counter() - start
            estimate = elapsed * total_weight / done_weight
            print(
                f"[{finished}/{len(todo)}] {elapsed / 60:.1f} min so far; estimated total "
                f"{estimate / 60:.0f} min (about {(estimate - elapsed) / 60:.0f} min left)",
                file=sys.stderr,
            )

    if workers <= 1:
        for task in todo:
            finish(task, train_one(task))
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker) as pool:
            futures: dict[Future[dict[str, Any]], Task] = {
                pool.submit(train_one, task): task for task in todo
            }
            try:
                for future in as_completed(futures):
                    finish(futures[future], future.result())
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    elapsed = time.perf_counter() - start
    print(f"{len(todo)} runs in {elapsed / 60:.1f} min", file=sys.stderr)
    return len(todo)


# --- command line -------------------------------------------------------------------------------


def _names(spec: str | None, allowed: Iterable[str], default: Iterable[str]) -> list[str]:
    allowed = list(allowed)
    if not spec or spec == "all":
        return list(default)
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names:
        if name not in allowed:
            raise SystemExit(f"unknown name {name!r}; choose from {', '.join(allowed)}")
    return names


def _floats(spec: str) -> list[float]:
    values = sorted({float(v) for v in spec.split(",") if v.strip()})
    if any(not (math.isfinite(v) and v >= 0) for v in values):
        raise SystemExit(f"alphas must be finite and >= 0, got {spec!r}")
    return values


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks tabular",
        description="KLJ alpha grid on scikit-learn's bundled tables, eight flows, four "
        "backends (see benchmarks/tabular/__init__.py).",
    )
    parser.add_argument("--datasets", help=f"comma list of {', '.join(tables.DATASETS)} (all)")
    parser.add_argument("--models", help=f"comma list of {', '.join(MODELS)} (the 8 defaults)")
    parser.add_argument("--seeds", help="comma list (0,1,2)")
    parser.add_argument("--alphas", help="comma list (" + ",".join(f"{a:g}" for a in ALPHAS) + ")")
    parser.add_argument("--steps", type=int, help=f"training steps ({Settings.steps})")
    parser.add_argument("--workers", type=int, default=2, help="processes (2)")
    parser.add_argument("--out", type=Path, help=f"results folder ({OUT.relative_to(ROOT)})")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tests: iris, seed 0, alphas 0 and 0.01, 20 steps, hidden 16, into "
        f"{QUICK_OUT.relative_to(ROOT)} unless --out",
    )
    parser.add_argument(
        "--report", action="store_true", help="only rewrite report.md and figure.png"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from . import report

    settings = QUICK if args.quick else Settings()
    if args.steps is not None:
        if args.steps < 1:
            raise SystemExit("--steps must be >= 1")
        settings = replace(settings, steps=args.steps)
    out = args.out or (QUICK_OUT if args.quick else OUT)
    path = out / RUNS_FILE
    if not args.report:
        default = ["iris"] if args.quick else tables.DATASETS
        datasets = _names(args.datasets, tables.DATASETS, default)
        models = _names(args.models, MODELS, DEFAULT_MODELS)
        seeds = [0] if args.quick else list(SEEDS)
        if args.seeds:
            seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
        alphas = [0.0, 0.01] if args.quick else list(ALPHAS)
        if args.alphas:
            alphas = _floats(args.alphas)
        run_tasks(grid(datasets, models, seeds, alphas, settings), path, max(1, args.workers))
    records = read_records(path)
    if not records:
        print(f"no records in {path}", file=sys.stderr)
        return 1
    written = report.write(records, out)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0
