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

import klj_reg

from ..common.records import commit_text, machine_text

Cell = dict[int, dict[float, dict[str, Any]]]  # seed -> alpha -> record


def pick_alpha(scores: Mapping[float, float]) -> float | None:
    """:func:`klj_reg.pick_alpha` (``None`` where every score is non-finite)."""
    try:
        return klj_reg.pick_alpha(scores)
    except ValueError:
        return None


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


def value(record: dict[str, Any], field: str = "score") -> float:
    """A record's ``field``, non-finite as ``+inf``. ``"score"``: the test mean NLL, ``+inf``
    for a blow-up (non-finite training loss, or test mean non-finite or above 10 nats/dim);
    ``"val_score"``: the validation mean NLL, ``+inf`` where the training loss went
    non-finite (what a user sees; the test-set criterion is not used for choosing)."""
    if field == "score":
        return math.inf if record["blow_up"] else inf_if_not_finite(record["test_nll"])
    if field == "val_score":
        stopped = record.get("blow_up_step") is not None
        return math.inf if stopped else inf_if_not_finite(record["val_nll"])
    return inf_if_not_finite(record[field])


def seed_mean(cell: Cell, alpha: float, field: str = "score") -> float:
    """Mean over the cell's seeds (the *cell score* for ``"score"``); ``+inf`` if any seed's
    value is not finite."""
    values = [value(by_alpha[alpha], field) for by_alpha in cell.values()]
    return math.inf if any(math.isinf(v) for v in values) else statistics.fmean(values)


def paired(
    cell: Cell, alpha: float, against: float | dict[int, float | None], field: str = "score"
) -> tuple[float, int, int, int]:
    """``alpha``'s value minus ``against``'s (an alpha, or the alpha per seed), per seed:
    (mean difference over the seeds where both are finite, seeds lower, seeds compared,
    seeds where both were finite)."""
    diffs, lower, n = [], 0, 0
    for seed, by_alpha in cell.items():
        other = against if isinstance(against, float) else against.get(seed)
        if other is None:
            continue
        a = value(by_alpha[alpha], field)
        b = value(by_alpha[other], field)
        n += 1
        lower += a < b
        if math.isfinite(a) and math.isfinite(b):
            diffs.append(a - b)
    mean = statistics.fmean(diffs) if diffs else math.nan
    return mean, lower, n, len(diffs)


