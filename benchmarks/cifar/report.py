"""Results: one JSON per run, a Markdown table laid out like the paper's, a PNG chart.

Each run's JSON holds its config, seed, commit, machine, data source, timings, parameter
count and metrics. Tables show mean ± std over seeds, with the paper's number in brackets,
and, for every ``+ KLJ`` row, the paired difference against its baseline row (same backend,
objective and seed: the same initialisation, training subset and batch order), with the sign
count (:func:`paired`, :func:`paired_text`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..common.records import commit_text, parameters_text

OOD_SETS = ("rot_rgb", "quickdraw", "tinyimagenet", "noisy")
OOD_TITLES = {
    "rot_rgb": "Rot",
    "quickdraw": "QuickDraw",
    "tinyimagenet": "TinyImageNet",
    "noisy": "Noisy",
}
ROW_ORDER = (
    "ib1",
    "ib1_klj",
    "ibinf",
    "ibinf_klj",
    "ibinf_klj_rc",
    "ibinf_klj_val",
    "cnll",
    "cnll_klj",
)

# Paper Table 1 (CIFAR-10): OoD detection score (typicality AUROC, %) and ID accuracy.
PAPER_TABLE1: dict[str, dict[str, float]] = {
    "ib1": dict(rot_rgb=78.0, quickdraw=68.7, tinyimagenet=71.4, noisy=77.4, accuracy=89.3),
    "ib1_klj": dict(rot_rgb=85.3, quickdraw=75.5, tinyimagenet=76.0, noisy=84.9, accuracy=85.6),
    "ibinf": dict(rot_rgb=67.7, quickdraw=50.5, tinyimagenet=66.1, noisy=48.7, accuracy=92.0),
    "ibinf_klj": dict(rot_rgb=88.2, quickdraw=87.0, tinyimagenet=74.3, noisy=69.1, accuracy=88.6),
    "cnll": dict(rot_rgb=69.7, quickdraw=84.7, tinyimagenet=73.8, noisy=91.7, accuracy=47.1),
    "cnll_klj": dict(rot_rgb=76.2, quickdraw=86.9, tinyimagenet=76.4, noisy=91.2, accuracy=43.2),
}
# Paper Table 1, OoD/ID entropy ratio.
PAPER_ENTROPY: dict[str, dict[str, float]] = {
    "ib1": dict(rot_rgb=1.45, quickdraw=0.76, tinyimagenet=2.30, noisy=0.15),
    "ib1_klj": dict(rot_rgb=1.69, quickdraw=1.11, tinyimagenet=2.45, noisy=0.31),
    "ibinf": dict(rot_rgb=-0.07, quickdraw=-0.42, tinyimagenet=0.32, noisy=-0.23),
    "ibinf_klj": dict(rot_rgb=0.03, quickdraw=-0.13, tinyimagenet=0.07, noisy=-0.19),
    "cnll": dict(rot_rgb=0.09, quickdraw=-0.29, tinyimagenet=0.11, noisy=0.19),
    "cnll_klj": dict(rot_rgb=-0.06, quickdraw=-0.10, tinyimagenet=-0.19, noisy=0.12),
}


# ------------------------------------------------------------------------------ run records


def write_json(path: pathlib.Path, record: dict[str, Any]) -> None:
    """Write ``record`` atomically (parallel runs never see half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=False, default=_jsonable))
    os.replace(tmp, path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def read_json(path: pathlib.Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def normalise_config(config: dict[str, Any]) -> Any:
    """The config as JSON would store it (tuples as lists, inf as a string), for comparison."""
    return json.loads(json.dumps(config, default=_jsonable))


def finished(path: pathlib.Path, config: dict[str, Any]) -> bool:
    """True if ``path`` holds a successful run with the same config."""
    record = read_json(path)
    return bool(
        record and record.get("status") == "ok" and record.get("config") == normalise_config(config)
    )


def load_runs(folder: pathlib.Path, pattern: str = "**/*.json") -> list[dict[str, Any]]:
    """Every run record under ``folder``."""
    runs = []
    for path in sorted(pathlib.Path(folder).glob(pattern)):
        record = read_json(path)
        if record and "config" in record and "status" in record:
            runs.append(record)
    return runs


def command_runs(folder: pathlib.Path, command: str) -> list[dict[str, Any]]:
    """The runs of ``command`` under ``folder`` that belong in its tables: not the runs that
    chose alpha on a validation split (``ood --select-alpha``)."""
    return [
        r for r in load_runs(folder)
        if r["config"].get("command") == command
        and not r["config"].get("variant", {}).get("validation")
    ]  # fmt: skip


# ----------------------------------------------------------------------------- aggregation


def value(run: dict[str, Any], metric: str, ood: str | None = None) -> float | None:
    """One metric of a run: ``accuracy``, or ``metric`` of OoD set ``ood``."""
    if run.get("status") != "ok":
        return None
    m = run["metrics"]
    v = m.get(metric) if ood is None else m.get("ood", {}).get(ood, {}).get(metric)
    return None if v is None else float(v)


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals)


def group(
    runs: Sequence[dict[str, Any]], *keys: str
) -> dict[tuple[Any, ...], list[dict[str, Any]]]:
    """Runs grouped by config keys."""
    out: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        out[tuple(run["config"].get(k) for k in keys)].append(run)
    return out


def cell(stats: tuple[float, float, int] | None, paper: float | None, digits: int = 1) -> str:
    """``"78.3 ± 1.2 (78.0)"``; ``n/a`` if no successful run."""
    text = "n/a"
    if stats is not None:
        mean, std, n = stats
        text = f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if n > 1 else "")
    if paper is not None:
        text += f" ({paper:.{digits}f})"
    return text


