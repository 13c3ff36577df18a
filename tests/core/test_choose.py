"""Choosing alpha on validation data: the rule, the sweep, and a real sweep on a flow."""

from __future__ import annotations

import math

import pytest
import torch

import klj_reg


def test_pick_alpha_takes_the_lowest_score_ties_to_the_smaller_alpha() -> None:
    assert klj_reg.pick_alpha({0.0: 1.2, 0.01: 1.0, 0.1: 1.0, 1.0: 1.1}) == 0.01
    assert klj_reg.pick_alpha({1.0: 0.5, 0.1: 0.5}) == 0.1


def test_pick_alpha_counts_non_finite_scores_as_failures() -> None:
    assert klj_reg.pick_alpha({0.0: math.nan, 0.1: math.inf, 1.0: 3.0}) == 1.0
    with pytest.raises(ValueError, match="non-finite"):
        klj_reg.pick_alpha({0.0: math.nan, 1.0: math.inf})
    with pytest.raises(ValueError, match="at least one"):
        klj_reg.pick_alpha({})


def test_choose_alpha_runs_every_candidate_once_and_scores_failures_as_inf() -> None:
    seen: list[float] = []

    def score(alpha: float) -> float:
        seen.append(alpha)
        if alpha == 10.0:
            raise FloatingPointError("diverged")
        return (math.log10(alpha + 1e-4) + 2) ** 2  # lowest at 0.01

    choice = klj_reg.choose_alpha(score, alphas=(1.0, 0.01, 10.0, 0.01, 0.0))
    assert seen == [0.0, 0.01, 1.0, 10.0]
    assert choice.alpha == 0.01
    assert choice.scores[10.0] == math.inf
    assert set(choice.scores) == {0.0, 0.01, 1.0, 10.0}
    assert klj_reg.choose_alpha(score).scores.keys() == set(klj_reg.ALPHAS)


@pytest.mark.parametrize("alphas", [(), (-1.0,), (math.nan,)])
def test_choose_alpha_refuses_bad_candidates(alphas: tuple[float, ...]) -> None:
    with pytest.raises(ValueError):
        klj_reg.choose_alpha(lambda a: 0.0, alphas=alphas)


def test_choose_alpha_on_a_flow_that_overfits_a_tiny_set() -> None:
    """A real sweep: a zuko flow on 24 points, scored on held-out points from the same
    distribution. The scores are the validation NLLs the runs really reach, the choice is
    their minimum, and a strong penalty keeps the flow closer to the identity (lower KLJ)."""
    zuko = pytest.importorskip("zuko")
    g = torch.Generator().manual_seed(0)
    data = torch.randn(124, 2, generator=g) * torch.tensor([1.5, 0.5])
    train, val = data[:24], data[24:]
    kljs: dict[float, float] = {}

    def score(alpha: float) -> float:
        torch.manual_seed(0)
        flow = zuko.flows.NSF(features=2, transforms=2, hidden_features=(32, 32))
        opt = torch.optim.Adam(flow.parameters(), lr=3e-3)
        for _ in range(150):
            loss = -flow().log_prob(train).mean() + klj_reg.penalty(flow, train, alpha=alpha)
            opt.zero_grad()
            loss.backward()
            opt.step()
        flow().log_prob(train)
        with torch.no_grad():
            kljs[alpha] = float(klj_reg.penalty(flow, train, alpha=1.0))
            value = float(-flow().log_prob(val).mean())
        klj_reg.detach(flow)
        return value

    choice = klj_reg.choose_alpha(score, alphas=(0.0, 0.1, 10.0))
    assert choice.alpha == min(choice.scores, key=lambda a: (choice.scores[a], a))
    assert all(math.isfinite(s) for s in choice.scores.values())
    assert kljs[10.0] < kljs[0.0]


def test_penalty_has_no_default_alpha_and_says_how_to_choose_it() -> None:
    """The pre-registered rule gave 'no single default serves' (benchmarks/results/tabular):
    leaving alpha out is an error that names the range and the helper."""
    flow = torch.nn.Linear(3, 3)

    def fn(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return flow(x), torch.linalg.slogdet(flow.weight)[1].expand(x.shape[0])

    with pytest.raises(TypeError, match="choose_alpha") as caught:
        klj_reg.penalty(fn, torch.randn(4, 3), estimator="exact")
    assert "0.1 to 10" in str(caught.value)
    assert klj_reg.penalty(fn, torch.randn(4, 3), estimator="exact", alpha=1.0).isfinite()
