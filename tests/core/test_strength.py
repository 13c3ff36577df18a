"""One convention: ``loss = nll_per_sample + penalty(model, x, alpha)`` gives ``alpha`` the
same relative strength whatever the flow's dimension and wherever the flow sits.

Relative strength = ||grad of the penalty|| / ||grad of the NLL|| over the model's
parameters, both per sample, on the README's four quick-start flows (same layers, same
loss) at D = 2, 30 and 3,072, away from the identity (parameters perturbed: at the identity
the penalty has no gradient). Under the previous default (penalty divided by D next to a
per-sample NLL, as three of the README's quick starts wrote) it fell by D: the test checks
that it no longer does, and that dividing by D still would.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import klj_reg

FRAMEWORKS = ("freia", "nflows", "normflows", "zuko")
DIMS = (2, 30, 3072)
CONTEXT = 3


def build(framework: str, dim: int) -> nn.Module:
    """The README's quick-start flow for ``framework`` on ``dim`` features."""
    if framework == "freia":
        ff = pytest.importorskip("FrEIA.framework")
        fm = pytest.importorskip("FrEIA.modules")

        def subnet(c_in: int, c_out: int) -> nn.Module:
            return nn.Sequential(nn.Linear(c_in, 64), nn.ReLU(), nn.Linear(64, c_out))

        inn = ff.SequenceINN(dim)
        for _ in range(4):
            inn.append(fm.AllInOneBlock, subnet_constructor=subnet)
        return inn
    if framework == "nflows":
        pytest.importorskip("nflows")
        from nflows import distributions, flows, transforms

        layers: list[Any] = []
        for _ in range(4):
            layers += [
                transforms.MaskedAffineAutoregressiveTransform(features=dim, hidden_features=32),
                transforms.ReversePermutation(features=dim),
            ]
        return flows.Flow(
            transforms.CompositeTransform(layers), distributions.StandardNormal([dim])
        )
    if framework == "normflows":
        nf = pytest.importorskip("normflows")
        steps: list[Any] = []
        for _ in range(4):
            param_map = nf.nets.MLP([dim // 2, 32, 2 * (dim - dim // 2)], init_zeros=True)
            steps += [nf.flows.AffineCouplingBlock(param_map), nf.flows.Permute(dim, mode="swap")]
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(dim), steps)
    zuko = pytest.importorskip("zuko")
    return zuko.flows.NSF(features=dim, context=CONTEXT, transforms=3)


def nll(framework: str, model: Any, x: Tensor, c: Tensor) -> Tensor:
    """The README's per-sample NLL for ``framework``."""
    if framework == "freia":
        z, log_det = model(x)
        return (0.5 * z.square().sum(1) - log_det).mean()
    if framework == "nflows":
        return -model.log_prob(x).mean()
    if framework == "normflows":
        return model.forward_kld(x)
    return -model(c).log_prob(x).mean()


def perturb(model: nn.Module, std: float = 0.3) -> None:
    """Move every parameter away from its (often identity) initialisation by the same amount
    for any width: a weight matrix by ``std / sqrt(fan_in)``, so that each subnet output
    (each log-scale) moves by about ``std`` whatever D is; other parameters by ``std``."""
    with torch.no_grad():
        for p in model.parameters():
            scale = std / math.sqrt(p[0].numel()) if p.dim() >= 2 else std
            p.add_(scale * torch.randn_like(p))


def grad_norm(value: Tensor, params: list[nn.Parameter]) -> float:
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return math.sqrt(sum(float(g.square().sum()) for g in grads if g is not None))


def relative_strength(framework: str, dim: int, **kwargs: Any) -> float:
    torch.manual_seed(0)
    model = build(framework, dim)
    perturb(model)
    klj_reg.attach(model)
    try:
        x, c = torch.randn(64, dim), torch.randn(64, CONTEXT)
        params = [p for p in model.parameters() if p.requires_grad]
        data = grad_norm(nll(framework, model, x, c), params)
        return grad_norm(klj_reg.penalty(model, x, alpha=1.0, **kwargs), params) / data
    finally:
        klj_reg.detach(model)


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_alpha_has_the_same_relative_strength_for_any_dimension(framework: str) -> None:
    strength = {d: relative_strength(framework, d) for d in DIMS}
    spread = max(strength.values()) / min(strength.values())
    # within an order of magnitude (architecture effects) while D ranges over 1,536x
    assert spread < 10, strength
    # the former default (divided by D, next to a per-sample NLL) spreads with D
    per_dim = {d: relative_strength(framework, d, normaliser="dim") for d in (2, 3072)}
    assert per_dim[2] / per_dim[3072] > 100, per_dim


class FlowPrior(nn.Module):
    """A model around a 4-D flow: ``forward(image)`` encodes to 4 features and returns the
    flow's ``(z, log_det)`` on them, as a VAE with a flow prior does."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.encoder = nn.Linear(3 * 8 * 8, 4)
        self.flow = flow

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(self.encoder(image.flatten(1)))


class Conditional(nn.Module):
    """``forward(cond, x)``: the condition comes first, as in many wrappers."""

    def __init__(self, flow: nn.Module) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, cond: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.flow(x + 0 * cond.sum(1, keepdim=True))


def freia_flow(dim: int) -> nn.Module:
    flow = build("freia", dim)
    perturb(flow)
    return flow


def test_a_flow_inside_a_bigger_module_is_normalised_by_its_own_dimension() -> None:
    torch.manual_seed(1)
    model = FlowPrior(freia_flow(4))
    klj_reg.attach(model)
    try:
        image = torch.randn(16, 3, 8, 8)
        model(image)
        total = klj_reg.penalty(model, image, alpha=1.0)
        model(image)
        per_dim = klj_reg.penalty(model, image, alpha=1.0, normaliser="dim")
        torch.testing.assert_close(per_dim, total / 4)  # the flow's D, not the image's 192
        # the same penalty as the flow attached on its own, on the latent it received
        latent = model.encoder(image.flatten(1))
        flow = FlowPrior(freia_flow(4)).flow  # a fresh flow with the same parameters
        flow.load_state_dict(model.flow.state_dict())
        klj_reg.attach(flow)
        flow(latent)
        torch.testing.assert_close(klj_reg.penalty(flow, latent, alpha=1.0), total)
        klj_reg.detach(flow)
    finally:
        klj_reg.detach(model)


def test_a_condition_before_x_neither_sets_d_nor_breaks_the_lookup() -> None:
    torch.manual_seed(2)
    model = Conditional(freia_flow(6))
    klj_reg.attach(model)
    try:
        cond, x = torch.randn(16, 2), torch.randn(16, 6)
        model(cond, x)
        total = klj_reg.penalty(model, x, alpha=1.0)  # x is not the call's first input
        model(cond, x)
        per_dim = klj_reg.penalty(model, x, alpha=1.0, normaliser="dim")
        torch.testing.assert_close(per_dim, total / 6)  # not / 2, the condition's width
    finally:
        klj_reg.detach(model)
