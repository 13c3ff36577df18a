"""Results: one JSON per run, a Markdown table laid out like the paper's, a PNG chart.

Each run's JSON holds its config, seed, commit, machine, data source, timings, parameter
count and metrics. Tables show mean ± std over seeds, with the paper's number in brackets.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..common.records import parameters_text

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
        failed = [r for r in backend_runs if r.get("status") != "ok"]
        if failed:
            lines += ["", "Failed runs:", ""]
            for r in failed:
                lines.append(
                    f"- {r['config'].get('row')} seed {r['config'].get('seed')}: "
                    f"{one_line(r.get('error', 'unknown error'))}"
                )
    lines += ["", "Numbers in brackets: the paper's Table 1 (IB-INN architecture, 450 epochs)."]
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
    commits = sorted({str(r.get("commit", {}).get("commit"))[:10] for r in ok})
    return [
        f"- preset `{cfg.get('preset')}`: {train.get('epochs')} epochs, batch "
        f"{train.get('batch_size')}, {train.get('optimizer')} lr {train.get('lr')}, "
        f"training images {cfg.get('train_limit') or 'all'}, seeds {seeds}",
        f"- KLJ: alpha {alphas or '-'}, form {', '.join(f'`{f}`' for f in forms) or '-'}",
        "- typicality reference: mean L_x of the ID test images (as the authors' code)",
        *(f"- data: {src}" for src in sources),
        f"- machine: {', '.join(machines) or '-'}; {len(ok)}/{len(runs)} runs ok, "
        f"{minutes:.1f} run-minutes; commit {', '.join(commits) or '-'}",
    ]


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
