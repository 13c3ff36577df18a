"""The digits demo in --quick mode: the content of its outputs, its data protocol (exact
corruption counts, exact class-balanced subsets), and reproducibility."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

from benchmarks.common.backends import available  # noqa: E402
from benchmarks.toy import demo  # noqa: E402

BACKENDS = available()
pytestmark = pytest.mark.skipif(not BACKENDS, reason="no flow framework installed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("demo")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert demo.main(["--quick", "--out", str(out), "--jobs", "2"]) == 0
    (out / "printed.txt").write_text(printed.getvalue())
    return json.loads((out / "demo.json").read_text()), out


def class_sizes() -> np.ndarray:
    return np.bincount(demo.digits()["y_train"], minlength=10)


def test_split_is_fixed_and_stratified() -> None:
    a, b = demo.digits(), demo.digits()
    assert a["x_train"].shape == (1437, 64) and a["x_test"].shape == (360, 64)
    np.testing.assert_array_equal(a["x_train"], b["x_train"])
    np.testing.assert_array_equal(a["y_test"], b["y_test"])
    full = np.bincount(np.r_[a["y_train"], a["y_test"]], minlength=10)
    assert np.abs(np.bincount(a["y_test"], minlength=10) - full * 360 / 1797).max() < 1


def test_outliers_are_exactly_the_requested_fraction_and_nested() -> None:
    for n in (1437, 287):
        sets = {}
        for r in demo.RATIOS:
            offsets = demo.outlier_offsets(n, 64, r, np.random.default_rng([3, 1]))
            bad = (offsets != 0).any(1)
            assert bad.sum() == round(r * n)
            assert (offsets[bad] != 0).all()  # every pixel of a corrupted image moves
            if bad.sum() > 20:
                assert abs(offsets[bad].std() - demo.OUTLIER_SIGMA) < 0.05
            sets[r] = set(np.flatnonzero(bad))
        assert sets[0.05] <= sets[0.1] <= sets[0.15]


def test_subsets_are_exactly_class_balanced_and_nested() -> None:
    labels = demo.digits()["y_train"]
    sizes = class_sizes()
    previous: set[int] = set()
    for p in demo.FRACTIONS:
        index = demo.balanced_subset(labels, p, np.random.default_rng([5, 0]))
        assert len(set(index)) == len(index)
        expected = [round(p * s) for s in sizes]
        np.testing.assert_array_equal(np.bincount(labels[index], minlength=10), expected)
        assert previous <= set(index)
        previous = set(index)
    assert len(previous) == len(labels)


def test_bits_per_dim_of_an_identity_flow() -> None:
    """For z = x the model is N(mean, std^2) per pixel of u in [0, 1); bits/dim of v = 17 u."""
    data = demo.Data()
    x = data.inputs(data.u_test)
    nll = 0.5 * x.square().sum(1) + 32 * math.log(2 * math.pi)
    ours = data.bits_per_dim(nll)
    u = torch.from_numpy(data.u_test).double()
    log_pu = torch.distributions.Normal(data.mean, data.std).log_prob(u).sum(1)
    expected = -(log_pu - 64 * math.log(17)) / (64 * math.log(2))
    torch.testing.assert_close(ours.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_quick_demo_outputs(quick: tuple[dict[str, Any], Path]) -> None:
    payload, out = quick
    keys = {"command", "config", "commit", "machine", "versions", "wall_seconds", "runs", "cells"}
    assert keys <= payload.keys()
    assert payload["config"]["backends"] == BACKENDS
    settings = len(demo.RATIOS) + len(demo.FRACTIONS) - 1  # r = 0 and p = 1 is one run
    assert len(payload["runs"]) == len(BACKENDS) * settings * 2
    assert len(payload["cells"]) == len(payload["runs"])  # one seed: a cell per run
    sizes = class_sizes()
    for run in payload["runs"]:
        assert math.isfinite(run["test_bpd"]) and 0 < run["test_bpd"] < 20
        assert run["auroc"].keys() == {*demo.OOD_SETS, "mean"}
        for value in run["auroc"].values():
            assert math.isfinite(value) and 0 <= value <= 100
        mean = np.mean([run["auroc"][k] for k in demo.OOD_SETS])
        assert run["auroc"]["mean"] == pytest.approx(mean)
        expected = [round(run["fraction"] * s) for s in sizes]
        assert run["class_counts"] == expected
        assert run["n_train"] == sum(expected)
        assert run["n_corrupted"] == round(run["ratio"] * run["n_train"])
        assert run["ratio"] == 0 or run["fraction"] == 1.0
    for cell in payload["cells"]:
        assert all(math.isfinite(v) for v in cell.values() if isinstance(v, float))
    # plain and KLJ runs of a setting share data and initialisation; only the loss differs
    by_key = {(r["backend"], r["ratio"], r["fraction"], r["alpha"]): r for r in payload["runs"]}
    for (backend, ratio, fraction, alpha), run in by_key.items():
        if alpha:
            plain = by_key[(backend, ratio, fraction, 0.0)]
            assert run["final_loss"] != plain["final_loss"]
            assert run["n_corrupted"] == plain["n_corrupted"]
    summary = (out / "summary.md").read_text()
    for backend in BACKENDS:
        assert f"| {backend} | r = 0.15 |" in summary and f"| {backend} | p = 0.2 |" in summary
    # the printed table is followed by a one-line legend of its settings' r and p
    printed = (out / "printed.txt").read_text().splitlines()
    last_row = max(i for i, line in enumerate(printed) if line.startswith("| "))
    assert printed[last_row + 1] == demo.LEGEND
    assert demo.LEGEND.startswith("r: ") and "; p: " in demo.LEGEND
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow
def test_runs_are_reproducible(quick: tuple[dict[str, Any], Path]) -> None:
    """The same run in this process (1 thread) equals the one the worker pool produced."""
    payload, _ = quick
    threads = torch.get_num_threads()
    try:
        for run in payload["runs"][:: max(1, len(payload["runs"]) // 4)]:
            spec = demo.Run(
                run["backend"], run["ratio"], run["fraction"], run["seed"], run["alpha"]
            )
            again = demo.train_one(spec, demo.QUICK)
            for key in ("test_bpd", "auroc", "final_loss", "class_counts", "n_corrupted"):
                assert again[key] == run[key], (spec, key)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["realnvp", "maf"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_tabular_flows_log_det_and_penalty(backend: str, kind: str) -> None:
    """Each backend's tabular flow: log-det equal to the exact Jacobian's, same parameter count
    as the other backends, and klj_reg captures it during the flow's own forward pass."""
    import klj_reg
    from benchmarks.common.records import parameter_count
    from benchmarks.common.tabular import tabular_flow

    if backend == "freia" and kind == "maf":
        with pytest.raises(ValueError, match="no autoregressive"):
            tabular_flow(backend, 8, kind=kind)
        return
    dim, layers, hidden = 8, 3, 16
    flow = tabular_flow(backend, dim, layers, hidden, kind).double()
    with torch.no_grad():  # move away from the identity start
        for p in flow.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    subnet = dim // 2 * hidden + hidden * hidden + hidden * dim + 2 * hidden + dim
    made = dim * hidden + hidden * hidden + hidden * 2 * dim + 2 * hidden + 2 * dim
    expected = layers * (subnet + 2 * dim) if kind == "realnvp" else layers * made
    assert parameter_count(flow) == expected

    x = torch.randn(5, dim, dtype=torch.float64, requires_grad=True)
    z, log_det = flow(x)
    assert z.shape == (5, dim) and log_det.shape == (5,)
    jac = torch.stack(
        [torch.autograd.grad(z[:, j].sum(), x, retain_graph=True)[0] for j in range(dim)], 1
    )
    tol = 1e-5 if backend == "normflows" else 1e-9  # normflows sums log-dets in float32
    truth = torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(log_det.double(), truth, rtol=tol, atol=tol)

    x = x.detach()
    flow(x)  # the user's pass, then the penalty on its records
    value = klj_reg.penalty(flow.model, x, alpha=1.0)
    assert torch.isfinite(value) and value > 0
    value.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.parameters())
