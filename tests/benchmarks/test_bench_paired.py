"""Paired differences in the CIFAR-10 and gallery reports, on made-up run records whose answer
is known: each + KLJ row against its baseline row of the same seed, sign counts, pooling over
outlier ratios, the gallery's per-seed comparisons and end trends, the commit provenance, and
rewriting a report from committed records without training."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import pytest

from benchmarks.cifar import outliers, report
from benchmarks.stability import report as gallery

SETS = report.OOD_SETS


def run(
    row: str,
    seed: int,
    auroc: float | dict[str, float],
    accuracy: float = 50.0,
    backend: str = "freia",
    command: str = "ood",
    fraction: float | None = None,
    commit: str = "abc1234def",
    dirty: bool = False,
) -> dict[str, Any]:
    """A finished run record of ``row``: typicality AUROC ``auroc`` on every OoD set (or per
    set), accuracy ``accuracy``."""
    per_set = auroc if isinstance(auroc, dict) else dict.fromkeys(SETS, auroc)
    variant = {} if fraction is None else {"outlier_fraction": fraction, "sigma": 1.0}
    return {
        "config": {
            "command": command,
            "preset": "cpu",
            "backend": backend,
            "row": row,
            "seed": seed,
            "alpha": 0.01 if "_klj" in row else None,
            "form": "jacobian",
            "train": {"epochs": 1, "batch_size": 8, "optimizer": "adam", "lr": 1e-3},
            "train_limit": 100,
            "variant": variant,
        },  # fmt: skip
        "label": row,
        "seed": seed,
        "status": "ok",
        "commit": {"commit": commit, "dirty": dirty},
        "machine": {"device_name": "test"},
        "metrics": {
            "accuracy": accuracy,
            "ood": {
                o: {"auroc_typical": v, "auroc": v, "entropy_ratio": 0.0}
                for o, v in per_set.items()
            },  # fmt: skip
        },
    }


def test_baseline_of_each_klj_row() -> None:
    assert report.baseline_of("ib1_klj") == "ib1"
    assert report.baseline_of("ibinf_klj_rc") == "ibinf"
    assert report.baseline_of("ibinf_klj_val") == "ibinf"
    assert report.baseline_of("cnll_klj") == "cnll"
    assert report.baseline_of("ibinf") is None


def test_paired_difference_mean_range_and_sign_count() -> None:
    treated = [run("ibinf_klj", 0, 60.0), run("ibinf_klj", 1, 52.0), run("ibinf_klj", 2, 70.0)]
    base = [run("ibinf", 0, 57.0), run("ibinf", 1, 53.0), run("ibinf", 2, 64.0)]
    p = report.paired(treated, base, "rot_rgb")
    assert p is not None
    assert p.seeds == (0, 1, 2) and p.diffs == (3.0, -1.0, 6.0)
    assert p.mean == pytest.approx(8 / 3) and (p.low, p.high) == (-1.0, 6.0)
    assert (p.positive, p.negative, p.n) == (2, 1, 3)
    assert report.paired_text(p) == "+2.7 [-1.0, +6.0] 2/3"


def test_pairs_by_seed_not_by_order_and_only_where_both_ran() -> None:
    treated = [run("cnll_klj", 1, 40.0), run("cnll_klj", 0, 45.0), run("cnll_klj", 5, 99.0)]
    base = [run("cnll", 0, 50.0), run("cnll", 1, 41.0), run("cnll", 2, 10.0)]
    p = report.paired(treated, base, "noisy")
    assert p is not None and p.seeds == (0, 1) and p.diffs == (-5.0, -1.0)
    assert report.paired_text(p) == "-3.0 [-5.0, -1.0] 0/2"
    assert report.paired([run("cnll_klj", 3, 1.0)], base, "noisy") is None
    assert report.paired_text(None) == "n/a"


def test_ties_are_counted_apart_and_duplicate_seeds_refused() -> None:
    p = report.paired([run("ib1_klj", 0, 50.0), run("ib1_klj", 1, 51.0)],
                      [run("ib1", 0, 50.0), run("ib1", 1, 50.0)], "mean")  # fmt: skip
    assert report.paired_text(p) == "+0.5 [+0.0, +1.0] 1/2, 1 tied"
    with pytest.raises(ValueError, match="two runs of seed 0"):
        report.paired([run("ib1_klj", 0, 1.0), run("ib1_klj", 0, 2.0)], [run("ib1", 0, 1.0)])


def test_four_set_mean_and_accuracy_columns() -> None:
    treated = run("ib1_klj", 0, {"rot_rgb": 80, "quickdraw": 60, "tinyimagenet": 50,
                                 "noisy": 50}, accuracy=40.0)  # fmt: skip
    base = run("ib1", 0, 55.0, accuracy=42.5)
    assert report.column_value(treated, "mean") == 60.0
    assert report.paired_text(report.paired([treated], [base], "mean")) == "+5.0 [+5.0, +5.0] 1/1"
    assert report.paired_text(report.paired([treated], [base], "accuracy")) == (
        "-2.5 [-2.5, -2.5] 0/1"
    )
    partial = run("ib1", 1, 55.0)
    del partial["metrics"]["ood"]["noisy"]
    assert report.column_value(partial, "mean") is None


def test_table1_shows_each_klj_row_against_its_own_baseline() -> None:
    runs = []
    for seed, (b, k, rc) in enumerate([(60.0, 62.0, 70.0), (58.0, 57.0, 66.0)]):
        runs += [run("ibinf", seed, b), run("ibinf_klj", seed, k), run("ibinf_klj_rc", seed, rc)]
        runs += [run("cnll", seed, 50.0), run("cnll_klj", seed, 49.0)]
    runs.append(run("ib1_klj", 0, 90.0))  # no baseline row: no paired line
    table = report.table1_markdown(runs)
    section = table.split("### Paired differences")[1]
    lines = {line.split(" | ")[0]: line for line in section.splitlines() if line.startswith("| ")}
    assert lines["| ibinf_klj"].endswith("+0.5 [-1.0, +2.0] 1/2 | +0.0 [+0.0, +0.0] 0/2, 2 tied |")
    assert "| ibinf_klj_rc | ibinf | +9.0 [+8.0, +10.0] 2/2 |" in lines["| ibinf_klj_rc"]
    assert "-1.0 [-1.0, -1.0] 0/2" in lines["| cnll_klj"]
    assert "| ib1_klj" not in lines
    assert report.PAIRED_NOTE in table


def test_outliers_pair_within_a_ratio_and_pool_over_ratios() -> None:
    runs = []
    for r, diffs in [(0.05, (1.0, 2.0)), (0.1, (-1.0, 4.0))]:
        for seed, d in enumerate(diffs):
            runs.append(run("ibinf", seed, 50.0 + 10 * r, command="outliers", fraction=r))
            runs.append(run("ibinf_klj", seed, 50.0 + 10 * r + d, command="outliers", fraction=r))
    p = outliers.pooled(runs, "ibinf_klj", "quickdraw")
    assert p is not None and sorted(p.diffs) == pytest.approx([-1.0, 1.0, 2.0, 4.0])
    assert report.paired_text(p) == "+1.5 [-1.0, +4.0] 3/4"
    table = outliers.markdown(runs)
    assert table.count("#### Paired differences") == 2
    assert "### Paired differences pooled over r = 0.05, 0.1" in table
    assert "+1.5 [-1.0, +4.0] 3/4" in table


def test_provenance_names_commits_and_warns_on_dirty_trees() -> None:
    clean = [run("ib1", 0, 1.0), run("ib1", 1, 1.0)]
    assert report.provenance_lines(clean) == ["- commits: abc1234def (2 runs)"]
    mixed = [*clean, run("ib1_klj", 0, 1.0, commit="fedcba98765", dirty=True)]
    lines = report.provenance_lines(mixed)
    assert lines[0] == "- commits: abc1234def (2 runs), fedcba9876-dirty (1 run)"
    assert "2 commit(s), 1 of 3 runs from a tree with uncommitted changes" in lines[1]


def test_rewrite_writes_the_report_from_records_and_leaves_them(tmp_path: pathlib.Path) -> None:
    records = [run("ibinf", 0, 60.0), run("ibinf_klj", 0, 63.0)]
    for r in records:
        path = tmp_path / "freia" / f"{r['config']['row']}_seed0.json"
        report.write_json(path, r)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.json")}
    assert report.main([str(tmp_path)]) == 0
    assert "+3.0 [+3.0, +3.0] 1/1" in (tmp_path / "table1.md").read_text()
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.json")} == before
    assert not (tmp_path / "table1.png").exists()
    assert report.main([str(tmp_path / "freia" / "none")]) == 1


# ------------------------------------------------------------------------------- the gallery


def gallery_run(
    method: str, seed: int, curve: list[float], failed_at: int | None = None, steps: int = 100
) -> dict[str, Any]:
    """A test-split gallery run whose held-out NLL is ``curve`` at steps 25, 50, ...; failed at
    step ``failed_at`` if given."""
    points = [{"step": 25 * (i + 1), "nll": v} for i, v in enumerate(curve)]
    failed = failed_at is not None
    return {
        "config": "cfg", "method": method, "seed": seed, "split": "test",
        "failed": failed, "failure": {"step": failed_at, "reason": "threshold"} if failed else None,
        "final_nll": None if failed else curve[-1], "curve": points,
        "settings": {"steps": steps}, "best_nll": None if failed else min(curve),
        "alpha": 0.01 if "klj" in method else 0.0, "threshold": 2.0, "skipped_steps": 0,
        "train_seconds": 1.0,
        "monitor": {"warning": {"flagged": False, "flags": 0, "lead": 0, "layer": None}},
    }  # fmt: skip


def test_gallery_pairs_survival_and_held_out_nll_by_seed() -> None:
    runs = [
        gallery_run("plain", 0, [0.5, 0.4, 3.0], failed_at=75),
        gallery_run("klj", 0, [0.6, 0.5, 0.55, 0.6]),
        gallery_run("plain", 1, [0.5, 0.3, 0.35, 0.4]),
        gallery_run("klj", 1, [0.5, 0.35, 0.3, 0.2]),
        gallery_run("plain", 2, [0.5, math.inf], failed_at=50),
        gallery_run("klj", 2, [0.5, 5.0], failed_at=50),
    ]
    p = gallery.paired_seeds(runs, "cfg", "klj", "plain")
    assert p is not None
    assert (p["only"], p["only_other"], p["both"], p["neither"]) == (1, 0, 1, 1)
    assert p["final"] == pytest.approx([-0.2])
    assert p["best"] == pytest.approx([0.1, -0.1, 0.0])  # best reached before any failure
    assert gallery._diff_text(p["final"]) == "-0.200 [-0.200, -0.200] 1/1 lower"
    assert gallery.paired_seeds(runs, "cfg", "klj", "wd") is None
    table = gallery.paired_table(runs, [{"name": "cfg"}])
    assert "| cfg | klj | plain | 1 / 0 / 1 / 1 |" in table


def test_end_trend_is_the_slope_over_the_last_quarter() -> None:
    rising = gallery_run("klj", 0, [0.5, 0.4, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], steps=200)
    assert gallery.end_trend(rising) == pytest.approx(0.4)  # 0.1 per 25 steps, per 100
    assert gallery.end_trend(gallery_run("plain", 0, [0.5, 9.0], failed_at=50)) is None
    assert gallery.end_trend(gallery_run("plain", 0, [0.5, 0.4], steps=50)) is None
    cells = gallery.cells(
        [rising, gallery_run("klj", 1, [0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], steps=200)]
    )
    assert cells[0]["rising_at_end"] == 1 and cells[0]["end_trend"] == pytest.approx(0.0)


def test_committed_reports_match_their_records() -> None:
    """The committed Markdown of each CIFAR-10 results folder is what the report code writes
    from the committed records (rewritten after a change to the report code)."""
    root = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for folder, stem, command in [
        ("ood/cpu", "table1", "ood"),
        ("ood/converged", "table1", "ood"),
        ("outliers/cpu", "table2", "outliers"),
    ]:
        path = root / folder
        if not (path / f"{stem}.md").exists():
            continue
        runs = report.command_runs(path, command)
        write = report.table1_markdown if command == "ood" else outliers.markdown
        assert (path / f"{stem}.md").read_text() == write(runs), folder


def test_committed_gallery_summary_matches_its_runs() -> None:
    from benchmarks import stability

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "stability"
    if not (path / "stability.json").exists():
        pytest.skip("no committed gallery")
    payload = json.loads((path / "stability.json").read_text())
    payload["rendered_by"] = payload.get("rendered_by")
    summary = stability.summary_md(payload)
    assert "## KLJ against plain and the usual fixes, paired by seed" in summary
    assert summary == (path / "summary.md").read_text()
