"""``report.md`` and ``figure.png`` from the records of ``runs.jsonl``.

All NLLs are test (or validation) means in nats per dimension of the standardised data; a
non-finite value counts as ``+inf`` (worst). A *cell* is a (data set, model); within a cell
every alpha has the same seeds, the same split and the same initial flow, so differences
against alpha = 0 are paired by seed. The validation-chosen alpha of a (cell, seed) is
:func:`klj_reg.pick_alpha` of the seed's validation NLLs (lowest, non-finite = ``+inf``, ties
to the smaller alpha).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..common.records import commit_text, machine_text

Cell = dict[int, dict[float, dict[str, Any]]]  # seed -> alpha -> record


def pick_alpha(scores: Mapping[float, float]) -> float | None:
    """:func:`klj_reg.pick_alpha` (``None`` where every score is non-finite)."""
    try:
        from klj_reg import pick_alpha as pick
    except ImportError:  # an older klj_reg: the same rule
        pick = _pick_alpha
    try:
        return float(pick(scores))
    except ValueError:
        return None


def _pick_alpha(scores: Mapping[float, float]) -> float:
    clean = {float(a): inf_if_not_finite(s) for a, s in scores.items()}
    if not clean or not any(math.isfinite(v) for v in clean.values()):
        raise ValueError("no finite score")
    return min(sorted(clean), key=lambda a: clean[a])


def inf_if_not_finite(value: Any) -> float:
    """``float(value)``, with None and NaN as ``+inf``."""
    if value is None:
        return math.inf
    value = float(value)
    return value if math.isfinite(value) else math.inf


# --- grouping ---------------------------------------------------------------------------------


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (data set, model, seed, alpha, steps): the last one written."""
    by_key: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in records:
        key = (r["dataset"], r["model"], r["seed"], float(r["alpha"]), r["settings"]["steps"])
        by_key[key] = r
    return list(by_key.values())


def cells(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str], Cell]:
    """(data set, model) -> seed -> alpha -> record, keeping the seeds that have every alpha
    of the cell (so that every comparison in a cell is paired)."""
    raw: dict[tuple[str, str], Cell] = {}
    for r in records:
        raw.setdefault((r["dataset"], r["model"]), {}).setdefault(r["seed"], {})[
            float(r["alpha"])
        ] = r
    out: dict[tuple[str, str], Cell] = {}
    for key, by_seed in raw.items():
        alphas = set().union(*(set(a) for a in by_seed.values()))
        complete = {s: by_alpha for s, by_alpha in by_seed.items() if set(by_alpha) == alphas}
        if complete:
            out[key] = dict(sorted(complete.items()))
    return out


def alphas_of(cell: Cell) -> list[float]:
    return sorted(next(iter(cell.values())))


def seed_mean(cell: Cell, alpha: float, field: str = "test_nll") -> float:
    """Mean over the cell's seeds; ``+inf`` if any seed's value is not finite."""
    values = [inf_if_not_finite(by_alpha[alpha][field]) for by_alpha in cell.values()]
    return math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)


def paired(
    cell: Cell, alpha: float, against: float | dict[int, float | None], field: str = "test_nll"
) -> tuple[float, int, int, int]:
    """``alpha``'s value minus ``against``'s (an alpha, or the alpha per seed), per seed:
    (mean difference over the seeds where both are finite, seeds lower, seeds compared,
    seeds where both were finite)."""
    diffs, lower, n = [], 0, 0
    for seed, by_alpha in cell.items():
        other = against if isinstance(against, float) else against.get(seed)
        if other is None:
            continue
        a = inf_if_not_finite(by_alpha[alpha][field])
        b = inf_if_not_finite(by_alpha[other][field])
        n += 1
        lower += a < b
        if math.isfinite(a) and math.isfinite(b):
            diffs.append(a - b)
    mean = statistics.fmean(diffs) if diffs else math.nan
    return mean, lower, n, len(diffs)