# ------------------------------------------------------------------------ paired differences

PAIRED_COLUMNS = (*OOD_SETS, "mean", "accuracy")
"""Columns of the paired tables: each OoD set's typicality AUROC, their mean, accuracy."""
PAIRED_TITLES = {**OOD_TITLES, "mean": "4-set mean", "accuracy": "Acc"}


def column_value(run: dict[str, Any], column: str) -> float | None:
    """A run's value in one :data:`PAIRED_COLUMNS` column: an OoD set's typicality AUROC %,
    their mean over the four sets (``"mean"``; ``None`` unless all four are there), or the
    accuracy %."""
    if column == "accuracy":
        return value(run, "accuracy")
    if column == "mean":
        sets = [value(run, "auroc_typical", o) for o in OOD_SETS]
        return None if None in sets else sum(sets) / len(sets)  # type: ignore[arg-type]
    return value(run, "auroc_typical", column)


def baseline_of(row: str) -> str | None:
    """The baseline row of a ``+ KLJ`` row (``ib1_klj`` -> ``ib1``, ``ibinf_klj_rc`` and
    ``ibinf_klj_val`` -> ``ibinf``, ``cnll_klj`` -> ``cnll``); ``None`` for a baseline."""
    head, klj, _ = row.partition("_klj")
    return head if klj else None


@dataclass(frozen=True)
class Paired:
    """Per-seed differences ``treated - baseline`` of one metric, over the seeds both have."""

    seeds: tuple[int, ...]
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs))

    @property
    def low(self) -> float:
        return min(self.diffs)

    @property
    def high(self) -> float:
        return max(self.diffs)

    @property
    def positive(self) -> int:
        """Seeds where the treated run is higher."""
        return sum(d > 0 for d in self.diffs)

    @property
    def negative(self) -> int:
        return sum(d < 0 for d in self.diffs)


def by_seed(runs: Iterable[dict[str, Any]], metric: Any = "mean") -> dict[int, float]:
    """``{seed: value}`` of finite values; ``metric`` is a :data:`PAIRED_COLUMNS` column or a
    function of a run. Two runs of one seed are an error (the pairing would be ambiguous)."""
    out: dict[int, float] = {}
    for run in runs:
        seed = int(run["config"]["seed"])
        if seed in out:
            raise ValueError(f"two runs of seed {seed} in one paired group")
        v = metric(run) if callable(metric) else column_value(run, metric)
        if v is not None and math.isfinite(v):
            out[seed] = float(v)
    return out


def paired(
    treated: Iterable[dict[str, Any]], baseline: Iterable[dict[str, Any]], metric: Any = "mean"
) -> Paired | None:
    """``treated - baseline`` per seed, over the seeds where both have a finite value
    (``None`` if there is none); ``metric`` as in :func:`by_seed`."""
    a, b = by_seed(treated, metric), by_seed(baseline, metric)
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        return None
    return Paired(seeds, tuple(a[s] - b[s] for s in seeds))


