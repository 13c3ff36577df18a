"""The stability gallery: ``--quick`` end to end, failure detection on runs built to fail, and
the validation-chosen alpha never reading the test split."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")
pytest.importorskip("normflows")
pytest.importorskip("FrEIA")

from benchmarks import stability  # noqa: E402
from benchmarks.stability import configs, report, runner  # noqa: E402

QUICK = ("deep-coupling", "high-lr")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("stability")
    argv = ["--quick", "--seeds", "2", "--configs", ",".join(QUICK), "--out", str(out)]
    assert stability.main([*argv, "--jobs", "2"]) == 0
    return json.loads((out / "stability.json").read_text()), out


@pytest.fixture
def temporary_config() -> Iterator[Any]:
    """Register configurations for one test only."""
    added: list[str] = []

    def add(name: str, base: str, **changes: Any) -> str:
        def fn(quick: bool) -> configs.Config:
            return dataclasses.replace(configs.REGISTRY[base](quick), name=name, **changes)

        configs.REGISTRY[name] = fn
        added.append(name)
        return name

    yield add
    for name in added:
        del configs.REGISTRY[name]


@pytest.mark.slow
def test_quick_run_has_every_config_method_and_seed(quick: tuple[dict[str, Any], Path]) -> None:
    payload, out = quick
    reported = [r for r in payload["runs"] if r["split"] == "test"]
    keys = {(r["config"], r["method"], r["seed"]) for r in reported}
    assert keys == {(c, m, s) for c in QUICK for m in runner.METHODS for s in (0, 1)}
    assert len(reported) == len(keys)
    selection = [r for r in payload["runs"] if r["split"] == "validation"]
    assert sorted((r["config"], r["alpha"]) for r in selection) == sorted(
        (c, a) for c in QUICK for a in runner.ALPHA_GRID
    )
    for r in reported:
        assert r["settings"]["name"] == r["config"] and r["settings"]["steps"] == 30
        assert r["curve"] and r["curve"][-1]["step"] <= 30
        assert {"flagged", "flags", "first_step", "layer"} <= set(r["monitor"]["warning"])
        assert r["monitor"]["window"] == 20 and r["monitor"]["factor"] == 10
        assert math.isfinite(r["threshold"])
        if r["failed"]:
            assert r["failure"]["reason"] in ("nonfinite-params", "nonfinite-loss",
                                              "nonfinite-nll", "threshold")  # fmt: skip
            assert "lead" in r["monitor"]["warning"]
        else:
            assert r["final_nll"] <= r["threshold"] and r["best_nll"] <= r["final_nll"]
    # the methods' settings
    by = {(r["config"], r["method"], r["seed"]): r for r in reported}
    for c in QUICK:
        assert by[(c, "klj", 0)]["alpha"] == runner.DEFAULT_ALPHA
        assert by[(c, "klj-val", 0)]["alpha"] == payload["chosen_alpha"][c]
        assert payload["chosen_alpha"][c] in runner.ALPHA_GRID
        assert by[(c, "clip", 0)]["clip"] == runner.CLIP and by[(c, "clip", 0)]["alpha"] == 0
        assert by[(c, "wd", 0)]["weight_decay"] > 0
        assert by[(c, "low-lr", 0)]["lr"] == pytest.approx(by[(c, "plain", 0)]["lr"] / 10)
        assert by[(c, "clip+klj", 0)]["clip"] and by[(c, "clip+klj", 0)]["alpha"]
    # outputs
    summary = (out / "summary.md").read_text()
    assert "python -m benchmarks stability --quick" in summary
    for c in QUICK:
        assert c in summary
    assert "The monitor on plain runs" in summary and "false alarms" in summary
    assert (out / "stability.png").stat().st_size > 10_000
    assert len(payload["cells"]) == len(QUICK) * len(runner.METHODS)


@pytest.mark.slow
def test_render_rebuilds_the_summary_without_training(
    quick: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    payload, out = quick
    copy = tmp_path / "stability.json"
    copy.write_text(json.dumps({**payload, "cells": []}))
    before = copy.read_bytes()
    assert stability.main(["--render", str(copy)]) == 0
    assert copy.read_bytes() == before  # the run records are read, never rewritten
    text = (tmp_path / "summary.md").read_text()
    assert "rendered from its `stability.json` by `python -m benchmarks stability --render" in text
    assert "## KLJ against plain and the usual fixes, paired by seed" in text
    assert (tmp_path / "stability.png").exists()


def test_runs_of_one_seed_share_data_and_initialisation() -> None:
    """plain and clip start from the same flow on the same batches: their first loss (before
    any step) is identical, and a deterministic rerun reproduces a run exactly."""
    a = runner.train_one(runner.method_run("deep-coupling", "plain", 0, True))
    b = runner.train_one(runner.method_run("deep-coupling", "clip", 0, True))
    again = runner.train_one(runner.method_run("deep-coupling", "plain", 0, True))
    assert a["loss_every_10"][0] == b["loss_every_10"][0]
    assert a["curve"] == again["curve"]


def test_a_nan_parameter_fails_the_run_after_ten_skipped_steps(temporary_config: Any) -> None:
    def broken() -> Any:
        flow = configs.normflows_couplings(19, 2, 8)
        with torch.no_grad():
            next(flow.parameters()).fill_(math.nan)
        return flow

    name = temporary_config("broken", "deep-coupling", make_flow=broken)
    result = runner.train_one(runner.method_run(name, "plain", 0, True))
    assert result["failed"]
    assert result["failure"] == {"step": runner.MAX_SKIPPED, "reason": "nonfinite-loss"}
    assert result["skipped_steps"] == runner.MAX_SKIPPED
    assert result["final_nll"] is None and result["best_nll"] is None


def test_a_huge_learning_rate_fails_and_records_the_step(temporary_config: Any) -> None:
    name = temporary_config("huge-lr", "deep-coupling", lr=1e3, eval_every=5)
    result = runner.train_one(runner.method_run(name, "plain", 0, True))
    assert result["failed"] and 1 <= result["failure"]["step"] <= 30
    assert result["failure"]["reason"] in ("nonfinite-params", "nonfinite-loss",
                                           "nonfinite-nll", "threshold")  # fmt: skip
    cells = report.cells([result])
    assert cells[0]["failures"] == 1 and cells[0]["median_steps_to_failure"] is not None


def test_threshold_failure_and_monitor_warning() -> None:
    """A held-out NLL above the threshold fails the run at that evaluation; the monitor's last
    flag within the window before the failure is its warning, one outside is not."""
    flags = [{"step": 5, "layer": "a"}, {"step": 80, "layer": "b"}, {"step": 200, "layer": "c"}]
    w = runner.warning(flags, {"step": 100, "reason": "threshold"})
    assert w == {"flagged": True, "flags": 2, "first_step": 5, "layer": "b", "lead": 20}
    w = runner.warning(flags[:1], {"step": 100, "reason": "threshold"})
    assert not w["flagged"] and w["lead"] == 95
    assert runner.warning([], None) == {"flagged": False, "flags": 0, "first_step": None,
                                        "layer": None}  # fmt: skip


def test_alpha_selection_never_reads_the_test_split(temporary_config: Any) -> None:
    """Structural: the selection runs' data are carved from the training split alone. With
    the test split replaced by NaN, the selection runs are unchanged (and the reported runs,
    which do read it, fail)."""
    base = configs.REGISTRY["deep-coupling"](True)

    def poisoned(seed: int) -> configs.Split:
        data = base.make_data(seed)
        return configs.Split(data.train, np.full_like(data.held_out, np.nan))

    name = temporary_config("poisoned", "deep-coupling", make_data=poisoned)
    clean = [runner.train_one(r) for r in runner.selection_runs("deep-coupling", True)[:2]]
    dirty = [runner.train_one(r) for r in runner.selection_runs(name, True)[:2]]
    for a, b in zip(clean, dirty, strict=True):
        assert a["split"] == b["split"] == "validation"
        assert a["curve"] == b["curve"] and a["threshold"] == b["threshold"]
    assert runner.choose_alpha(clean) == runner.choose_alpha(dirty)
    reported = runner.train_one(runner.method_run(name, "plain", 0, True))
    assert reported["failure"]["reason"] == "nonfinite-nll"

    # the validation split is a partition of the training rows
    train = base.make_data(0).train
    split = runner.validation_split(train, 0)
    assert len(split.train) + len(split.held_out) == len(train)
    rows = {tuple(x) for x in train}
    assert all(tuple(x) in rows for x in np.concatenate([split.train, split.held_out]))
    with pytest.raises(ValueError, match="validation runs only"):
        runner.choose_alpha([{"split": "test", "final_nll": 0.0, "alpha": 1.0}])


def test_choose_alpha_prefers_the_lowest_validation_nll_and_skips_failures() -> None:
    runs = [
        {"split": "validation", "alpha": 1e-3, "final_nll": None},  # failed
        {"split": "validation", "alpha": 1e-2, "final_nll": 0.5},
        {"split": "validation", "alpha": 1e-1, "final_nll": 0.2},
        {"split": "validation", "alpha": 1.0, "final_nll": 0.2},
    ]
    assert runner.choose_alpha(runs) == 1e-1  # tie: the smaller alpha
    # every selection run failed (near-singular, high-lr): the smallest alpha, not an error
    failed = [{"split": "validation", "alpha": a, "final_nll": None} for a in (1.0, 1e-2, 1e-3)]
    assert runner.choose_alpha(failed) == 1e-3


def test_every_configuration_cites_a_report_and_every_backend_appears() -> None:
    """Each cited report ("owner/repo#n", then how it relates in brackets) is described in the
    configuration's docstring; a configuration without one says that none was found."""
    backends = set()
    for name in configs.REGISTRY:
        cfg = configs.get(name)
        backends.add(cfg.backend)
        assert cfg.sources or "No public report" in cfg.doc, name
        for source in cfg.sources:
            report_id = source.split(" (")[0]
            assert "#" in report_id and "/" in report_id, (name, source)
            assert report_id in cfg.doc, (name, source)
        assert "Threshold" in cfg.doc and cfg.margin > 0
    assert backends == {"freia", "nflows", "normflows", "zuko"}
    assert len(configs.REGISTRY) >= 8