def chosen(cell: Cell) -> dict[int, float | None]:
    """The validation-chosen alpha per seed."""
    return {
        seed: pick_alpha({a: r["val_nll"] for a, r in by_alpha.items()})
        for seed, by_alpha in cell.items()
    }


def ranks(values: Mapping[float, float]) -> dict[float, float]:
    """Rank 1 = lowest; non-finite last; ties share the mean of their ranks."""
    clean = {a: inf_if_not_finite(v) for a, v in values.items()}
    order = sorted(clean, key=lambda a: clean[a])
    out: dict[float, float] = {}
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and clean[order[j + 1]] == clean[order[i]]:
            j += 1
        for a in order[i : j + 1]:
            out[a] = (i + j) / 2 + 1
        i = j + 1
    return out


# --- formatting -------------------------------------------------------------------------------


def num(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}".replace("-", "\u2212")


def alpha_text(alpha: float | None) -> str:
    return "none" if alpha is None else f"{alpha:g}"


def diff_text(diff: tuple[float, int, int, int]) -> str:
    """``"-0.120, 3/3 lower"``; ``†`` where the mean leaves out seeds with a non-finite NLL."""
    mean, lower, n, finite = diff
    if n == 0:
        return "n/a"
    mark = "\u2020" if finite < n else ""
    sign = "+" if mean > 0 else ""
    return f"{sign}{num(mean)}{mark}, {lower}/{n} lower"


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# --- the report -------------------------------------------------------------------------------


def _order(names: Iterable[str], canonical: Sequence[str]) -> list[str]:
    names = set(names)
    return [n for n in canonical if n in names] + sorted(names - set(canonical))


def provenance(records: list[dict[str, Any]]) -> list[str]:
    commits = Counter(commit_text(r.get("commit")) for r in records)
    machines = Counter(machine_text(r["machine"]) for r in records if r.get("machine"))
    settings = Counter(", ".join(f"{k} {v}" for k, v in r["settings"].items()) for r in records)
    lines = [
        f"{len(records)} runs. Commits: "
        + "; ".join(f"`{c}` ({n} runs)" for c, n in commits.most_common())
        + ".",
        "",
    ]
    if len(commits) > 1 or any(c.endswith("-dirty") or c == "unknown" for c in commits):
        lines += [
            "**Warning: the runs come from more than one commit or from a tree with "
            "uncommitted changes (`-dirty`) or an unknown one: the rows may not be comparable "
            "or reproducible.**",
            "",
        ]
    lines.append("Machine: " + "; ".join(f"{m} ({n} runs)" for m, n in machines.most_common()))
    lines.append("")
    lines.append("Settings: " + "; ".join(f"{s} ({n} runs)" for s, n in settings.most_common()))
    if len(settings) > 1:
        lines += ["", "**Warning: the runs do not all have the same settings.**"]
    return lines + [""]


