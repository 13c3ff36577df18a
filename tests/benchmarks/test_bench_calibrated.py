"""The calibrated OoD experiment's machinery: runs that resume, OoD sets at the resolution
used, and the pre-registered reading rules applied to made-up records."""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any

import pytest
import torch

from benchmarks.cifar import calibrated, calibrated_report
from benchmarks.cifar.classifier import GenerativeClassifier
from benchmarks.cifar.train import Objective, TrainConfig, fit
from benchmarks.common import backends
from benchmarks.common.image_flows import build

INSTALLED = backends.available()


class Interrupt(Exception):
    pass


def _classifier(backend: str) -> GenerativeClassifier:
    return GenerativeClassifier(build(backend, "tiny", shape=(3, 8, 8), seed=0), shape=(3, 8, 8))


@pytest.mark.skipif("freia" not in INSTALLED, reason="FrEIA not installed")
def test_a_killed_run_resumes_where_it_stopped(tmp_path: pathlib.Path) -> None:
    """Killed after epoch 2 of 3 and started again, fit ends with exactly the parameters and
    history of the run that was never interrupted."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    cfg = TrainConfig(epochs=3, batch_size=16, bn_refresh=0)
    objective = Objective("ib", math.inf, 0.5, "jacobian")

    straight = _classifier("freia")
    fit(straight, x, y, cfg, objective, seed=1, progress=False)

    ckpt = tmp_path / "run.pt"
    epochs_seen = []

    def stop_in_third() -> dict[str, float]:
        epochs_seen.append(1)
        if len(epochs_seen) == 3:
            raise Interrupt
        return {}

    killed = _classifier("freia")
    with pytest.raises(Interrupt):
        fit(killed, x, y, cfg, objective, seed=1, progress=False, after_epoch=stop_in_third,
            checkpoint=ckpt)  # fmt: skip
    assert ckpt.is_file() and torch.load(ckpt, weights_only=False)["epochs_done"] == 2
    resumed = _classifier("freia")  # a new process: fresh objects, same checkpoint
    history = fit(resumed, x, y, cfg, objective, seed=1, progress=False, checkpoint=ckpt)
    assert len(history.epochs) == 3
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_noisy_is_made_after_downsampling() -> None:
    """At 16x16 Noisy's noise has the paper's sigma (0.015) against the ID test images as
    evaluated (box-downsampled, rounded to uint8); made before downsampling, the 2x2 box mean
    halves it."""
    from benchmarks.cifar.data import Images, downsample
    from benchmarks.cifar.oodsets import NOISE_STD, noisy

    g = torch.Generator().manual_seed(0)
    x = torch.randint(40, 216, (64, 3, 32, 32), dtype=torch.uint8, generator=g)
    test = Images(x, torch.zeros(64, dtype=torch.long), "random")
    id_16 = downsample(x, 16).float() / 255
    before = downsample(noisy(x.float() / 255), 16) - id_16
    assert before.std().item() == pytest.approx(NOISE_STD / 2, rel=0.1)
    made = noisy(downsample(test.x, 16).float() / 255)
    assert (made - id_16).std().item() == pytest.approx(NOISE_STD, rel=0.05)


def test_jobs_are_seed_major_skip_finished_and_checkpoint(tmp_path: pathlib.Path) -> None:
    todo, total = calibrated.jobs(tmp_path, ["A", "B"], ["freia", "normflows"], [0, 1, 2], None)
    assert total == len(todo) == 2 * 2 * 5 * 3
    assert [j.config["seed"] for j in todo] == sorted(j.config["seed"] for j in todo)
    assert all(j.checkpoint and j.checkpoint.endswith(".pt") for j in todo)
    first = todo[0]
    assert first.config["regime"] == "A" and first.config["ood_at_resolution"] is True
    assert first.config["preset"] == "converged" and first.config["resolution"] == 16
    nf = next(j for j in todo if j.config["backend"] == "normflows")
    assert nf.config["train"]["optimizer"] == "adam" and first.config["train"]["optimizer"] == "sgd"
    b = next(j for j in todo if j.config["regime"] == "B")
    assert b.config["train_limit"] == 4000 and b.config["train"]["epochs"] == 150
    steps = {r: calibrated.presets.get(p).train_limit // 64 * calibrated.presets.get(p).train.epochs
             for r, p in calibrated.REGIMES.items()}  # fmt: skip
    assert abs(steps["A"] - steps["B"]) / steps["A"] < 0.01  # the same number of steps
    from benchmarks.cifar import report

    report.write_json(first.path, {"config": first.config, "status": "ok"})
    again, _ = calibrated.jobs(tmp_path, ["A", "B"], ["freia", "normflows"], [0, 1, 2], None)
    assert len(again) == len(todo) - 1 and first.path not in [j.path for j in again]
    alphas = {(r.key, r.form, r.alpha) for r in calibrated.rows("freia")}
    assert ("rc0.001", "released-code", 0.001) in alphas and ("jac0.01", "jacobian", 5.0) in alphas


# --------------------------------------------------------------- the pre-registered rules


def _run(regime: str, row: str, seed: int, auc: dict[str, float], lx_end: float = 1.0,
         acc: float = 60.0, train_acc: float = 90.0) -> dict[str, Any]:  # fmt: skip
    history = [{"test_l_x": 1.0 + (lx_end - 1.0) * i / 29, "test_accuracy": acc}
               for i in range(30)]  # fmt: skip
    return {
        "status": "ok",
        "config": {"command": "calibrated", "regime": regime, "backend": "freia", "row": row,
                   "seed": seed},
        "commit": {"commit": "abc", "dirty": False},
        "history": history,
        "metrics": {"accuracy": acc, "train_accuracy": train_acc,
                    "ood": {n: {"auroc_typical": v, "auroc": v} for n, v in auc.items()}},
    }  # fmt: skip


def _write(out: pathlib.Path, run: dict[str, Any]) -> None:
    from benchmarks.cifar import report

    c = run["config"]
    report.write_json(out / c["regime"] / c["backend"] / f"{c['row']}_seed{c['seed']}.json", run)


BASE = {"rot_rgb": 60.0, "quickdraw": 99.0, "tinyimagenet": 55.0, "noisy": 51.0}


def test_rules_pinned_sets_pairing_plateau_and_verdict(tmp_path: pathlib.Path) -> None:
    keys = [r.key for r in calibrated.rows("freia")]
    for regime in ("A", "B"):
        for seed in range(3):
            _write(tmp_path, _run(regime, "plain", seed, {**BASE, "rot_rgb": 60.0 + seed}))
            for key in keys[1:]:
                auc = dict(BASE, rot_rgb=60.0 + seed)
                if regime == "B" and key == "jac0.01":
                    auc["rot_rgb"] += 5.0 + seed  # +5, +6, +7 on one set: +1.25.. on four
                if regime == "B" and key == "rc0.01":
                    auc["noisy"] += 10.0 + 2 * seed  # +10, +12, +14 on a pinned set: helps
                if regime == "A" and key == "rc0.01":
                    auc["tinyimagenet"] += [3.0, -1.0, 4.0][seed]  # mixed signs
                drifting = regime == "A" and key == "rc0.001"
                _write(tmp_path, _run(regime, key, seed, auc, lx_end=5.0 if drifting else 1.0))
    a = calibrated_report.write(tmp_path)
    cell = a["cells"]["A/freia"]
    # QuickDraw at 99 and Noisy at 51 are pinned: flagged, out of the headroom mean (Rot and
    # TinyImageNet); the headline is the four-set mean
    assert set(cell["gate"]["pinned"]) == {"quickdraw", "noisy"}
    assert cell["headroom_sets"] == ["rot_rgb", "tinyimagenet"]
    rows = cell["rows"]
    assert rows["rc0.001"]["paired"]["reading"].startswith("unscorable")
    assert rows["rc0.01"]["paired"]["positive"] == 2
    assert rows["rc0.01"]["paired"]["reading"] == "no detectable effect"
    b = a["cells"]["B/freia"]["rows"]["jac0.01"]["paired"]
    assert b["headroom"] == pytest.approx([2.5, 3.0, 3.5])  # +5..7 on Rot, over 2 sets
    assert b["headline"] == pytest.approx([1.25, 1.5, 1.75])  # over 4 sets
    assert b["reading"] == "no detectable effect"  # below +2 on the four-set mean
    big = a["cells"]["B/freia"]["rows"]["rc0.01"]["paired"]
    assert big["headline"] == pytest.approx([2.5, 3.0, 3.5]) and big["reading"] == "helps"
    assert a["cells"]["B/freia"]["gate"]["overfits"] is True
    # regime A has an unscorable row: no verdict, whatever B says
    assert a["verdicts"]["freia"] == "no verdict (regime A has unscorable rows)"
    text = (tmp_path / "report.md").read_text()
    assert "+3.0 [+2.5, +3.0, +3.5]" in text and "3/3" in text
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_verdict_rule() -> None:
    v = calibrated_report.verdict
    none = "no detectable effect"
    assert v({"A": {"x": "helps"}, "B": {"x": none}}) == "replicates"
    assert v({"A": {"x": none, "y": "hurts"}, "B": {"x": "helps"}}).startswith("replicates only")
    assert v({"A": {"x": none}, "B": {"x": none}}) == "does not replicate at this scale"
    assert v({"A": {"x": "incomplete (2 of 3 seeds)"}}).startswith("no verdict yet")
    unscorable = "unscorable (test L_x still drifts)"
    # every run done, but a row of A cannot be read: no verdict, and not "yet"
    assert v({"A": {"x": unscorable, "y": none}, "B": {"x": "helps"}}) == (
        "no verdict (regime A has unscorable rows)"
    )
    assert v({"A": {"x": none}, "B": {"x": unscorable}}) == (
        "no gain in regime A; no verdict (regime B has unscorable rows)"
    )


def test_overfitting_gate() -> None:
    plain = _run("B", "plain", 0, BASE, acc=60.0, train_acc=70.0)
    assert calibrated_report.gate(plain, "B")["overfits"] is False
    plain = replace_metrics(plain, train_accuracy=80.0)
    assert calibrated_report.gate(plain, "B")["overfits"] is True


def replace_metrics(run: dict[str, Any], **metrics: float) -> dict[str, Any]:
    return {**run, "metrics": {**run["metrics"], **metrics}}


def test_fallback_regime_stands_for_b_only_when_b_does_not_overfit(tmp_path: pathlib.Path) -> None:
    keys = [r.key for r in calibrated.rows("freia")]
    for regime, train_acc in (("A", 90.0), ("B", 65.0), ("B2", 95.0)):
        for seed in range(3):
            _write(tmp_path, _run(regime, "plain", seed, BASE, train_acc=train_acc))
            for key in keys[1:]:
                gain = 10.0 if regime == "B2" and key == "rc0.01" else 0.0
                auc = dict(BASE, rot_rgb=BASE["rot_rgb"] + gain)
                _write(tmp_path, _run(regime, key, seed, auc, train_acc=train_acc))
    a = calibrated_report.analyse(tmp_path)
    assert a["cells"]["B/freia"]["gate"]["overfits"] is False
    assert a["verdicts"]["freia"].startswith("replicates only where the flow overfits")
    # had B overfitted, B2 would not count
    for seed in range(3):
        _write(tmp_path, _run("B", "plain", seed, BASE, train_acc=95.0))
    assert calibrated_report.analyse(tmp_path)["verdicts"]["freia"] == (
        "does not replicate at this scale"
    )


def test_committed_report_matches_its_runs() -> None:
    """The committed report and summary are what the pre-registered rules give on the
    committed run records (a run added without re-rendering the report fails here)."""
    out = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "calibrated"
    if not (out / "report.md").exists():
        pytest.skip("no committed calibrated report")
    a = calibrated_report.analyse(out)
    # every run of the table from one clean commit, as pre-registered
    assert len(a["commits"]) == 1 and not a["commits"][0].endswith("-dirty"), a["commits"]
    assert not a["commits"][0].startswith("None")
    assert calibrated_report.markdown(a) == (out / "report.md").read_text()
    committed = json.loads((out / "summary.json").read_text())
    assert json.loads(json.dumps(a, default=str)) == committed