def paired_text(p: Paired | None, digits: int = 1) -> str:
    """``"+2.1 [+1.0, +3.2] 2/2"``: the mean paired difference, [lowest, highest] per-seed
    difference, and the seeds where the treated run is higher / seeds paired (`, k tied` when
    some differences are exactly 0); ``n/a`` without a pair."""
    if p is None:
        return "n/a"
    text = f"{p.mean:+.{digits}f} [{p.low:+.{digits}f}, {p.high:+.{digits}f}] {p.positive}/{p.n}"
    ties = p.n - p.positive - p.negative
    return text + (f", {ties} tied" if ties else "")


PAIRED_NOTE = (
    "Paired difference: each + KLJ run minus its baseline row's run of the same backend, "
    "objective and seed (same initialisation, training subset and batch order), in AUROC or "
    "accuracy points: mean [lowest, highest] over the seeds, then k/n = seeds where + KLJ is "
    "higher / seeds paired. With two seeds the bracket is the two differences themselves: no "
    "interval, and 2/2 or 0/2 happens by chance one time in two."
)


def paired_lines(runs: Sequence[dict[str, Any]], heading: str = "###") -> list[str]:
    """Markdown: for each ``+ KLJ`` row of ``runs`` (one backend, one setting) whose baseline
    row is there, its paired difference per :data:`PAIRED_COLUMNS` column."""
    rows = group(runs, "row")
    treated = [k for k in ordered_rows(rows) if baseline_of(k) and (baseline_of(k),) in rows]
    if not treated:
        return []
    header = ["method", "minus", *(PAIRED_TITLES[c] for c in PAIRED_COLUMNS)]
    lines = [
        "",
        f"{heading} Paired differences, + KLJ minus its baseline (same seed)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for key in treated:
        base = rows[(baseline_of(key),)]
        cells = [row_label(rows[(key,)]), row_label(base)]
        cells += [paired_text(paired(rows[(key,)], base, c)) for c in PAIRED_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------- tables


def table1_markdown(runs: Sequence[dict[str, Any]], title: str = "CIFAR-10 OoD (Table 1)") -> str:
    """Markdown: per backend, Table 1's rows with our mean ± std over seeds and (paper)."""
    lines = [f"# {title}", ""]
    lines += summary_lines(runs)
    by_backend = group(runs, "backend")
    sections = [
        ("OoD detection score: typicality AUROC % (the paper's metric)", "auroc_typical", True, 1),
        ("One-tailed AUROC % (higher L_x = OoD)", "auroc", False, 1),
        ("OoD/ID entropy ratio", "entropy_ratio", True, 2),
    ]
    for (backend,), backend_runs in sorted(by_backend.items()):
        rows = group(backend_runs, "row")
        params = sorted({int(r["parameters"]) for r in backend_runs if r.get("parameters")})
        lines += [
            "",
            f"## {backend}" + (f" ({parameters_text(params)} parameters)" if params else ""),
        ]
        for heading, metric, with_paper, digits in sections:
            paper_table = PAPER_TABLE1 if metric != "entropy_ratio" else PAPER_ENTROPY
            header = ["method", *(OOD_TITLES[o] for o in OOD_SETS)]
            if metric != "entropy_ratio":
                header.append("Acc")
            lines += ["", f"### {heading}", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "---|" * len(header))
            for key in ordered_rows(rows):
                rr = rows[(key,)]
                paper = paper_table.get(key, {}) if with_paper else {}
                cells = [row_label(rr)]
                for ood in OOD_SETS:
                    stats = mean_std(value(r, metric, ood) for r in rr)
                    cells.append(cell(stats, paper.get(ood), digits))
                if metric != "entropy_ratio":
                    stats = mean_std(value(r, "accuracy") for r in rr)
                    cells.append(cell(stats, PAPER_TABLE1.get(key, {}).get("accuracy")))
                lines.append("| " + " | ".join(cells) + " |")
        lines += paired_lines(backend_runs)
        failed = [r for r in backend_runs if r.get("status") != "ok"]
        if failed:
            lines += ["", "Failed runs:", ""]
            for r in failed:
                lines.append(
                    f"- {r['config'].get('row')} seed {r['config'].get('seed')}: "
                    f"{one_line(r.get('error', 'unknown error'))}"
                )
    lines += ["", "Numbers in brackets: the paper's Table 1 (IB-INN architecture, 450 epochs).", ""]
    lines.append(PAIRED_NOTE)
    return "\n".join(lines) + "\n"


def _source(src: Any) -> str:
    if isinstance(src, dict):
        return "; ".join(f"{k}: {v}" for k, v in src.items())
    return str(src)


def one_line(text: str) -> str:
    """The last non-empty line of ``text`` (an error's message), at most 300 characters."""
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def ordered_rows(rows: dict[tuple[Any, ...], Any]) -> list[Any]:
    """The row keys of :func:`group`'s ``rows``: Table 1's order first, then the others."""
    keys = [k[0] for k in rows]
    known = [k for k in ROW_ORDER if k in keys]
    return known + sorted(k for k in keys if k not in ROW_ORDER)


def metric_cell(runs: Sequence[dict[str, Any]], metric: str) -> str:
    """Mean ± std over ``runs`` of ``"accuracy"`` or an OoD set's typicality AUROC."""
    name, where = ("accuracy", None) if metric == "accuracy" else ("auroc_typical", metric)
    return cell(mean_std(value(x, name, where) for x in runs), None)


def row_label(runs: Sequence[dict[str, Any]]) -> str:
    """The label of a row's runs (its key where they have none)."""
    return str(runs[0].get("label") or runs[0]["config"].get("row"))


def _natural(text: str) -> list[Any]:
    """Sort key that orders digit runs by value ("500" before "1000")."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def summary_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """Settings shared by the runs, as a bullet list."""
    if not runs:
        return ["No runs."]
    cfg = runs[0]["config"]
    ok = [r for r in runs if r.get("status") == "ok"]
    seeds = sorted({r["config"].get("seed") for r in runs})
    sources = sorted({_source(r.get("data_source")) for r in ok}, key=_natural)
    machines = sorted({str(r.get("machine", {}).get("device_name")) for r in ok})
    train = cfg.get("train", {})
    alphas = sorted({r["config"].get("alpha") for r in runs if r["config"].get("alpha")})
    forms = sorted({str(r["config"].get("form")) for r in runs if r["config"].get("alpha")})
    minutes = sum(r.get("time", {}).get("total_s", 0.0) for r in ok) / 60
    return [
        f"- preset `{cfg.get('preset')}`: {train.get('epochs')} epochs, batch "
        f"{train.get('batch_size')}, {train.get('optimizer')} lr {train.get('lr')}, "
        f"training images {cfg.get('train_limit') or 'all'}, seeds {seeds}",
        f"- KLJ: alpha {alphas or '-'}, form {', '.join(f'`{f}`' for f in forms) or '-'}",
        "- typicality reference: mean L_x of the ID test images (as the authors' code)",
        *(f"- data: {src}" for src in sources),
        f"- machine: {', '.join(machines) or '-'}; {len(ok)}/{len(runs)} runs ok, "
        f"{minutes:.1f} run-minutes",
        *provenance_lines(ok),
    ]


def provenance_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The commits the runs were made at, with ``-dirty`` where the tree had uncommitted
    changes and the number of runs each, and a warning when there is more than one commit or
    a dirty tree (the rows may then not come from the same code)."""
    counts = Counter(commit_text(r.get("commit"), 10) for r in runs)
    if not counts:
        return ["- commits: -"]
    text = ", ".join(f"{c} ({n} run{'' if n == 1 else 's'})" for c, n in sorted(counts.items()))
    lines = [f"- commits: {text}"]
    dirty = sum(n for c, n in counts.items() if c.endswith("-dirty") or c == "unknown")
    if len(counts) > 1 or dirty:
        lines.append(
            f"- **provenance**: {len(counts)} commit(s), {dirty} of {len(runs)} runs from a "
            "tree with uncommitted changes (`-dirty`) or an unknown one: the rows may not all "
            "come from the same code"
        )
    return lines


# ------------------------------------------------------------------------------------ chart


def table1_chart(runs: Sequence[dict[str, Any]], path: pathlib.Path) -> None:
    """Bars: typicality AUROC per OoD set, without and with KLJ, per objective (columns)
    and backend (rows); the paper's values as black ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_backend = sorted(group(runs, "backend").items())
    objectives = [("ib1", "IB γ=1"), ("ibinf", "IB γ→∞"), ("cnll", "cNLL")]
    n_rows = max(1, len(by_backend))
    fig, axes = plt.subplots(
        n_rows, 3, figsize=(12, 2.6 * n_rows + 0.6), squeeze=False, sharey=True
    )
    xs = np.arange(len(OOD_SETS))
    width = 0.38
    for i, ((backend,), backend_runs) in enumerate(by_backend):
        rows = group(backend_runs, "row")
        for j, (base, title) in enumerate(objectives):
            ax = axes[i][j]
            for k, (key, colour, name) in enumerate(
                [(base, "#9aa5b1", "without KLJ"), (f"{base}_klj", "#d1495b", "with KLJ")]
            ):
                rr = rows.get((key,), [])
                stats = [mean_std(value(r, "auroc_typical", o) for r in rr) for o in OOD_SETS]
                means = [s[0] if s else np.nan for s in stats]
                stds = [s[1] if s else 0.0 for s in stats]
                pos = xs + (k - 0.5) * width
                ax.bar(pos, means, width, yerr=stds, color=colour, label=name, capsize=2)
                paper = [PAPER_TABLE1.get(key, {}).get(o, np.nan) for o in OOD_SETS]
                ax.scatter(
                    pos,
                    paper,
                    marker="_",
                    s=120,
                    color="black",
                    zorder=3,
                    label="paper" if k == 0 else None,
                )
            ax.axhline(50, color="grey", lw=0.6, ls=":")
            ax.set_xticks(xs, [OOD_TITLES[o] for o in OOD_SETS], fontsize=8)
            ax.set_ylim(0, 100)
            ax.set_title(f"{backend}: {title}", fontsize=9)
            if j == 0:
                ax.set_ylabel("typicality AUROC %")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------- reports from committed runs

REPORTS = {
    "ood": ("table1", "benchmarks.cifar.report", "table1"),
    "outliers": ("table2", "benchmarks.cifar.outliers", ""),
    "trainsize": ("fig6", "benchmarks.cifar.trainsize", ""),
    "sweep": ("fig4", "benchmarks.cifar.sweep", ""),
}
"""Per command: the report's file stem, the module that writes it and the prefix of its
``<prefix>_markdown`` / ``<prefix>_chart`` functions (``markdown`` / ``chart`` without)."""


def rewrite(folder: pathlib.Path, charts: bool = False) -> list[pathlib.Path]:
    """Write the Markdown reports of the finished runs under ``folder`` (the folder a command's
    ``--out`` wrote), as the command itself would at its end, without training anything:
    ``<stem>.md`` per command found there, and ``curves.md`` where the runs have learning
    curves; the PNG charts too if ``charts``. The run records are read, never written."""
    import importlib

    from . import curves

    written = []
    for command, (stem, module_name, prefix) in REPORTS.items():
        runs = command_runs(folder, command)
        if not runs:
            continue
        module = importlib.import_module(module_name)
        name = f"{prefix}_" if prefix else ""
        (folder / f"{stem}.md").write_text(getattr(module, f"{name}markdown")(runs))
        written.append(folder / f"{stem}.md")
        if charts:
            getattr(module, f"{name}chart")(runs, folder / f"{stem}.png")
            written.append(folder / f"{stem}.png")
        if any(curves.has_curves(r) for r in runs):
            (folder / "curves.md").write_text(curves.markdown(runs))
            written.append(folder / "curves.md")
            if charts:
                curves.chart(runs, folder / "curves.png")
                written.append(folder / "curves.png")
    return written


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.cifar.report FOLDER ...``: rewrite the reports of committed runs
    (:func:`rewrite`) without training."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m benchmarks.cifar.report",
        description="Rewrite the Markdown reports (table1.md, table2.md, fig6.md, fig4.md, "
        "curves.md) of finished ood/outliers/trainsize/sweep runs from their JSON records, "
        "without training.",
    )
    p.add_argument("folders", nargs="+", type=pathlib.Path, help="the commands' --out folders")
    p.add_argument("--charts", action="store_true", help="redraw the PNG charts too")
    args = p.parse_args(argv)
    for folder in args.folders:
        written = rewrite(folder, args.charts)
        if not written:
            print(f"{folder}: no finished runs")
            return 1
        print("wrote " + ", ".join(str(w) for w in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
