"""``python -m benchmarks mapping``: the gradient comparison of the released-code and jacobian
KLJ terms, checked on one FrEIA AllInOneBlock whose subnet output is a constant (a 1x1 conv
with zero weight: ``a = bias``), where both terms and every parameter gradient have a closed
form; against ``klj_reg.penalty`` with explicit normalisers; and the quick command end to
end."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from benchmarks.cifar import mapping

FrEIA = pytest.importorskip("FrEIA")

CLAMP = 0.7
C, H, W = 4, 4, 4
D, PIXELS = C * H * W, H * W
F64 = torch.float64


def one_block(bias: list[float], log_g: list[float]) -> nn.Module:
    """A SequenceINN of one AllInOneBlock (clamp 0.7, EXP global scale, soft permutation)
    whose subnet is a 1x1 conv with zero weight and bias ``bias``, global scale ``exp(log_g)``."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(C, H, W)
    inn.append(
        Fm.AllInOneBlock,
        subnet_constructor=lambda c_in, c_out: nn.Conv2d(c_in, c_out, 1),
        affine_clamping=CLAMP,
        global_affine_type="EXP",
        global_affine_init=0.75,
        permute_soft=True,
    )
    inn = inn.to(F64)
    block = inn.module_list[0]
    conv = block.subnet
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.copy_(torch.tensor(bias, dtype=F64))
        block.global_scale.copy_(torch.tensor(log_g, dtype=F64).reshape(1, C, 1, 1))
    return inn


def closed_form(inn: nn.Module, x: Tensor) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
    """Both terms and their gradients by hand, for ``a = bias`` (the same at every pixel).

    Per scaled channel k (``s_k = c tanh(0.1 b_k)``, P pixels): jacobian ``P (e^{2 s} - 1 - 2 s)``,
    released-code ``P b^2 - 2 P s``; per channel of the global scale ``log g = p``: jacobian
    ``P (e^{2p} - 1 - 2p)``, released-code ``-2 P p``; plus the pass-through ones."""
    block = inn.module_list[0]
    ch1, ch2 = block.splits
    conv = block.subnet
    b = conv.bias.detach()[:ch2]
    p = block.global_scale.detach().reshape(-1)
    t = torch.tanh(0.1 * b)
    s = CLAMP * t
    ds_db = CLAMP * 0.1 * (1 - t**2)
    values = {
        "jacobian": float(
            PIXELS * (torch.expm1(2 * s) - 2 * s).sum()
            + PIXELS * (torch.expm1(2 * p) - 2 * p).sum()
        ),
        "released-code": float(
            PIXELS * b.square().sum() + (D - PIXELS * ch2) - 2 * PIXELS * (s.sum() + p.sum())
        ),
    }
    # d term / d a_k at every pixel, then a = W x1 + b: dW_kj = g_k * mean_b sum_pixels x1_j
    per_a = {"jacobian": (2 * torch.exp(2 * s) - 2) * ds_db, "released-code": 2 * b - 2 * ds_db}
    x1_sum = x[:, :ch1].sum(dim=(2, 3)).mean(0)  # (ch1,)
    grads: dict[str, dict[str, Tensor]] = {}
    for form, g_a in per_a.items():
        g_bias = torch.zeros(2 * ch2, dtype=F64)
        g_bias[:ch2] = PIXELS * g_a
        g_weight = torch.zeros(2 * ch2, ch1, 1, 1, dtype=F64)
        g_weight[:ch2, :, 0, 0] = g_a[:, None] * x1_sum[None, :]
        g_global = (
            PIXELS * (2 * torch.exp(2 * p) - 2) if form == "jacobian" else -2 * PIXELS + 0 * p
        )
        grads[form] = {
            "subnet.weight": g_weight,
            "subnet.bias": g_bias,
            "global_scale": g_global.reshape(1, C, 1, 1),
        }
    return values, grads


def measured(inn: nn.Module, x: Tensor) -> tuple[dict[str, float], dict[str, list[Tensor]], list]:
    named = mapping.parameter_groups(inn)
    capture = klj_reg.attach(inn)
    try:
        inn(x)
        records = capture.take()
    finally:
        klj_reg.detach(inn)
    values, grads = mapping.term_gradients(records, [p for _, _, p in named])
    return values, grads, named


# Saturating and unsaturated scales, global scales below and above one.
CASES = [
    ([12.0, -25.0, 0.3, -0.7], [math.log(0.75), 0.2, -0.4, 0.0]),
    ([0.5, 3.0, 1.0, 2.0], [0.1, math.log(0.75), 0.3, -0.1]),
]


