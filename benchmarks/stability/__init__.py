"""``python -m benchmarks stability``: a gallery of reported flow-training failures, with and
without KLJ, against the fixes users try instead.

Each configuration (:mod:`.configs`; its docstring names the public reports it reproduces)
trains a small flow from one of the four backends in a way users have reported to fail: deep
unbounded exp-scale couplings, heavy-tailed data, near-singular data with N close to D,
training outliers, a high learning rate, long training on a small set, spline flows, and a
small image flow on a CIFAR-10 subset. Per configuration and seed, seven methods train on the
same data, initialisation and batches (:mod:`.runner`):

- ``plain``: Adam on the NLL;
- ``klj``: + ``klj_reg.penalty(model, x, alpha=1e-2, normaliser="dim")``, the library's
  default when the gallery was made (it has none now: docs/choosing-alpha.md);
- ``klj-val``: + the penalty at the alpha of {1e-3, 1e-2, 1e-1, 1} whose run ends with the
  lowest NLL on a validation split carved from seed 0's training data (20 %, one run per
  alpha; the test split is never read), then trained on each seed's whole training split;
- ``clip``: gradient-norm clipping at 1; ``wd``: AdamW with weight decay 1e-2 (its default);
  ``low-lr``: the learning rate / 10; ``clip+klj``: clipping and the penalty at 1e-2.

A run *fails* at the first step with non-finite parameters, 10 consecutive non-finite losses
(such steps are skipped, as a user's guard would), or a held-out NLL that is non-finite or
above the configuration's threshold (the untrained identity flow's held-out NLL + a margin,
fixed in :mod:`.configs` before any run). Measured per (configuration, method): failures k/n,
final and best held-out NLL (nats/dim) over the surviving runs, steps to failure, and for
every failing plain run whether (and how many steps before the failure, at which layer) the
per-layer monitor ``klj_reg.Monitor`` (window 20, factor 10) flagged it.

Runs are single-threaded and deterministic given (configuration, method, seed). Writes
``stability.json`` (every run: settings, held-out NLL curve, failure, monitor flags),
``summary.md`` and ``stability.png`` to ``--out``. ``--quick``: tiny flows and 30 steps, for
the tests. ``--render DIR/stability.json`` rebuilds the tables and the figure of finished runs
without training (and without rewriting the JSON; the configurations' descriptions and
citations come from :mod:`.configs` as it is then). The image configuration needs CIFAR-10
under ``../shared/data`` (or ``$KLJ_DATA``) and is skipped, with a note, without it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..common.backends import BACKENDS
from ..common.records import commit_text, machine_text, run_metadata
from . import configs, report, runner

__all__ = ["main"]


def _cifar_available() -> bool:
    from ..cifar.data import default_data_root

    root = default_data_root()
    return root is not None and any(
        (root / name).exists()
        for name in ("cifar-10-batches-py", "cifar10-sprites", "cifar10-jpeg.tar.gz")
    )


def plan(names: list[str], seeds: int, quick: bool) -> tuple[list[runner.Run], list[runner.Run]]:
    """(alpha-selection runs, method runs other than ``klj-val``) for ``names``."""
    select = [r for n in names for r in runner.selection_runs(n, quick)]
    methods = [
        runner.method_run(n, m, s, quick)
        for n in names
        for m in runner.METHODS
        if m != "klj-val"
        for s in range(seeds)
    ]
    return select, methods


def execute(
    names: list[str], seeds: int, quick: bool, jobs: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every run of ``names``: selection runs first; each configuration's ``klj-val`` runs
    once its alpha is chosen (reusing the ``klj`` runs when the choice is the default alpha,
    which would train the same flows). Returns (runs, chosen alpha per configuration)."""
    from tqdm import tqdm

    select, others = plan(names, seeds, quick)
    total = len(select) + len(others) + len(names) * seeds
    bar = tqdm(total=total, desc="stability runs", unit="run", file=sys.stderr)
    results: list[dict[str, Any]] = []
    chosen: dict[str, float] = {}
    pending_select = {n: len(runner.ALPHA_GRID) for n in names}

    def finished(result: dict[str, Any]) -> list[runner.Run]:
        """Record a result; the klj-val runs it unlocks."""
        results.append(result)
        bar.update()
        if result["split"] != "validation":
            return []
        name = result["config"]
        pending_select[name] -= 1
        if pending_select[name]:
            return []
        chosen[name] = runner.choose_alpha(
            [r for r in results if r["config"] == name and r["split"] == "validation"]
        )
        return [runner.method_run(name, "klj-val", s, quick, chosen[name]) for s in range(seeds)]

    def reuse(run: runner.Run) -> dict[str, Any] | None:
        if run.alpha != runner.DEFAULT_ALPHA:
            return None
        for r in results:
            if (r["config"], r["method"], r["seed"]) == (run.config, "klj", run.seed):
                return {**r, "method": "klj-val", "reused_from": "klj"}
        return None

    queue = select + others
    deferred: list[runner.Run] = []  # klj-val runs waiting for the klj run they reuse
    if jobs <= 1:
        while queue or deferred:
            run = queue.pop(0) if queue else deferred.pop(0)
            if run.method == "klj-val" and run.alpha == runner.DEFAULT_ALPHA:
                copy = reuse(run)
                if copy is not None:
                    queue += finished(copy)
                    continue
            queue += finished(runner.train_one(run))
    else:
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context(method)) as pool:
            running: set[Future[dict[str, Any]]] = {pool.submit(runner.train_one, r) for r in queue}
            while running or deferred:
                for run in list(deferred):
                    copy = reuse(run)
                    if copy is not None:
                        deferred.remove(run)
                        for new in finished(copy):
                            running.add(pool.submit(runner.train_one, new))
                if not running:
                    if deferred:  # its klj runs are gone (cannot happen): train it instead
                        running.add(pool.submit(runner.train_one, deferred.pop(0)))
                    continue
                done, running = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    for new in finished(future.result()):
                        if new.alpha == runner.DEFAULT_ALPHA:
                            deferred.append(new)
                        else:
                            running.add(pool.submit(runner.train_one, new))
    bar.close()
    return results, chosen