def rank_section(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> list[str]:
    per_alpha: dict[float, list[float]] = {a: [] for a in alphas}
    for cell in grouped.values():
        if alphas_of(cell) != alphas:
            continue
        for a, r in ranks({a: seed_mean(cell, a) for a in alphas}).items():
            per_alpha[a].append(r)
    n = len(next(iter(per_alpha.values()), []))
    rows = [
        [
            alpha_text(a),
            num(statistics.median(v), 1) if v else "n/a",
            num(statistics.fmean(v), 2) if v else "n/a",
            str(sum(r == 1 for r in v)),
        ]
        for a, v in per_alpha.items()
    ]
    return [
        "## Rank of each alpha",
        "",
        f"Within each (data set, model) cell ({n} cells with every alpha), the alphas ranked by "
        "seed-mean test NLL (1 = best, non-finite last, ties share their mean rank).",
        "",
        *table(["alpha", "median rank", "mean rank", "cells ranked 1"], rows),
        "",
    ]


def chosen_section(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> list[str]:
    picks: Counter[str] = Counter()
    against: dict[float, list[tuple[float, int, int, int, int]]] = {a: [] for a in alphas}
    for cell in grouped.values():
        if alphas_of(cell) != alphas:
            continue
        choice = chosen(cell)
        picks.update(alpha_text(c) for c in choice.values())
        for a in alphas:
            against[a].append(_chosen_vs(cell, choice, a))
    rows = []
    for a, diffs in against.items():
        d = [x for x in diffs if x[2]]
        finite = [x[0] for x in d if not math.isnan(x[0])]
        lower = sum(x[1] for x in d)
        higher = sum(x[4] for x in d)
        total = sum(x[2] for x in d)
        rows.append(
            [
                alpha_text(a),
                num(statistics.fmean(finite)) if finite else "n/a",
                f"{lower}/{total}",
                f"{higher}/{total}",
            ]
        )
    return [
        "## Validation-chosen alpha",
        "",
        "Per (cell, seed), the alpha with the lowest validation NLL (`klj_reg.pick_alpha`: "
        "non-finite = +inf, ties to the smaller alpha). Chosen: "
        + ", ".join(f"{a}: {n}" for a, n in sorted(picks.items(), key=lambda x: _as_float(x[0])))
        + " (cell-seeds).",
        "",
        "Its test NLL against each fixed alpha, paired by (cell, seed): mean of the cell "
        "means of (chosen - fixed), and in how many (cell, seed) pairs the chosen one is "
        "lower / higher.",
        "",
        *table(["fixed alpha", "chosen - fixed", "chosen lower", "chosen higher"], rows),
        "",
    ]


def _as_float(text: str) -> float:
    return math.inf if text == "none" else float(text)


def _chosen_vs(
    cell: Cell, choice: dict[int, float | None], alpha: float
) -> tuple[float, int, int, int, int]:
    """Chosen-alpha test NLL minus ``alpha``'s per seed: (mean over finite pairs, lower,
    compared, finite, higher)."""
    diffs, lower, higher, n = [], 0, 0, 0
    for seed, by_alpha in cell.items():
        c = choice.get(seed)
        if c is None:
            continue
        a = inf_if_not_finite(by_alpha[c]["test_nll"])
        b = inf_if_not_finite(by_alpha[alpha]["test_nll"])
        n += 1
        lower += a < b
        higher += a > b
        if math.isfinite(a) and math.isfinite(b):
            diffs.append(a - b)
    return (statistics.fmean(diffs) if diffs else math.nan, lower, n, len(diffs), higher)


def dataset_section(
    dataset: str, grouped: dict[tuple[str, str], Cell], models: list[str]
) -> list[str]:
    rows_mean, rows_spread, rows_blow, rows_choice = [], [], [], []
    head_alphas: list[float] = []
    d_text, n_text = "", ""
    for model in models:
        cell = grouped.get((dataset, model))
        if not cell:
            continue
        alphas = alphas_of(cell)
        head_alphas = head_alphas or alphas
        if alphas != head_alphas:
            continue
        first = next(iter(next(iter(cell.values())).values()))
        d_text = f"D = {first['D']}, {first['n_train']}/{first['n_val']}/{first['n_test']}"
        seeds = len(cell)
        n_text = f"{seeds} seed{'s' if seeds > 1 else ''}"
        rows_mean.append(
            [model]
            + [
                num(seed_mean(cell, a))
                + ("" if a == 0 or 0.0 not in alphas else f" ({diff_text(paired(cell, a, 0.0))})")
                for a in alphas
            ]
        )
        rows_spread.append(
            [model]
            + [
                f"{num(seed_mean(cell, a, 'test_nll_median'), 2)} / "
                f"{num(seed_mean(cell, a, 'test_nll_max'), 1)}"
                for a in alphas
            ]
        )
        blow = [sum(bool(by[a]["blow_up"]) for by in cell.values()) for a in alphas]
        if any(blow):
            rows_blow.append([model] + [f"{b}/{seeds}" for b in blow])
        choice = chosen(cell)
        vs = [_chosen_vs(cell, choice, a) for a in alphas]
        rows_choice.append(
            [model, ", ".join(alpha_text(choice[s]) for s in cell)] + [_vs_text(v) for v in vs]
        )
    if not rows_mean:
        return []
    alpha_head = [f"alpha = {alpha_text(a)}" for a in head_alphas]
    lines = [
        f"## {dataset} ({d_text} train/val/test, {n_text})",
        "",
        "Test NLL (nats/dim, mean over seeds), and against alpha = 0: the mean paired "
        "difference and the seeds where it is lower.",
        "",
        *table(["model", *alpha_head], rows_mean),
        "",
        "Median / worst-sample test NLL (mean over seeds).",
        "",
        *table(["model", *alpha_head], rows_spread),
        "",
    ]
    if rows_blow:
        lines += ["Blow-ups (seeds).", "", *table(["model", *alpha_head], rows_blow), ""]
    else:
        lines += ["No blow-ups.", ""]
    lines += [
        "Validation-chosen alpha per seed, and its test NLL minus each fixed alpha's "
        "(mean over seeds, seeds where the chosen one is lower).",
        "",
        *table(["model", "chosen", *[f"vs {alpha_text(a)}" for a in head_alphas]], rows_choice),
        "",
    ]
    return lines


def _vs_text(v: tuple[float, int, int, int, int]) -> str:
    mean, lower, n, finite, _ = v
    return diff_text((mean, lower, n, finite))


def cost_section(
    records: list[dict[str, Any]], alphas: list[float], models: list[str]
) -> list[str]:
    def med(rs: list[dict[str, Any]], field: str) -> float:
        values = [float(r[field]) for r in rs if r.get(field) is not None]
        values = [v for v in values if math.isfinite(v)]
        return statistics.median(values) if values else math.nan

    rows = []
    for model in models:
        rs = [r for r in records if r["model"] == model]
        rows.append(
            [model]
            + [num(med([r for r in rs if r["alpha"] == a], "step_ms_median"), 1) for a in alphas]
        )
    for label, field in (("all", "step_ms_median"), ("all, thread CPU", "step_cpu_ms_median")):
        rows.append(
            [label] + [num(med([r for r in records if r["alpha"] == a], field), 1) for a in alphas]
        )
    flag_rows = []
    for a in alphas:
        rs = [r for r in records if r["alpha"] == a]
        flagged = [r for r in rs if r.get("monitor_flags")]
        blown = [r for r in rs if r["blow_up"]]
        caught = [
            r
            for r in blown
            if r.get("monitor_first_flag_step") is not None
            and (r["blow_up_step"] is None or r["monitor_first_flag_step"] < r["blow_up_step"])
        ]
        first = [r["monitor_first_flag_step"] for r in flagged]
        flag_rows.append(
            [
                alpha_text(a),
                f"{len(flagged)}/{len(rs)}",
                str(sum(int(r["monitor_flags"]) for r in rs)),
                num(statistics.median(first), 0) if first else "n/a",
                f"{len(blown)}/{len(rs)}",
                f"{len(caught)}/{len(blown)}" if blown else "n/a",
            ]
        )
    return [
        "## Cost and monitor",
        "",
        "Median step time (ms, wall; forward, penalty, backward, Adam; one torch thread per "
        "run, two runs at a time), median over runs; the last row is the thread's CPU time, "
        "which other work on the machine inflates less. alpha = 0 runs read the penalty "
        "without gradient (for the monitor and the record), so they pay its forward part.",
        "",
        *table(["model", *[f"alpha = {alpha_text(a)}" for a in alphas]], rows),
        "",
        "`klj_reg.Monitor(model, warn=False)` with its default arguments on every run: runs "
        "with at least one flag, flags in all, the median step of a run's first flag, "
        "blow-ups, and blow-ups flagged before (or without) a non-finite training loss.",
        "",
        *table(
            ["alpha", "runs flagged", "flags", "median first flag step", "blow-ups", "flagged"],
            flag_rows,
        ),
        "",
    ]


def markdown(records: list[dict[str, Any]]) -> str:
    from .data import DATASETS
    from .models import MODELS

    records = latest(records)
    grouped = cells(records)
    alphas = sorted({float(r["alpha"]) for r in records})
    datasets = _order({d for d, _ in grouped}, DATASETS)
    models = _order({m for _, m in grouped}, list(MODELS))
    lines = [
        "# KLJ alpha grid on scikit-learn's tables",
        "",
        "Written by `python -m benchmarks tabular` (design: `benchmarks/tabular/__init__.py`). "
        "NLLs in nats per dimension of the standardised data (lower is better); non-finite "
        "counts as +inf. Differences are paired by seed (same split, initial flow and "
        "batches for every alpha). \u2020: the mean leaves out seeds with a non-finite NLL.",
        "",
        *provenance(records),
        *rank_section(grouped, alphas),
        *chosen_section(grouped, alphas),
    ]
    for dataset in datasets:
        lines += dataset_section(dataset, grouped, models)
    lines += cost_section(records, alphas, models)
    return "\n".join(lines).rstrip() + "\n"


def figure(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import DATASETS
    from .models import MODELS

    records = latest(records)
    grouped = cells(records)
    datasets = _order({d for d, _ in grouped}, DATASETS)
    models = _order({m for _, m in grouped}, list(MODELS))
    fig, axes = plt.subplots(1, len(datasets), figsize=(4 * len(datasets), 3.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, dataset in zip(axes[0], datasets, strict=True):
        finite: list[float] = []
        lines = []
        for i, model in enumerate(models):
            cell = grouped.get((dataset, model))
            if not cell:
                continue
            alphas = alphas_of(cell)
            values = [seed_mean(cell, a) for a in alphas]
            finite += [v for v in values if math.isfinite(v)]
            lines.append((i, model, alphas, values))
        if not finite:
            continue
        low, high = min(finite), min(max(finite), 10.0)
        pad = 0.05 * max(high - low, 1e-3)
        top = high + pad
        everything = sorted({a for _, _, alphas, _ in lines for a in alphas})
        for i, model, alphas, values in lines:
            xs = [_position(a, everything) for a in alphas]
            shown = [v if math.isfinite(v) and v <= high else math.nan for v in values]
            ax.plot(xs, shown, "o-", color=colours(i % 10), label=model, ms=3, lw=1.2)
            over = [(x, top) for x, v in zip(xs, values, strict=True) if not v <= high]
            if over:
                ax.plot(*zip(*over, strict=True), "^", color=colours(i % 10), ms=6)
        ticks = sorted({a for _, _, alphas, _ in lines for a in alphas})
        ax.set_xticks([_position(a, ticks) for a in ticks], [alpha_text(a) for a in ticks])
        ax.set_ylim(low - pad, top + pad)
        ax.set_title(dataset)
        ax.set_xlabel("alpha")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test NLL (nats/dim, mean over seeds)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8)
    fig.suptitle("Test NLL vs alpha (\u25b2: off the scale or non-finite)")
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _position(alpha: float, alphas: Sequence[float]) -> float:
    """x position of an alpha: log10, with 0 one decade left of the smallest non-zero one."""
    smallest = min((a for a in alphas if a > 0), default=1.0)
    return math.log10(alpha) if alpha > 0 else math.log10(smallest) - 1


def write(records: list[dict[str, Any]], out: Path) -> list[Path]:
    """Write ``report.md`` and ``figure.png`` to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text(markdown(records))
    png = out / "figure.png"
    figure(records, png)
    return [md, png]
