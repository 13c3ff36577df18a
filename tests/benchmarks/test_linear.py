"""Linear flows: the closed forms of Theorems 1 and 3 (and L2) against numerical optimisation,
Theorem 3 reached by gradient descent through ``klj_reg.penalty``, and the fallback estimators
against the closed-form KL of a linear map."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import klj_reg
from klj_reg import linear

F64 = torch.float64


def data(n: int, d: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=F64)
    return torch.randn(n, d, generator=g, dtype=F64) @ mix + torch.randn(d, generator=g, dtype=F64)


def spd(d: int, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def lbfgs(loss: Callable[[], Tensor], params: list[Tensor], rounds: int = 5) -> float:
    opt = torch.optim.LBFGS(
        params, lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
        history_size=50, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    for _ in range(rounds):
        opt.step(closure)
    return float(loss().detach())


def start(d: int) -> tuple[Tensor, Tensor]:
    return torch.eye(d, dtype=F64).requires_grad_(True), torch.zeros(d, dtype=F64).requires_grad_(
        True
    )


def assert_solution(u: Tensor, b: Tensor, x: Tensor, covariance: Tensor) -> None:
    u, b = u.detach(), b.detach()
    torch.testing.assert_close(torch.linalg.inv(u @ u.T), covariance, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, -u.T @ x.mean(0), rtol=1e-6, atol=1e-7)


def test_sample_covariance_is_biased_and_mle_raises_when_singular() -> None:
    x = data(7, 3)
    centred = x - x.mean(0)
    torch.testing.assert_close(linear.sample_covariance(x), centred.T @ centred / 7)
    torch.testing.assert_close(linear.sample_covariance(x) * 7 / 6, torch.cov(x.T))
    with pytest.raises(ValueError, match="rank 2 < d = 3"):
        linear.mle_covariance(data(3, 3))


def test_theorem1_mle_matches_lbfgs() -> None:
    x = data(40, 3)
    u, b = start(3)
    lbfgs(lambda: linear.objective(u, b, x), [u, b])
    assert_solution(u, b, x, linear.sample_covariance(x))
    torch.testing.assert_close(linear.mle_precision(x), (u @ u.T).detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("n", "d"), [(30, 3), (3, 5)])  # also N < d: T singular
@pytest.mark.parametrize("reg", ["kl", "kl-G", "l2"])
def test_regularised_closed_forms_match_lbfgs(n: int, d: int, reg: str) -> None:
    x, alpha = data(n, d), 2.5
    prior = spd(d) if reg == "kl-G" else None
    u, b = start(d)
    lbfgs(lambda: linear.objective(u, b, x, alpha, reg[:2], prior), [u, b])
    closed = (
        linear.l2_covariance(x, alpha) if reg == "l2" else linear.klj_covariance(x, alpha, prior)
    )
    assert_solution(u, b, x, closed)
    if reg == "l2":
        expected = torch.linalg.inv(
            linear.sample_covariance(x) + alpha / n * torch.eye(d, dtype=F64)
        )
        torch.testing.assert_close(linear.l2_precision(x, alpha), expected)
    else:
        torch.testing.assert_close(linear.klj_precision(x, alpha, prior), torch.linalg.inv(closed))


def test_closed_form_is_a_stationary_point_of_the_stated_objective() -> None:
    x, alpha, prior = data(9, 4, seed=3), 0.7, spd(4, seed=5)
    for reg, cov in (
        ("kl", linear.klj_covariance(x, alpha, prior)),
        ("l2", linear.l2_covariance(x, alpha)),
    ):
        u, b = linear.linear_flow(torch.linalg.inv(cov), x.mean(0))
        u.requires_grad_(True)
        b.requires_grad_(True)
        linear.objective(u, b, x, alpha, reg, prior).backward()
        assert u.grad is not None and b.grad is not None
        assert u.grad.abs().max() < 1e-9 and b.grad.abs().max() < 1e-9


def linear_flow_fn(u: Tensor, b: Tensor) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def fn(x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ u + b, torch.linalg.slogdet(u)[1].expand(x.shape[0])

    return fn


def mean_nll(fn: Callable[[Tensor], tuple[Tensor, Tensor]], x: Tensor) -> Tensor:
    z, log_det = fn(x)
    return (0.5 * z.square().sum(1) - log_det).mean() + 0.5 * x.shape[1] * math.log(2 * math.pi)


@pytest.mark.parametrize("normaliser", ["none", "dim"])
def test_penalty_weight_maps_to_theorem3_alpha(normaliser: str) -> None:
    """N * (mean NLL + penalty) and L + alpha/2 KL(M, I) differ by a constant in U, b."""
    x, a = data(6, 3), 0.3
    alpha = linear.theorem3_alpha(a, 6, None if normaliser == "none" else 3)
    gaps = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        u = torch.randn(3, 3, generator=g, dtype=F64) + 2 * torch.eye(3, dtype=F64)
        b = torch.randn(3, generator=g, dtype=F64)
        fn = linear_flow_fn(u, b)
        ours = 6 * (
            mean_nll(fn, x)
            + klj_reg.penalty(fn, x, estimator="exact", alpha=a, normaliser=normaliser)
        )
        gaps.append(float(ours - linear.objective(u, b, x, alpha, "kl")))
    assert max(gaps) - min(gaps) < 1e-9


@settings(max_examples=8, deadline=None)
@given(
    n=st.integers(2, 10),
    d=st.integers(2, 5),
    a=st.floats(0.02, 2.0),
)
def test_theorem3_by_gradient_descent_through_klj_reg(n: int, d: int, a: float) -> None:
    x = data(n, d, seed=n * 10 + d)
    u, b = start(d)
    fn = linear_flow_fn(u, b)

    def loss() -> Tensor:
        return mean_nll(fn, x) + klj_reg.penalty(
            fn, x, estimator="exact", alpha=a, normaliser="none"
        )

    lbfgs(loss, [u, b], rounds=3)
    alpha = linear.theorem3_alpha(a, n)
    assert_solution(
        u, b, x, (n * linear.sample_covariance(x) + alpha * torch.eye(d, dtype=F64)) / (n + alpha)
    )


@pytest.mark.parametrize(("n", "d"), [(3, 4), (4, 4)])
def test_mle_diverges_when_n_le_d(n: int, d: int) -> None:
    """N <= d: the centred data span < d dimensions, so stretching U along a direction v
    orthogonal to them leaves every z_i unchanged and raises log|det U| without bound."""
    x = data(n, d)
    with pytest.raises(ValueError, match="no maximiser"):
        linear.mle_covariance(x)
    v = torch.linalg.svd(x - x.mean(0))[2][-1]  # right singular vector of a zero singular value
    values = []
    for s in (0.0, 10.0, 20.0):
        u = torch.eye(d, dtype=F64) + (math.exp(s) - 1) * torch.outer(v, v)
        values.append(float(linear.objective(u, -u.T @ x.mean(0), x)))
    torch.testing.assert_close(values[1] - values[0], -n * 10.0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(values[2] - values[0], -n * 20.0, rtol=1e-6, atol=1e-6)

    # Gradient descent on mean NLL alone: log|det U| keeps growing, the loss keeps falling;
    # the same run with the penalty converges to Theorem 3.
    def train(a: float, steps: int) -> list[tuple[float, float]]:
        u, b = start(d)
        fn = linear_flow_fn(u, b)
        opt = torch.optim.Adam([u, b], lr=0.05)
        trace = []
        for step in range(1, steps + 1):
            loss = mean_nll(fn, x)
            if a:
                loss = loss + klj_reg.penalty(fn, x, estimator="exact", alpha=a, normaliser="none")
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 500 == 0:
                trace.append((float(loss.detach()), float(torch.linalg.slogdet(u.detach())[1])))
        return trace

    plain = train(0.0, 2000)
    losses, log_dets = zip(*plain, strict=True)
    assert all(b > a + 0.1 for a, b in zip(log_dets, log_dets[1:], strict=False))
    assert all(b < a - 0.1 for a, b in zip(losses, losses[1:], strict=False))
    regularised = train(0.1, 2000)
    assert abs(regularised[-1][1] - regularised[-2][1]) < 1e-4
    alpha = linear.theorem3_alpha(0.1, n)
    expected = -0.5 * float(torch.linalg.slogdet(linear.klj_covariance(x, alpha))[1])
    assert abs(regularised[-1][1] - expected) < 1e-3


def test_exact_and_hutchinson_estimators_against_closed_form_kl() -> None:
    d, batch = 4, 4000
    g = torch.Generator().manual_seed(4)
    u = torch.randn(d, d, generator=g, dtype=F64) + 1.5 * torch.eye(d, dtype=F64)
    b = torch.randn(d, generator=g, dtype=F64)
    x = torch.randn(batch, d, generator=g, dtype=F64)
    fn = linear_flow_fn(u, b)
    m = u @ u.T
    truth = float(torch.trace(m) - torch.linalg.slogdet(m)[1]) - d  # KL(M, I) - d = KLJ

    exact = klj_reg.penalty(
        fn, x[:5], estimator="exact", normaliser="none", reduction="none", alpha=1.0
    )
    torch.testing.assert_close(exact, torch.full((5,), truth, dtype=F64))
    scaled = klj_reg.penalty(fn, x[:5], estimator="exact", alpha=0.1)  # default: per sample
    torch.testing.assert_close(float(scaled), 0.1 * truth)
    per_dim = klj_reg.penalty(fn, x[:5], estimator="exact", alpha=0.1, normaliser="dim")
    torch.testing.assert_close(float(per_dim), 0.1 * truth / d)

    torch.manual_seed(0)
    probes = klj_reg.penalty(
        fn, x, estimator="hutchinson", normaliser="none", reduction="none", alpha=1.0
    )
    mean, se = float(probes.mean()), float(probes.std()) / math.sqrt(batch)
    assert se > 1e-3, "a non-diagonal U must give Hutchinson variance"
    assert abs(mean - truth) < 4 * se
    many = klj_reg.penalty(
        fn,
        x[:500],
        estimator="hutchinson",
        n_samples=16,
        normaliser="none",
        reduction="none",
        alpha=1.0,
    )
    assert float(many.std()) < float(probes.std()) / 2  # variance ~ 1 / n_samples