def summary_md(payload: dict[str, Any]) -> str:
    """The Markdown summary of a ``stability.json`` payload (cells recomputed from its runs)."""
    cfgs = describe(payload["configs"], payload.get("quick", False), strict=False)
    cells = report.cells(payload["runs"])
    alphas = ", ".join(f"{n}: {a:g}" for n, a in payload["chosen_alpha"].items())
    skipped = "".join(f"\n\nSkipped: {s}." for s in payload["skipped"])
    rendered = payload.get("rendered_by")
    rendered_text = (
        f" Tables rendered from its `stability.json` by `{rendered}`." if rendered else ""
    ) + (
        " The configurations' failure modes and public reports are described as "
        "`benchmarks/stability/configs.py` has them now."
    )
    return (
        "# Stability gallery: reported flow-training failures, with and without KLJ\n\n"
        f"Command: `{payload['command']}`; {payload['seeds']} seeds per cell; wall time "
        f"{payload['wall_seconds'] / 60:.1f} min with {payload['jobs']} worker(s) on "
        f"{machine_text(payload['machine'])}; commit {commit_text(payload['commit'], 10)}."
        f"{rendered_text}{skipped}\n\n"
        "A run **fails** at the first step where a parameter is non-finite, 10 consecutive "
        "losses were non-finite (each such step is skipped), or the held-out NLL (mean, "
        "nats/dim, every `eval_every` steps and at the end) is non-finite or above the "
        "configuration's threshold: the untrained identity flow's held-out NLL plus a margin "
        "(1 nat/dim), fixed before any run. Final and best held-out NLL are over the runs "
        "that survived (mean ± std); `–` where none did. *Best reached, all runs*: the median "
        "over seeds of the lowest held-out NLL each run reached before it failed (or by its "
        "end), what stopping at the best evaluation would have kept; it is chosen on the test "
        "curve itself, so it is optimistic, for every method alike. *Skipped steps*: steps whose "
        "loss was non-finite, skipped by the loop's guard (sum over seeds). *End trend*: the "
        "slope of the held-out NLL over the last quarter of the steps, nats/dim per 100 steps, "
        "mean over the survivors, and how many of them were still rising: a survivor whose "
        "held-out NLL still rises has not stopped overfitting, and may fail in a longer run "
        "(the failure counts hold at the configuration's step count only).\n\n"
        "## Configurations\n\n"
        + report.config_table(cfgs, cells)
        + "\n\nA cited report motivated a configuration; it is not a claim that the "
        "configuration reproduces it. What each report shows, and the failure measured here:"
        "\n\n"
        + report.config_notes(cfgs)
        + "\n\n## Methods\n\n"
        + report.methods_text()
        + "\n\n`klj-val`: one run per alpha of "
        + "{"
        + ", ".join(f"{a:g}" for a in payload["alpha_grid"])
        + "}"
        + " on 80 % of seed 0's training split, scored by its final NLL on the other 20 % "
        "(a failed run scores +inf; ties go to the smaller alpha); the test split is not "
        "read. When the choice is the default alpha, the `klj` runs are reused. Chosen: "
        f"{alphas}.\n\n"
        "## Failures (runs failed / seeds)\n\n"
        + report.failure_matrix(cells, cfgs)
        + "\n\n"
        + report.headline(cells, cfgs)
        + "\n\n## Per configuration and method\n\n"
        + report.main_table(cells, cfgs)
        + "\n\n## KLJ against plain and the usual fixes, paired by seed\n\n"
        "Every method of a seed trains on the same data, initialisation and batches, so the "
        "comparison is per seed: how many seeds only the KLJ run survived, only the other, "
        "both or neither; the difference KLJ minus other of the final held-out NLL over the "
        "seeds both survived, and of the best held-out NLL reached (before any failure; "
        "optimistic, as above) over every seed: mean [lowest, highest], then the seeds where "
        "KLJ is lower / seeds paired (nats/dim; lower is better).\n\n"
        + report.paired_table(payload["runs"], cfgs)
        + "\n\n## The monitor on plain runs\n\n"
        "`klj_reg.Monitor(model, window=20, factor=10, every=1)` fed with every training "
        "batch: a layer is flagged when its KLJ is non-finite or exceeds 10x the larger of "
        "the median of its previous 20 values and its floor (0.1 per entry of its Jacobian "
        "diagonal; the monitor's defaults since c693f62, before which the reference was the "
        "window's minimum and the floor 1 per layer). A failure counts as *flagged* when the "
        f"last flag at or before the failing step came at most {runner.WARNING_WINDOW} steps "
        "before it; *lead*: steps from that flag to the failure; *false alarms*: surviving "
        "plain runs that were flagged at any step. Held-out failures are detected at "
        "evaluations (every 25 steps; 50 for cifar-small), so a lead counts steps to the "
        "evaluation that found the failure, not to the step at which the flow broke.\n\n"
        + report.monitor_table(cells, cfgs)
        + "\n\n"
        + report.monitor_runs(payload["runs"])
        + "\n"
    )


