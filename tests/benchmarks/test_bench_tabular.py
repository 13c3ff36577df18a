"""``python -m benchmarks tabular``: data and splits, a short run of two models and two alphas,
resuming, and the report's arithmetic on a synthetic records file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("FrEIA")
pytest.importorskip("zuko")

import klj_reg  # noqa: E402
from benchmarks.tabular import data, models, report, run  # noqa: E402

SETTINGS = run.Settings(steps=6, hidden=8, layers=2)


@pytest.mark.parametrize("name", data.DATASETS)
def test_tables_load_without_download_and_split_60_20_20(name: str) -> None:
    table = data.load(name)
    assert table.shape[1] == data.DIMS[name]
    assert np.isfinite(table).all()
    s = data.split(name, 0, table)
    n = len(table)
    assert len(s.train) + len(s.val) + len(s.test) == n
    assert len(s.train) == round(0.6 * n) and len(s.val) == round(0.2 * n)
    np.testing.assert_allclose(s.train.mean(0), 0, atol=1e-9)
    np.testing.assert_allclose(s.train.std(0), 1, atol=1e-9)
    # the rows are a permutation of the table plus dequantisation noise within one
    # resolution step of each column, standardised with the training statistics
    rows = np.concatenate([s.train, s.val, s.test]) * s.std + s.mean
    order = np.random.default_rng([0, data.name_code(name)]).permutation(n)
    noise = rows - table[order]
    assert (noise >= -1e-9).all() and (noise < data.resolution(table) + 1e-9).all()
    assert noise.std() > 0


def test_resolution_is_the_smallest_gap_per_column() -> None:
    table = np.array([[0.0, 1.0, 5.0], [0.2, 2.0, 5.0], [0.5, 2.0, 5.0]])
    np.testing.assert_allclose(data.resolution(table), [0.2, 1.0, 1.0])
    sex = data.load("diabetes")[:, 1]
    assert set(np.unique(sex)) == {1.0, 2.0}  # two values: dequantised over [1, 3)
    assert data.resolution(data.load("diabetes"))[1] == 1.0


def test_splits_are_seeded_and_digits_dequantised() -> None:
    a, b, c = data.split("digits", 0), data.split("digits", 0), data.split("digits", 1)
    np.testing.assert_array_equal(a.test, b.test)
    assert not np.array_equal(a.test, c.test)
    raw = np.concatenate([a.train, a.val, a.test]) * a.std + a.mean
    assert not np.allclose(raw, raw.round())  # noise added to the integer pixels
    assert (raw - np.floor(raw) >= 0).all()
    iris = data.split("iris", 2)
    assert iris.train.shape == (90, 4) and iris.val.shape == (30, 4)


def test_diabetes_has_the_target_as_a_column() -> None:
    from sklearn.datasets import load_diabetes

    table = data.load("diabetes")
    np.testing.assert_array_equal(table[:, -1], load_diabetes().target)


@pytest.mark.parametrize("model", models.DEFAULT_MODELS)
def test_every_model_is_captured_on_an_odd_dimension(model: str) -> None:
    flow = models.build(model, 5, 2, 8, seed=3)
    x = torch.randn(16, 5)
    z, log_det = flow(x)
    assert z.shape == (16, 5)
    values = klj_reg.layer_divergence(flow.model, x)
    assert len(values) >= 2  # one per layer at least
    again = models.build(model, 5, 2, 8, seed=3)
    for p, q in zip(flow.parameters(), again.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_the_penalty_is_per_sample_not_per_dimension() -> None:
    flow = models.build("nflows-maf", 5, 2, 8, seed=1)
    x = torch.randn(16, 5)
    flow(x)
    default = klj_reg.penalty(flow.model, x, alpha=1.0)
    flow(x)
    summed = klj_reg.penalty(flow.model, x, alpha=1.0, normaliser="none")
    torch.testing.assert_close(default, summed, rtol=0, atol=0)


def test_batches_are_the_same_for_every_alpha_and_model() -> None:
    a = list(run.batch_order(90, 64, 5, "iris", 0))
    b = list(run.batch_order(90, 64, 5, "iris", 0))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(len(x) == 64 and len(set(x)) == 64 for x in a)


def test_grid_runs_all_alphas_of_a_cell_together() -> None:
    tasks = run.grid(
        ["iris", "wine"], ["freia-allinone", "zuko-realnvp"], [0, 1], [0.0, 1.0], SETTINGS
    )
    assert len(tasks) == 16
    for i in range(0, 16, 2):
        assert {t.alpha for t in tasks[i : i + 2]} == {0.0, 1.0}
        assert len({t.key[:3] for t in tasks[i : i + 2]}) == 1
    assert [t.seed for t in tasks] == [0] * 8 + [1] * 8


@pytest.fixture(scope="module")
def short_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tabular")
    argv = ["--datasets", "iris", "--models", "freia-glow,zuko-nsf", "--alphas", "0,0.1"]
    argv += ["--seeds", "0", "--steps", "6", "--workers", "1", "--quick", "--out", str(out)]
    assert run.main(argv) == 0
    return out


@pytest.mark.slow
def test_short_run_records(short_run: Path) -> None:
    records = run.read_records(short_run / run.RUNS_FILE)
    assert len(records) == 4
    assert {(r["model"], r["alpha"]) for r in records} == {
        (m, a) for m in ("freia-glow", "zuko-nsf") for a in (0.0, 0.1)
    }
    for r in records:
        assert r["dataset"] == "iris" and r["D"] == 4 and r["n_test"] == 30
        assert r["steps_done"] == 6 and r["settings"]["steps"] == 6
        assert r["klj_end"] > 0  # the penalty captured the model's layers
        assert r["penalty_end"] == pytest.approx(r["alpha"] * r["klj_end"])
        assert math.isfinite(r["test_nll"]) and r["test_nll_max"] >= r["test_nll_median"]
        assert r["test_nonfinite"] == 0 and not r["blow_up"]
        assert r["monitor_flags"] >= 0 and r["step_ms_median"] > 0
        assert r["commit"]["commit"] is None or len(r["commit"]["commit"]) == 40
    by = {(r["model"], r["alpha"]): r for r in records}
    # paired: the same initial flow for both alphas of a cell (the same parameter count, and
    # at alpha = 0.1 a different result from the same start)
    assert by["zuko-nsf", 0.0]["init_seed"] == by["zuko-nsf", 0.1]["init_seed"]
    assert by["zuko-nsf", 0.0]["test_nll"] != by["zuko-nsf", 0.1]["test_nll"]
    text = (short_run / "report.md").read_text()
    assert "## iris" in text and "zuko-nsf" in text
    assert (short_run / "figure.png").stat().st_size > 1000


@pytest.mark.slow
def test_resume_skips_finished_runs(short_run: Path) -> None:
    path = short_run / run.RUNS_FILE
    before = path.read_text()
    tasks = run.grid(
        ["iris"], ["freia-glow", "zuko-nsf"], [0], [0.0, 0.1], run.Settings(steps=6, hidden=16)
    )
    assert run.run_tasks(tasks, path, 1) == 0
    assert path.read_text() == before
    # a line cut off by a kill is skipped, and the next record starts a fresh line
    path.write_text(before + before.splitlines()[0][:40])
    assert len(run.read_records(path)) == 4


def test_a_non_finite_loss_is_a_blow_up(monkeypatch: pytest.MonkeyPatch) -> None:
    real = models.nll

    def broken(flow: Any, x: torch.Tensor) -> torch.Tensor:
        value = real(flow, x)
        return value * math.inf if torch.is_grad_enabled() else value

    monkeypatch.setattr(run, "nll", broken)
    record = run.train_one(run.Task("iris", "freia-allinone", 0, 0.1, SETTINGS))
    assert record["blow_up"] and record["blow_up_step"] == 1 and record["steps_done"] == 0


# --- the report on synthetic records -------------------------------------------------------------


def fake(
    dataset: str, model: str, seed: int, alpha: float, val: float, test: float
) -> dict[str, Any]:
    return {
        "dataset": dataset, "D": 4, "n_train": 90, "n_val": 30, "n_test": 30,
        "model": model, "backend": "freia", "seed": seed, "alpha": alpha,
        "settings": {"steps": 100, "batch": 64, "lr": 1e-3, "layers": 4, "hidden": 64},
        "val_nll": val, "test_nll": test, "test_nll_median": test, "test_nll_max": test + 1,
        "test_nonfinite": 0.0 if math.isfinite(test) else 1.0,
        "blow_up": not math.isfinite(test), "blow_up_step": None,
        "monitor_flags": 0, "monitor_first_flag_step": None, "step_ms_median": 5.0,
        "commit": {"commit": "a" * 40, "dirty": False}, "machine": {"device_name": "cpu"},
    }  # fmt: skip


# test NLL per seed for alphas 0, 0.1, 1 in cell (iris, m1); the validation NLL picks
# 0.1 for seeds 0 and 1 (seed 1: a tie with 1, to the smaller), and 0 for seed 2 where 1 is inf
M1_TEST = {0.0: (1.0, 1.2, 1.1), 0.1: (0.9, 1.0, 1.2), 1.0: (0.95, 1.5, math.inf)}
M1_VAL = {0.0: (1.0, 1.1, 1.0), 0.1: (0.8, 1.0, 1.1), 1.0: (0.9, 1.0, math.nan)}


def synthetic() -> list[dict[str, Any]]:
    records = []
    for a in M1_TEST:
        for s in range(3):
            records.append(fake("iris", "m1", s, a, M1_VAL[a][s], M1_TEST[a][s]))
            # cell m2: alpha 1 best on every seed, alpha 0 worst
            records.append(fake("iris", "m2", s, a, 2.0 - a, 2.0 - a / 2))
    return records


def test_report_arithmetic() -> None:
    grouped = report.cells(synthetic())
    m1 = grouped["iris", "m1"]
    assert report.chosen(m1) == {0: 0.1, 1: 0.1, 2: 0.0}
    assert report.seed_mean(m1, 0.0) == pytest.approx(1.1)
    assert math.isinf(report.seed_mean(m1, 1.0))
    mean, lower, n, finite = report.paired(m1, 0.1, 0.0)
    assert (lower, n, finite) == (2, 3, 3) and mean == pytest.approx((-0.1 - 0.2 + 0.1) / 3)
    assert report.diff_text((mean, lower, n, finite)) == "\u22120.067, 2/3 lower"
    mean, lower, n, finite = report.paired(m1, 1.0, 0.0)
    assert (lower, n, finite) == (1, 3, 2) and mean == pytest.approx((-0.05 + 0.3) / 2)
    assert report.diff_text((mean, lower, n, finite)) == "+0.125\u2020, 1/3 lower"
    assert report.ranks({0.0: 1.1, 0.1: 1.0333, 1.0: math.inf}) == {0.1: 1, 0.0: 2, 1.0: 3}
    assert report.ranks({0.0: 1.0, 0.1: 1.0, 1.0: 0.5}) == {1.0: 1, 0.0: 2.5, 0.1: 2.5}
    assert report.pick_alpha({0.0: math.nan, 1.0: math.inf}) is None


def test_report_text() -> None:
    text = report.markdown(synthetic())
    # ranks: m1 (0.1 best, 0 second, 1 non-finite), m2 (1, 0.1, 0): medians 2.5, 1.5, 2
    assert "| 0 | 2.5 | 2.50 | 0 |  | 0/2 | 0 |  |" in text
    assert "| 0.1 | 1.5 | 1.50 | 1 | 2/2 | 1/2 | 0 | 0 |" in text
    assert "| 1 | 2.0 | 2.00 | 1 | 1/2 | 1/2 | 1 | 1 |" in text
    assert "Best alpha per cell (lowest cell score, ties to the smaller): 0.1: 1, 1: 1;" in text
    assert "| m1 | 0.1, 0.1, 0 |" in text and "| m2 | 1, 1, 1 |" in text
    row = "| m1 | 1.100 | 1.033 (\u22120.067, 2/3 lower) | inf (+0.125\u2020, 1/3 lower) |"
    assert row in text
    assert "| m1 | 0.1, 0.1, 0 | \u22120.100, 2/3 lower |" in text
    assert "Chosen: 0: 1, 0.1: 2, 1: 3" in text
    # chosen vs alpha = 1 per (cell, seed): -0.05, -0.5, -inf (m1), 0, 0, 0 (m2)
    assert "| 1 | \u22120.110 | \u22120.025 | 3/6 | 0/6 |" in text
    assert "Warning" not in text
    dirty = synthetic()
    dirty[0]["commit"] = {"commit": "b" * 40, "dirty": True}
    assert "**Warning" in report.markdown(dirty)


def test_the_pre_registered_rule() -> None:
    """Median ranks 0: 2.5, 0.1: 1.5, 1: 2.0, so the candidate is 0.1; lower than plain in
    both cells (better), but within 0.05 of the best only in m1 (1/2 < 3/4): no single
    default serves. The validation choice against 0.1: 0, 0, -0.1 (m1), -0.45 x 3 (m2)."""
    grouped = report.cells(synthetic())
    d = report.decision(grouped, [0.0, 0.1, 1.0])
    assert d["candidate"] == 0.1
    assert d["median_rank"] == {0.0: 2.5, 0.1: 1.5, 1.0: 2.0}
    assert (d["below_plain"], d["better_than_plain"]) == (2, True)
    assert (d["within_0.05"], d["added_blow_ups"], d["serves"]) == (1, 0, False)
    assert d["outcome"] == "no single default serves"
    assert (d["helper_lower"], d["helper_pairs"]) == (4, 6)
    assert d["helper_median"] == pytest.approx(-0.275) and d["helper_recommended"]
    assert "**Outcome: no single default serves.**" in report.markdown(synthetic())
    # only m2: alpha 1 is best everywhere and serves
    only = report.cells([r for r in synthetic() if r["model"] == "m2"])
    assert report.decision(only, [0.0, 0.1, 1.0])["outcome"] == "default alpha = 1"
    # only m1 with alpha 0 the best: no fixed alpha beats plain
    worse = [r for r in synthetic() if r["model"] == "m1" and r["alpha"] != 0.1]
    assert report.decision(report.cells(worse), [0.0, 1.0])["outcome"] == (
        "no fixed alpha beats plain training"
    )


def test_a_blow_up_scores_inf_and_a_failed_training_is_not_chosen() -> None:
    records = synthetic()
    for r in records:
        if r["model"] == "m2" and r["alpha"] == 1.0 and r["seed"] == 0:
            r["blow_up"] = True  # test mean above the threshold: finite but a blow-up
        if r["model"] == "m2" and r["alpha"] == 1.0 and r["seed"] == 1:
            r["blow_up"], r["blow_up_step"] = True, 7  # training loss went non-finite
    m2 = report.cells(records)["iris", "m2"]
    assert math.isinf(report.seed_mean(m2, 1.0))
    assert report.best_alpha(m2) == 0.1
    # seed 0: the validation NLL knows nothing of the test threshold; seed 1: training failed
    assert report.chosen(m2) == {0: 1.0, 1: 0.1, 2: 1.0}
    assert report.nearest_rank([0.0, 0.1, 0.1, 1.0, 10.0], 0.1) == 0.0
    assert report.nearest_rank([0.0, 0.1, 0.1, 1.0, 10.0], 0.9) == 10.0


def test_report_command_on_a_records_file(tmp_path: Path) -> None:
    path = tmp_path / run.RUNS_FILE
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic()))
    assert run.main(["--report", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert (
        "| m2 | 2.000 | 1.950 (\u22120.050, 3/3 lower) | 1.500 (\u22120.500, 3/3 lower) |" in text
    )
    assert (tmp_path / "figure.png").stat().st_size > 1000
    assert run.main(["--report", "--out", str(tmp_path / "empty")]) == 1
