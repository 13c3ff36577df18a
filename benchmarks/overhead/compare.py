"""Two versions of the capture, compared on the zoo: did its host cost move beyond noise?

``python -m benchmarks.overhead.compare --before A1.json,A2.json --after B1.json,B2.json
--out DIR`` reads zoo reports (``--models zoo``) made alternately at two commits on the same
machine (A, B, A, B) and writes ``DIR/compare.md`` and ``compare.json``.

The quantity is each model's (capture - floor) / plain, the median over its interleaved
rounds: what the capture adds beyond the penalty's own arithmetic, as a fraction of that
model's plain step in the same rounds (so machine speed between runs mostly cancels). Per
model, the difference is (mean over the ``after`` runs) - (mean over the ``before`` runs);
the noise is what the same code gave twice: the median over models of |run 1 - run 2| within
each version. Per backend and family: the median difference over its models and the sign
count (models whose cost fell / rose). A change is read as real only where the median
difference exceeds the repeat noise and the signs agree.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from collections.abc import Iterable
from typing import Any


def _excess(report: dict[str, Any]) -> dict[str, float]:
    """Each model's median (capture - floor) / plain in one zoo report."""
    return {r["name"]: float(r["capture_minus_floor"]["median"]) for r in report["results"]}


def _meta(report: dict[str, Any]) -> dict[str, str]:
    return {r["name"]: f"{r['family']}/{r['backend']}" for r in report["results"]}


def _commit(report: dict[str, Any]) -> str:
    """``sha`` (``sha-dirty`` for a run on a modified tree) of a report's commit record."""
    found = report.get("commit")
    if isinstance(found, dict):
        sha = str(found.get("commit"))
        return f"{sha[:7]}-dirty" if found.get("dirty") else sha[:7]
    return str(found)[:7]


def _repeat_noise(runs: list[dict[str, float]]) -> float | None:
    """Median over models of the spread between a version's two runs (None with one run)."""
    if len(runs) < 2:
        return None
    common = set(runs[0]).intersection(*runs[1:])
    return statistics.median(abs(runs[0][m] - runs[1][m]) for m in common) if common else None


def _summary(diffs: Iterable[float]) -> dict[str, Any]:
    values = list(diffs)
    return {
        "models": len(values),
        "median_difference": statistics.median(values),
        "fell": sum(d < 0 for d in values),
        "rose": sum(d > 0 for d in values),
    }


def compare(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-model differences (after - before) of the capture's excess over the floor, with
    per-backend, per-family and overall summaries and each version's repeat noise."""
    b_runs, a_runs = [_excess(r) for r in before], [_excess(r) for r in after]
    names = sorted(set.intersection(*(set(r) for r in b_runs + a_runs)))
    if not names:
        raise ValueError("the reports share no zoo model")
    labels = _meta(after[0])
    models = []
    for name in names:
        b = statistics.fmean(r[name] for r in b_runs)
        a = statistics.fmean(r[name] for r in a_runs)
        family, backend = labels[name].split("/")
        models.append({"name": name, "family": family, "backend": backend, "before": b, "after": a})
    for m in models:
        m["difference"] = m["after"] - m["before"]

    def grouped(key: str) -> dict[str, Any]:
        groups: dict[str, list[float]] = {}
        for m in models:
            groups.setdefault(m[key], []).append(m["difference"])
        return {g: _summary(d) for g, d in sorted(groups.items())}

    return {
        "commits": {"before": [_commit(r) for r in before], "after": [_commit(r) for r in after]},
        "noise": {"before": _repeat_noise(b_runs), "after": _repeat_noise(a_runs)},
        "overall": _summary(m["difference"] for m in models),
        "by_backend": grouped("backend"),
        "by_family": grouped("family"),
        "models": models,
    }


def _row(label: str, s: dict[str, Any]) -> str:
    return (
        f"| {label} | {s['models']} | {s['median_difference']:+.4f} | {s['fell']} / {s['rose']} |"
    )


def markdown(result: dict[str, Any]) -> str:
    """The comparison as a report."""
    noise = result["noise"]
    shown = ", ".join(
        f"{k} {v:.4f}" if v is not None else f"{k} - (one run)" for k, v in noise.items()
    )
    out = [
        "# The capture's host cost, before and after (zoo, alternated runs)",
        "",
        f"Before: {', '.join(result['commits']['before'])}; after: "
        f"{', '.join(result['commits']['after'])}. Quantity: each "
        "model's median (capture - floor) / plain, averaged over its runs; difference = after "
        "- before (negative: cheaper). Repeat noise (median over models of |run 1 - run 2| of "
        f"the same code): {shown}.",
        "",
        "| group | models | median difference | fell / rose |",
        "|---|---:|---:|---:|",
        _row("all", result["overall"]),
    ]
    out += [_row(f"backend {k}", s) for k, s in result["by_backend"].items()]
    out += [_row(f"family {k}", s) for k, s in result["by_family"].items()]
    out += [
        "",
        "| model | before | after | difference |",
        "|---|---:|---:|---:|",
    ]
    out += [
        f"| {m['name']} | {m['before']:+.4f} | {m['after']:+.4f} | {m['difference']:+.4f} |"
        for m in result["models"]
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", required=True, help="comma-separated zoo JSON reports")
    parser.add_argument("--after", required=True, help="comma-separated zoo JSON reports")
    parser.add_argument("--out", type=pathlib.Path, required=True)
    args = parser.parse_args(argv)

    def load(paths: str) -> list[dict[str, Any]]:
        return [json.loads(pathlib.Path(p).read_text()) for p in paths.split(",")]

    result = compare(load(args.before), load(args.after))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "compare.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