def write(payload: dict[str, Any], out: Path) -> None:
    """``stability.json``, ``summary.md`` and ``stability.png`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "stability.json").write_text(json.dumps(payload, indent=1))
    (out / "summary.md").write_text(summary_md(payload))
    report.figure(payload["cells"], payload["configs"], out / "stability.png")


DESCRIPTIVE = ("mode", "sources", "doc")
"""A configuration's fields that describe it (not settings a run depends on): ``--render``
takes them from :mod:`.configs` as it is now, so that a corrected description or citation
reaches the tables without retraining."""


def describe(cfgs: list[dict[str, Any]], quick: bool, strict: bool = True) -> list[dict[str, Any]]:
    """``cfgs`` (a payload's configurations) with their :data:`DESCRIPTIVE` fields from
    :mod:`.configs`. Where a setting a run depends on differs from the code's: an error if
    ``strict``, else that configuration's stored description is kept."""
    out = []
    for c in cfgs:
        if c["name"] not in configs.REGISTRY:
            out.append(c)
            continue
        now = configs.get(c["name"], quick)
        settings = now.settings()
        changed = [k for k, v in settings.items() if k not in DESCRIPTIVE and c.get(k) != v]
        if changed and not strict:
            out.append(c)
            continue
        if changed:
            raise SystemExit(
                f"{c['name']}: settings {changed} differ from benchmarks/stability/configs.py; "
                "the runs are not this code's: rerun instead of --render"
            )
        out.append({**c, **{k: settings[k] for k in DESCRIPTIVE if k in settings},
                    "doc": now.doc})  # fmt: skip
    return out


def render(path: Path, command: str) -> int:
    """Rebuild ``summary.md`` and ``stability.png`` (beside ``path``) from the runs of an
    existing ``stability.json``, with the cells recomputed and the configurations'
    descriptions and citations as :mod:`.configs` has them now; ``stability.json`` itself is
    not rewritten."""
    payload = json.loads(path.read_text())
    payload["configs"] = describe(payload["configs"], payload.get("quick", False))
    payload["cells"] = report.cells(payload["runs"])
    payload["rendered_by"] = command
    (path.parent / "summary.md").write_text(summary_md(payload))
    report.figure(payload["cells"], payload["configs"], path.parent / "stability.png")
    print(report.failure_matrix(payload["cells"], payload["configs"]))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks stability",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--configs",
        default="all",
        help=f"comma-separated of: {', '.join(configs.REGISTRY)}; or 'all'",
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0 .. n-1 per cell")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stability"))
    parser.add_argument("--quick", action="store_true", help="tiny flows, 30 steps (tests)")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--render", type=Path, default=None, metavar="JSON",
        help="no training: rebuild the cells, summary.md and stability.png of a stability.json",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.render is not None:
        return render(
            args.render,
            " ".join(["python -m benchmarks stability", *(sys.argv[2:] if argv is None else argv)]),
        )
    names = list(configs.REGISTRY) if args.configs == "all" else args.configs.split(",")
    for n in names:
        if n not in configs.REGISTRY:
            parser.error(f"unknown configuration {n!r}; choose from {', '.join(configs.REGISTRY)}")
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    skipped = []
    if not _cifar_available():
        for n in [n for n in names if configs.get(n, args.quick).needs_data]:
            names.remove(n)
            skipped.append(f"{n} (no CIFAR-10 under ../shared/data or $KLJ_DATA)")
    if not names:
        parser.error("no configuration left to run")

    metadata = run_metadata("cpu", BACKENDS)
    start = time.perf_counter()
    runs, chosen = execute(names, args.seeds, args.quick, args.jobs)
    order = {n: i for i, n in enumerate(names)}
    kinds = (*runner.METHODS, "select")
    runs.sort(
        key=lambda r: (order[r["config"]], r["split"] != "validation",
                       kinds.index(r["method"]), r["alpha"], r["seed"])
    )  # fmt: skip
    cfgs = []
    for n in names:
        cfg = configs.get(n, args.quick)
        thresholds = [r["threshold"] for r in runs if r["config"] == n and r["split"] == "test"]
        cfgs.append(
            {**cfg.settings(), "doc": cfg.doc, "threshold": sum(thresholds) / len(thresholds)}
        )
    payload = {
        "command": " ".join(
            ["python -m benchmarks stability", *(sys.argv[2:] if argv is None else argv)]
        ),
        "seeds": args.seeds,
        "jobs": args.jobs,
        "quick": args.quick,
        **metadata,
        "wall_seconds": time.perf_counter() - start,
        "skipped": skipped,
        "methods": {m: runner.METHOD_TEXT[m] for m in runner.METHODS},
        "alpha_grid": list(runner.ALPHA_GRID),
        "chosen_alpha": chosen,
        "failure_rule": {
            "max_consecutive_nonfinite": runner.MAX_SKIPPED,
            "threshold": "identity-flow held-out NLL + margin (nats/dim)",
        },
        "monitor": runner.MONITOR,
        "configs": cfgs,
        "cells": report.cells(runs),
        "runs": runs,
    }
    write(payload, args.out)
    print(report.failure_matrix(payload["cells"], cfgs))
    print("\n" + report.headline(payload["cells"], cfgs))
    print(f"\n{len(runs)} runs in {payload['wall_seconds']:.0f} s; wrote "
          f"{args.out}/stability.json, summary.md, stability.png")  # fmt: skip
    return 0
