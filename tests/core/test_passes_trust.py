"""The penalty's own pass is the user's computation or it refuses, a capture that trains
nothing warns, and torch.func transforms (issue 27)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture
from tests import truth

D = 3


def _sbi(builder: str) -> tuple[nn.Module, Tensor, Tensor]:
    builders = pytest.importorskip("sbi.neural_nets.net_builders")
    torch.manual_seed(0)
    theta = torch.randn(200, D) * 2 + 1
    x = theta + 0.1 * torch.randn(200, D)
    return getattr(builders, builder)(batch_x=theta, batch_y=x), theta, x


# 5. The penalty's own pass ------------------------------------------------------------------


def test_an_own_pass_that_could_skip_the_users_preprocessing_refuses() -> None:
    """sbi's zuko estimator embeds (z-scores) the condition outside its zuko Flow: with the
    Flow attached, the penalty's own pass with ``context=x`` conditioned on the raw x, not
    the user's computation (11.03 against 10.92 in the issue). Once the user's passes are
    captured, a penalty that would run its own pass with a context raises instead."""
    est, theta, x = _sbi("build_zuko_maf")
    flow = est.net
    truth.attach(flow)
    t, c = theta[:32], x[:32]
    est.loss(t, c)
    users = klj_reg.penalty(flow, t, alpha=1.0)
    with pytest.raises(klj_reg.CaptureError, match="refuses"):
        klj_reg.penalty(flow, t, context=c, alpha=1.0)
    est.loss(t, c)
    torch.testing.assert_close(klj_reg.penalty(flow, t, alpha=1.0), users)


def test_an_own_pass_on_first_use_is_the_models_computation() -> None:
    """Before any pass of the user's is captured, the penalty's own pass (the estimator's
    runner, with its embedding of the condition) gives the value of the user's pass."""
    est, theta, x = _sbi("build_zuko_maf")
    t, c = theta[:32], x[:32]
    own = klj_reg.penalty(est, t, context=c, alpha=1.0)  # first use: attaches, own pass
    truth.detach_later(est)
    est.loss(t, c)
    torch.testing.assert_close(klj_reg.penalty(est, t, alpha=1.0), own)


# 6. Nothing trainable -----------------------------------------------------------------------


def test_a_capture_that_trains_nothing_warns() -> None:
    """sbi's ``made`` estimator: the only captured layer is its z-scoring (no parameters)."""
    est, theta, x = _sbi("build_made")
    truth.attach(est)
    est.loss(theta[:16], x[:16])
    with pytest.warns(UserWarning, match="nothing klj-reg captured in NFlowsFlow trains"):
        value = klj_reg.penalty(est, theta[:16], alpha=1.0)
    assert not value.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        est.loss(theta[:16], x[:16])
        klj_reg.penalty(est, theta[:16], alpha=1.0)


def test_a_standardising_layer_among_trained_ones_does_not_warn() -> None:
    """sbi's flows with their z-scoring: documented, not warned (every sbi user has one)."""
    est, theta, x = _sbi("build_zuko_maf")
    truth.attach(est)
    est.loss(theta[:16], x[:16])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = klj_reg.penalty(est, theta[:16], alpha=1.0)
    assert value.requires_grad
    capture = get_capture(est)
    assert capture is not None


# 8. torch.func ------------------------------------------------------------------------------


class _LogProb(nn.Module):
    """``flow().log_prob(x)`` as one call, for ``functional_call``."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor) -> Tensor:
        return self.flow().log_prob(x)


def _zuko() -> tuple[nn.Module, nn.Module]:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(features=D, transforms=2, hidden_features=(8,))
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.3 * torch.randn_like(p))
    truth.attach(flow)
    return flow, _LogProb(flow)


def test_torch_func_grad_of_a_loss_with_the_penalty() -> None:
    flow, lp = _zuko()
    params = {k: v.detach() for k, v in lp.named_parameters()}
    x = torch.randn(16, D)

    def loss(p: dict[str, Tensor], x: Tensor) -> Tensor:
        nll = -torch.func.functional_call(lp, p, (x,)).mean()
        return nll + klj_reg.penalty(flow, x, alpha=1.0)

    grads = torch.func.grad(loss)(params, x)
    lp.zero_grad()
    (-flow().log_prob(x).mean() + klj_reg.penalty(flow, x, alpha=1.0)).backward()
    for name, p in lp.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_torch_func_vmap_over_batches() -> None:
    flow, lp = _zuko()
    params = {k: v.detach() for k, v in lp.named_parameters()}
    xs = torch.randn(4, 16, D)

    def penalised(x: Tensor) -> Tensor:
        torch.func.functional_call(lp, params, (x,))
        return klj_reg.penalty(flow, x, alpha=1.0)

    values = torch.func.vmap(penalised)(xs)
    for x, value in zip(xs, values, strict=True):
        flow().log_prob(x)
        torch.testing.assert_close(value, klj_reg.penalty(flow, x, alpha=1.0).detach())


def test_torch_func_jvp_is_refused_by_name() -> None:
    flow, _ = _zuko()
    x = torch.randn(16, D)

    def penalised(x: Tensor) -> Tensor:
        flow().log_prob(x)
        return klj_reg.penalty(flow, x, alpha=1.0)

    with pytest.raises(klj_reg.CaptureError, match=r"torch\.func\.jvp"):
        torch.func.jvp(penalised, (x,), (torch.ones_like(x),))
