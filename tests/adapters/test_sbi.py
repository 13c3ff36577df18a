"""sbi's estimators (NFlowsFlow, ZukoFlow: an nflows or zuko flow as ``.net``, no
``forward``) are recognised: a pass begins at their ``loss`` / ``log_prob``, and a penalty
with no captured pass runs one through the inner flow (first use works)."""

from __future__ import annotations

import warnings

import pytest
import torch

import klj_reg

pytest.importorskip("sbi", reason="sbi is not installed (pip install 'klj-reg[stack]')")
from sbi.neural_nets import posterior_nn  # noqa: E402

MODELS = ["maf", "nsf", "zuko_maf", "zuko_nsf"]


def estimator(model: str) -> torch.nn.Module:
    torch.manual_seed(0)
    theta = torch.rand(64, 2) * 4 - 2
    x = theta + 0.1 * torch.randn_like(theta)
    return posterior_nn(model=model, hidden_features=8, num_transforms=2)(theta, x)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    theta = torch.randn(16, 2)
    return theta, theta + 0.1 * torch.randn_like(theta)


def inner_penalty(est: torch.nn.Module, theta: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The same penalty from the inner nflows or zuko flow, attached on its own."""
    net = est.net
    with klj_reg.capturing(net):
        if type(est).__name__ == "NFlowsFlow":
            net.log_prob(theta, context=x)
        else:
            net(est.embedding_net(x)).log_prob(theta)
        return klj_reg.penalty(net, theta, alpha=1.0)


@pytest.mark.parametrize("model", MODELS)
def test_first_use_runs_a_pass_through_the_inner_flow(model: str) -> None:
    est = estimator(model)
    theta, x = batch()
    value = klj_reg.penalty(est, theta, alpha=1.0, context=x)  # no forward: no error
    klj_reg.detach(est)
    torch.testing.assert_close(value, inner_penalty(est, theta, x))
    value.backward()


@pytest.mark.parametrize("model", MODELS)
def test_the_penalty_reads_the_pass_of_loss_and_log_prob(model: str) -> None:
    est = estimator(model)
    theta, x = batch()
    expected = inner_penalty(est, theta, x)
    klj_reg.attach(est)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an own pass would warn
        est.loss(theta, x)
        torch.testing.assert_close(klj_reg.penalty(est, theta, alpha=1.0), expected)
        theta2, x2 = batch()
        est.log_prob(theta, x)  # gradient accumulation: each penalty after its own pass
        torch.testing.assert_close(klj_reg.penalty(est, theta, alpha=1.0), expected)
        est.log_prob(theta2, x2)
        torch.testing.assert_close(
            klj_reg.penalty(est, theta2, alpha=1.0), inner_penalty(est, theta2, x2)
        )
    klj_reg.detach(est)


def test_sampling_records_nothing_and_no_context_is_named() -> None:
    est = estimator("maf")
    theta, x = batch()
    klj_reg.attach(est)
    est.sample((8,), condition=x[:1])
    # nothing captured, and no condition to run a pass
    with (
        pytest.warns(UserWarning, match="ran its own"),
        pytest.raises(klj_reg.CaptureError, match="context="),
    ):
        klj_reg.penalty(est, theta, alpha=1e-2)
    klj_reg.detach(est)


def test_an_unconditional_zuko_estimator() -> None:
    import zuko
    from sbi.neural_nets.estimators import ZukoUnconditionalFlow

    flow = zuko.flows.MAF(features=2, transforms=2)
    est = ZukoUnconditionalFlow(flow, input_shape=torch.Size([2]))
    theta = torch.randn(16, 2)
    first = klj_reg.penalty(est, theta, alpha=1.0)  # first use: a pass of its own
    est.loss(theta)
    again = klj_reg.penalty(est, theta, alpha=1.0)  # the pass of loss
    klj_reg.detach(est)
    with klj_reg.capturing(flow):
        flow().log_prob(theta)
        expected = klj_reg.penalty(flow, theta, alpha=1.0)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(again, expected)