@pytest.mark.parametrize(("bias", "log_g"), CASES)
def test_terms_and_gradients_match_the_closed_form(bias: list[float], log_g: list[float]) -> None:
    inn = one_block(bias, log_g)
    x = torch.randn(5, C, H, W, dtype=F64)
    values, grads, named = measured(inn, x)
    want_values, want = closed_form(inn, x)
    for form in mapping.TERMS:
        assert values[form] == pytest.approx(want_values[form], rel=1e-10)
        checked = 0
        for (name, _, p), g in zip(named, grads[form], strict=True):
            key = name.removeprefix("module_list.0.")
            expected = want[form].get(key, torch.zeros_like(p))  # global_offset: no gradient
            torch.testing.assert_close(g, expected.reshape(p.shape), rtol=1e-9, atol=1e-9)
            checked += key in want[form]
        assert checked == 3
    # the ratio of the norms, and the groups, from the closed form
    groups = [g for _, g, _ in named]
    assert set(groups) == {"AllInOneBlock", "global scale"}
    cmp = mapping.compare(grads, groups, D, 1)
    norm = {f: math.sqrt(sum(float(t.square().sum()) for t in want[f].values())) for f in want}
    r_form = norm["released-code"] / norm["jacobian"]
    assert cmp["r_form"] == pytest.approx(r_form, rel=1e-10)
    assert cmp["r"] == pytest.approx(D * r_form, rel=1e-10)
    flat = {f: torch.cat([t.reshape(-1) for t in want[f].values()]) for f in want}
    cosine = float(flat["jacobian"] @ flat["released-code"]) / (
        norm["jacobian"] * norm["released-code"]
    )
    assert cmp["cosine"] == pytest.approx(cosine, rel=1e-9)
    g_r = 2 * PIXELS * math.sqrt(C)
    g_j = float((PIXELS * (2 * torch.exp(2 * torch.tensor(log_g, dtype=F64)) - 2)).norm())
    assert cmp["groups"]["global scale"]["r"] == pytest.approx(D * g_r / g_j, rel=1e-10)


def test_released_code_minimum_is_near_a_007() -> None:
    """The released-code term of a scaled entry, ``a^2 - 2 * 0.7 tanh(0.1 a)``, has zero
    gradient at a = 0.07 (the protocol's value), -0.14 per pixel at a = 0; the jacobian
    term's gradient is zero at a = 0 and positive above."""
    a_min = 0.0699  # root of 2a = 0.14 (1 - tanh(0.1 a)^2)
    inn = one_block([a_min, 0.0, 0.0, 0.0], [0.0] * C)
    _, grads, named = measured(inn, torch.randn(3, C, H, W, dtype=F64))
    where = [n for n, _, _ in named].index("module_list.0.subnet.bias")
    rc, jac = grads["released-code"][where], grads["jacobian"][where]
    assert abs(float(rc[0])) < 1e-3 * PIXELS
    assert float(rc[1]) == pytest.approx(-2 * PIXELS * CLAMP * 0.1, rel=1e-12)
    assert float(jac[1]) == 0 and float(jac[0]) > 0


def test_r_is_the_ratio_of_the_penalties_gradients() -> None:
    """r as the library's penalty states it: ``penalty(form="released-code", normaliser =
    n_layers / D)`` (the authors' weighting in per-sample units) against ``penalty(form=
    "jacobian", normaliser="none")``, on a two-block flow with real subnets."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(C, H, W)
    for _ in range(2):
        inn.append(
            Fm.AllInOneBlock,
            subnet_constructor=lambda c_in, c_out: nn.Sequential(
                nn.Conv2d(c_in, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, c_out, 1)
            ),
            affine_clamping=CLAMP,
            global_affine_type="EXP",
            global_affine_init=0.75,
            permute_soft=True,
        )
    inn = inn.to(F64)
    x = torch.randn(6, C, H, W, dtype=F64)
    named = mapping.parameter_groups(inn)
    params = [p for _, _, p in named]
    _, grads, _ = measured(inn, x)
    cmp = mapping.compare(grads, [g for _, g, _ in named], D, 2)
    norms = {}
    for form, normaliser in (("jacobian", "none"), ("released-code", 2 / D)):
        klj_reg.attach(inn)
        inn(x)
        pen = klj_reg.penalty(inn, x, alpha=1.0, form=form, normaliser=normaliser)
        klj_reg.detach(inn)
        found = torch.autograd.grad(pen, params, allow_unused=True)  # the last offset: unused
        norms[form] = math.sqrt(sum(float(g.square().sum()) for g in found if g is not None))
    assert cmp["r"] == pytest.approx(norms["released-code"] / norms["jacobian"], rel=1e-9)
    assert cmp["r_form"] == pytest.approx(cmp["r"] * 2 / D, rel=1e-12)


def test_quick_command(tmp_path: pathlib.Path) -> None:
    assert mapping.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "mapping.json").read_text())
    assert result["commit"] and result["machine"] and result["versions"]
    (model,) = result["models"]
    rows = model["measurements"]
    assert [row["step"] for row in rows] == [0, 1, 2, 3]
    for row in rows:
        assert math.isfinite(row["r"]) and row["r"] > 0
        assert row["r"] == pytest.approx(row["r_form"] * row["dim"] / row["n_layers"])
        assert -1 <= row["cosine"] <= 1
        assert row["grad_norm_jacobian"] > 0 and row["grad_norm_released_code"] > 0
    summary = model["summary"]
    r = [row["r"] for row in rows]
    assert summary["r_init"] == r[0] and summary["r"]["min"] == min(r)
    assert summary["equivalent_alpha"]["0.01"]["median"] == pytest.approx(
        0.01 * summary["r"]["median"]
    )
    assert "| tiny@8" in (tmp_path / "mapping.md").read_text()


def test_without_data_it_skips(tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert mapping.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "out")]) == 0
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()