def chosen(cell: Cell) -> dict[int, float | None]:
    """The validation-chosen alpha per seed."""
    return {
        seed: pick_alpha({a: value(r, "val_score") for a, r in by_alpha.items()})
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


def best_alpha(cell: Cell) -> float:
    """The cell's best alpha: lowest cell score, ties to the smaller alpha."""
    scores = {a: seed_mean(cell, a) for a in alphas_of(cell)}
    return min(sorted(scores), key=lambda a: scores[a])


def nearest_rank(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile by the nearest-rank rule (a value of ``values``)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def decision(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> dict[str, Any]:
    """The pre-registered rule (``benchmarks/tabular/preregistration.md``), applied as written.

    Over the cells with every alpha: the candidate is the nonzero alpha with the lowest median
    rank (ties to the smaller); it is *better than plain* if its median rank is lower than
    alpha = 0's and its cell score is lower than alpha = 0's in more than half of the cells;
    it *serves* if its cell score is within 0.05 nats/dim of the cell's best in at least 3/4
    of the cells (30 of 40) and it adds no blow-up that alpha = 0 did not have. The helper
    (validation choice per (cell, seed)) is recommended over the candidate if its test score
    is lower in more than half of the pairs and the median paired difference is below 0.
    """
    full = [cell for cell in grouped.values() if alphas_of(cell) == alphas]
    nonzero = [a for a in alphas if a]
    if not full or 0.0 not in alphas or not nonzero:
        return {"outcome": "not enough runs", "cells": len(full)}
    cell_ranks = [ranks({b: seed_mean(cell, b) for b in alphas}) for cell in full]
    median_rank = {a: statistics.median(r[a] for r in cell_ranks) for a in alphas}
    candidate = min(sorted(nonzero), key=lambda a: median_rank[a])
    below = sum(seed_mean(cell, candidate) < seed_mean(cell, 0.0) for cell in full)
    better = median_rank[candidate] < median_rank[0.0] and below > len(full) / 2
    best = [min(seed_mean(cell, b) for b in alphas) for cell in full]
    near = sum(
        seed_mean(cell, candidate) - b <= 0.05
        for cell, b in zip(full, best, strict=True)
        if math.isfinite(seed_mean(cell, candidate))
    )
    added = sum(
        bool(by[candidate]["blow_up"]) and not by[0.0]["blow_up"]
        for cell in full
        for by in cell.values()
    )
    serves = better and near >= 0.75 * len(full) and added == 0
    winners = [best_alpha(cell) for cell in full]
    diffs = []
    for cell in full:
        choice = chosen(cell)
        for seed, by_alpha in cell.items():
            c = choice[seed]
            a = math.inf if c is None else value(by_alpha[c])
            diffs.append(difference(a, value(by_alpha[candidate])))
    helper_lower = sum(d < 0 for d in diffs)
    helper_wins = helper_lower > len(diffs) / 2 and statistics.median(diffs) < 0
    if serves:
        outcome = f"default alpha = {alpha_text(candidate)}"
    elif better:
        outcome = "no single default serves"
    else:
        outcome = "no fixed alpha beats plain training"
    return {
        "outcome": outcome,
        "cells": len(full),
        "candidate": candidate,
        "median_rank": median_rank,
        "below_plain": below,
        "better_than_plain": better,
        "within_0.05": near,
        "added_blow_ups": added,
        "serves": serves,
        "best_alpha_range": (nearest_rank(winners, 0.1), nearest_rank(winners, 0.9)),
        "helper_lower": helper_lower,
        "helper_pairs": len(diffs),
        "helper_median": statistics.median(diffs),
        "helper_recommended": helper_wins,
    }


def decision_section(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> list[str]:
    d = decision(grouped, alphas)
    if "candidate" not in d:
        return ["## The pre-registered rule", "", f"Not applied: {d['outcome']}.", ""]
    n = d["cells"]
    low, high = d["best_alpha_range"]
    ranks_text = ", ".join(f"{alpha_text(a)}: {num(r, 1)}" for a, r in d["median_rank"].items())
    return [
        "## The pre-registered rule",
        "",
        "Applied as written in `benchmarks/tabular/preregistration.md` "
        f"(`benchmarks.tabular.report.decision`), over {n} complete cells.",
        "",
        f"- Median rank per alpha: {ranks_text}. Candidate: alpha = {alpha_text(d['candidate'])}.",
        f"- Better than plain: median rank {num(d['median_rank'][d['candidate']], 1)} against "
        f"{num(d['median_rank'][0.0], 1)}, cell score lower in {d['below_plain']}/{n} cells: "
        f"**{'yes' if d['better_than_plain'] else 'no'}**.",
        f"- Serves: within 0.05 nats/dim of the cell's best in {d['within_0.05']}/{n} cells "
        f"(needs {math.ceil(0.75 * n)}), blow-ups added over alpha = 0: "
        f"{d['added_blow_ups']}: **{'yes' if d['serves'] else 'no'}**.",
        f"- Best alpha per cell, 10th-90th percentile: {alpha_text(low)} to {alpha_text(high)}.",
        f"- The validation choice against alpha = {alpha_text(d['candidate'])}: lower in "
        f"{d['helper_lower']}/{d['helper_pairs']} (cell, seed) pairs, median paired "
        f"difference {num(d['helper_median'])}: "
        f"**{'recommended' if d['helper_recommended'] else 'not better than the fixed value'}**.",
        "",
        f"**Outcome: {d['outcome']}.**",
        "",
    ]


def rank_section(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> list[str]:
    full = [cell for cell in grouped.values() if alphas_of(cell) == alphas]
    rows = []
    for a in alphas:
        rank = [ranks({b: seed_mean(cell, b) for b in alphas})[a] for cell in full]
        score = [seed_mean(cell, a) for cell in full]
        best = [min(seed_mean(cell, b) for b in alphas) for cell in full]
        near = sum(s - b <= 0.05 for s, b in zip(score, best, strict=True) if math.isfinite(s))
        blown = sum(bool(by[a]["blow_up"]) for cell in full for by in cell.values())
        added = sum(
            bool(by[a]["blow_up"]) and not by[0.0]["blow_up"] if 0.0 in by else False
            for cell in full
            for by in cell.values()
        )
        lower = (
            sum(seed_mean(cell, a) < seed_mean(cell, 0.0) for cell in full)
            if 0.0 in alphas and a != 0.0
            else None
        )
        rows.append(
            [
                alpha_text(a),
                num(statistics.median(rank), 1) if rank else "n/a",
                num(statistics.fmean(rank), 2) if rank else "n/a",
                str(sum(r == 1 for r in rank)),
                "" if lower is None else f"{lower}/{len(full)}",
                f"{near}/{len(full)}",
                str(blown),
                "" if a == 0.0 else str(added),
            ]
        )
    winners = [best_alpha(cell) for cell in full]
    counts = Counter(winners)
    spread = (
        f"10th-90th percentile (nearest rank) {alpha_text(nearest_rank(winners, 0.1))} to "
        f"{alpha_text(nearest_rank(winners, 0.9))}"
        if winners
        else "no complete cells"
    )
    return [
        "## Rank of each alpha (the pre-registered quantities)",
        "",
        f"{len(full)} (data set, model) cells with every alpha. *Cell score*: the mean over "
        "seeds of the test mean NLL, a blow-up counting +inf. Within each cell the alphas "
        "are ranked by cell score (1 = best, ties share their mean rank). Per alpha: its "
        "median and mean rank over the cells, the cells it ranks 1 in, the cells where its "
        "cell score is lower than alpha = 0's (the seed-mean paired difference is < 0), the "
        "cells where it is within 0.05 nats/dim of the cell's best alpha, its blow-ups (runs) "
        "and those whose (cell, seed) did not blow up at alpha = 0.",
        "",
        *table(
            [
                "alpha",
                "median rank",
                "mean rank",
                "cells ranked 1",
                "cells below alpha = 0",
                "cells within 0.05 of best",
                "blow-ups",
                "blow-ups not at alpha = 0",
            ],
            rows,
        ),  # fmt: skip
        "",
        "Best alpha per cell (lowest cell score, ties to the smaller): "
        + ", ".join(f"{alpha_text(a)}: {counts[a]}" for a in sorted(counts))
        + f"; {spread}.",
        "",
    ]


def chosen_section(grouped: dict[tuple[str, str], Cell], alphas: list[float]) -> list[str]:
    picks: Counter[str] = Counter()
    pairs: dict[float, list[float]] = {a: [] for a in alphas}
    for cell in grouped.values():
        if alphas_of(cell) != alphas:
            continue
        choice = chosen(cell)
        picks.update(alpha_text(c) for c in choice.values())
        for seed, by_alpha in cell.items():
            c = choice[seed]
            for a in alphas:
                pairs[a].append(
                    math.inf if c is None else difference(value(by_alpha[c]), value(by_alpha[a]))
                )
    rows = []
    for a, diffs in pairs.items():
        finite = [d for d in diffs if math.isfinite(d)]
        rows.append(
            [
                alpha_text(a),
                num(statistics.fmean(finite)) if finite else "n/a",
                num(statistics.median(diffs)) if diffs else "n/a",
                f"{sum(d < 0 for d in diffs)}/{len(diffs)}",
                f"{sum(d > 0 for d in diffs)}/{len(diffs)}",
            ]
        )
    return [
        "## Validation-chosen alpha",
        "",
        "Per (cell, seed), the alpha with the lowest validation NLL (`klj_reg.pick_alpha`: "
        "non-finite, or a training loss that went non-finite, = +inf; ties to the smaller "
        "alpha; none where every alpha failed). Chosen: "
        + ", ".join(f"{a}: {n}" for a, n in sorted(picks.items(), key=lambda x: _as_float(x[0])))
        + " (cell-seeds).",
        "",
        "Its test score against each fixed alpha's, paired by (cell, seed): the mean "
        "difference over the pairs where both are finite, the median over all pairs (a "
        "blow-up on one side: -inf or +inf; on both: 0), and the pairs where the chosen one "
        "is lower / higher.",
        "",
        *table(
            ["fixed alpha", "mean chosen - fixed", "median", "chosen lower", "chosen higher"],
            rows,
        ),
        "",
    ]


def difference(a: float, b: float) -> float:
    """``a - b`` with ``inf - inf = 0`` (both blew up: a tie)."""
    return 0.0 if math.isinf(a) and math.isinf(b) else a - b


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
        a = value(by_alpha[c])
        b = value(by_alpha[alpha])
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
        "Cell score (test mean NLL in nats/dim, mean over seeds, a blow-up = +inf), and "
        "against alpha = 0: the mean paired difference (over the seeds where both are "
        "finite) and the seeds where it is lower.",
        "",
        *table(["model", *alpha_head], rows_mean),
        "",
        "Median / worst-sample test NLL (mean over seeds, blow-ups included as they are).",
        "",
        *table(["model", *alpha_head], rows_spread),
        "",
    ]
    if rows_blow:
        lines += ["Blow-ups (seeds).", "", *table(["model", *alpha_head], rows_blow), ""]
    else:
        lines += ["No blow-ups.", ""]
    lines += [
        "Validation-chosen alpha per seed, and its test score minus each fixed alpha's "
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
        "counts as +inf. A run's *score* is its test mean NLL, +inf for a blow-up "
        "(non-finite training loss, or test mean non-finite or above 10 nats/dim). "
        "Differences are paired by seed (same split, initial flow and batches for every "
        "alpha). \u2020: the mean leaves out seeds with a non-finite score.",
        "",
        *provenance(records),
        *decision_section(grouped, alphas),
        *rank_section(grouped, alphas),
        *chosen_section(grouped, alphas),
    ]
    for dataset in datasets:
        lines += dataset_section(dataset, grouped, models)
    lines += cost_section(records, alphas, models)
    return "\n".join(lines).rstrip() + "\n"


def summary(records: list[dict[str, Any]]) -> str:
    """The provenance, the pre-registered rule's outcome, the ranks and the validation
    choice: what the documentation shows (the per-table sections stay in ``report.md``)."""
    records = latest(records)
    grouped = cells(records)
    alphas = sorted({float(r["alpha"]) for r in records})
    lines = [
        *provenance(records),
        *decision_section(grouped, alphas),
        *rank_section(grouped, alphas),
        *chosen_section(grouped, alphas),
    ]
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
    columns = min(3, len(datasets) + 1)
    rows = -(-(len(datasets) + 1) // columns)  # one panel more for the legend
    fig, grid = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    axes = list(grid.flat)
    colours = plt.get_cmap("tab10")
    for ax, dataset in zip(axes, datasets, strict=False):
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
    for ax in axes[::columns]:
        ax.set_ylabel("test NLL (nats/dim)")
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[len(datasets) :]:
        ax.axis("off")
    axes[-1].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    fig.suptitle("Test NLL vs alpha, mean over seeds (\u25b2: off the scale or a blow-up)")
    fig.tight_layout()
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
