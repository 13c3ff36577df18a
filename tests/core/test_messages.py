"""Errors for common mistakes name the fix: a zuko flow's distribution passed for the flow, a
conditional zuko flow run without its context, and alpha or tau given as a tensor."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import klj_reg


class Linear(nn.Module):
    """y = W x, an invertible linear flow."""

    def __init__(self, dim: int = 3) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim) + 0.1 * torch.randn(dim, dim))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.weight.T, torch.linalg.slogdet(self.weight)[1].expand(x.shape[0])


def linear_penalty(**kwargs: object) -> Tensor:
    """The exact-estimator penalty of the same linear flow on the same batch."""
    torch.manual_seed(0)
    model, x = Linear(), torch.randn(4, 3)
    kwargs = {"alpha": 1e-2, **kwargs}
    return klj_reg.penalty(model, x, estimator="exact", **kwargs)  # type: ignore[arg-type]


# --- alpha and tau as tensors -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
def test_a_0d_tensor_alpha_is_its_number(dtype: torch.dtype) -> None:
    assert torch.equal(
        linear_penalty(alpha=torch.tensor(2, dtype=dtype)), linear_penalty(alpha=2.0)
    )


def test_a_0d_tensor_tau_is_its_number() -> None:
    assert torch.equal(linear_penalty(tau=torch.tensor(0.5)), linear_penalty(tau=0.5))


def test_a_tensor_alpha_that_requires_grad_is_refused_with_the_way_to_learn_it() -> None:
    alpha = torch.tensor(0.1, requires_grad=True)
    with pytest.raises(ValueError, match="requires grad") as caught:
        linear_penalty(alpha=alpha)
    assert "alpha.item()" in str(caught.value)
    assert "alpha * klj_reg.penalty(model, x, alpha=1.0)" in str(caught.value)
    with pytest.raises(ValueError, match=r"tau.item\(\)"):
        linear_penalty(tau=torch.tensor(0.1, requires_grad=True))


@pytest.mark.parametrize(
    "alpha",
    [torch.tensor([0.1]), torch.tensor(True), torch.tensor(1 + 1j), torch.tensor(-0.1)],
    ids=["1-d", "bool", "complex", "negative"],
)
def test_other_tensors_are_refused(alpha: Tensor) -> None:
    with pytest.raises(ValueError, match="alpha"):
        linear_penalty(alpha=alpha)


# --- zuko ----------------------------------------------------------------------------------


def test_a_zuko_distribution_is_not_the_flow() -> None:
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.NSF(features=4, context=3, transforms=2)
    x, c = torch.randn(16, 4), torch.randn(16, 3)
    for estimator in ("capture", "exact"):
        with pytest.raises(klj_reg.UnsupportedModelError) as caught:
            klj_reg.penalty(flow(c), x, estimator=estimator, alpha=1e-2)
        message = str(caught.value)
        assert "NormalizingFlow" in message
        assert "pass the zuko.flows.Flow module itself" in message
        assert "klj_reg.penalty(flow, x)" in message
        assert "not klj_reg.penalty(flow(c), x)" in message


@pytest.mark.parametrize("name", ["MAF", "NSF", "RealNVP", "GF"])
def test_a_conditional_zuko_flow_without_its_context(name: str) -> None:
    zuko = pytest.importorskip("zuko")
    flow = getattr(zuko.flows, name)(features=4, context=3)
    x, c = torch.randn(16, 4), torch.randn(16, 3)
    with pytest.raises(klj_reg.CaptureError, match="is conditional") as caught:
        klj_reg.penalty(flow, x, alpha=1e-2)
    assert "context=c" in str(caught.value)
    assert "flow(c).log_prob(x)" in str(caught.value)
    # Either fix works: the user's own pass first, or (on a model whose passes klj-reg has not
    # captured yet) the context for the penalty's own pass.
    loss = -flow(c).log_prob(x).mean() + klj_reg.penalty(flow, x, alpha=1e-2)
    loss.backward()
    fresh = getattr(zuko.flows, name)(features=4, context=3)
    assert torch.isfinite(klj_reg.penalty(fresh, x, context=c, alpha=1e-2))


def test_an_unconditional_zuko_flow_on_the_wrong_shape_is_not_called_conditional() -> None:
    zuko = pytest.importorskip("zuko")
    flow = zuko.flows.MAF(features=4)
    with pytest.raises(RuntimeError) as caught:
        klj_reg.penalty(flow, torch.randn(16, 5), alpha=1e-2)
    assert not isinstance(caught.value, klj_reg.CaptureError)
