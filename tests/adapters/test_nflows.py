"""nflows adapter: captured diagonals against exact Jacobians and nflows' own log-dets."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture
from tests import truth
from tests.truth import (
    assert_log_det,
    assert_triangular,
    implied_log_det,
    jacobian,
    jacobian_each,
    only,
)

pytest.importorskip("nflows")
from nflows import distributions, flows  # noqa: E402
from nflows import transforms as T  # noqa: E402
from nflows.nn.nets import ConvResidualNet, ResidualNet  # noqa: E402

F64 = torch.float64
FEATURES = 6
CONTEXT_FEATURES = 3
"""``training_model``: data dimension and context dimension (the context is ``(B, 3)``)."""

MASK = torch.tensor([1, 0, 1, 0, 0, 1])
SPLINES = [
    T.PiecewiseRationalQuadraticCouplingTransform,
    T.PiecewiseQuadraticCouplingTransform,
    T.PiecewiseCubicCouplingTransform,
    T.PiecewiseLinearCouplingTransform,
]


# ----------------------------------------------------------------------------- helpers


def perturb(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Move every parameter away from nflows' (near-)identity initialisation."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def net_maker(context: int = 0, hidden: int = 16) -> Callable[[int, int], nn.Module]:
    def make(c_in: int, c_out: int) -> nn.Module:
        return ResidualNet(c_in, c_out, hidden, context_features=context or None, num_blocks=1)

    return make


def conv_maker(c_in: int, c_out: int) -> nn.Module:
    return ConvResidualNet(c_in, c_out, hidden_channels=8, num_blocks=1)


def made_kwargs(context: int) -> dict[str, Any]:
    return {"hidden_features": 16, "context_features": context or None, "num_blocks": 1}


def inputs(context: int, batch: int = 4, dim: int = FEATURES) -> tuple[Tensor, list[Tensor]]:
    x = torch.randn(batch, dim, dtype=F64)
    return x, ([torch.randn(batch, context, dtype=F64)] if context else [])


# Detached as soon as the records are taken, so that the test's truth runs uncaptured.
records = partial(truth.records, detach=True)


def diag(jac: Tensor) -> Tensor:
    return torch.diagonal(jac, dim1=1, dim2=2)


def coupling_diagonal(layer: T.CouplingTransform, x: Tensor, factors: list[Tensor]) -> Tensor:
    """The full diagonal a coupling's factors claim: exp(log|d|) on the transformed features
    (first factor) and, if given, on the identity features (second factor); 1 elsewhere."""
    out = torch.ones_like(x)
    out[:, layer.transform_features] = (
        factors[0].exp().reshape(out[:, layer.transform_features].shape)
    )
    if len(factors) > 1:
        ident = out[:, layer.identity_features]
        out[:, layer.identity_features] = factors[1].exp().reshape(ident.shape)
    return out.reshape(x.shape[0], -1)


def coupling_order(layer: T.CouplingTransform, shape: tuple[int, ...]) -> Tensor:
    """Flat indices with identity features first: the order that makes J lower triangular."""
    index = torch.arange(math.prod(shape)).reshape(shape)
    return torch.cat([index[layer.identity_features], index[layer.transform_features]]).reshape(-1)


def assert_coupling_is_lower_triangular(jac: Tensor, order: Tensor) -> None:
    assert_triangular(jac[:, order][:, :, order], lower=True)


# ----------------------------------------------------------------------------- couplings


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
@pytest.mark.parametrize("cls", [T.AffineCouplingTransform, T.AdditiveCouplingTransform])
def test_affine_coupling_factor_is_the_scale_diagonal(cls: type, context: int) -> None:
    layer = perturb(cls(MASK, net_maker(context))).double()
    x, cs = inputs(context)
    rec = only(records(layer, lambda: layer(x, *cs)))
    (factor,) = rec.factors
    jac = jacobian(lambda xx, *cc: layer(xx, *cc)[0], x, *cs)
    assert_coupling_is_lower_triangular(jac, coupling_order(layer, (FEATURES,)))
    torch.testing.assert_close(diag(jac), coupling_diagonal(layer, x, [factor.log_abs_d()]))
    assert_log_det(rec, layer(x, *cs)[1])
    if cls is T.AffineCouplingTransform:
        assert factor.log_abs_d().abs().max() > 0.05  # the test is not at the identity
        # released-code form: the raw pre-activation is the unconstrained half of the params
        params = layer.transform_net(x[:, layer.identity_features], *cs)
        torch.testing.assert_close(factor.pre_activation(), params[:, 3:])
    else:
        assert factor.log_abs_d().abs().max() == 0  # additive: unit diagonal


def test_affine_coupling_on_images_is_read_per_pixel() -> None:
    layer = perturb(T.AffineCouplingTransform(torch.tensor([0, 1, 1, 0]), conv_maker)).double()
    x = torch.randn(3, 4, 2, 2, dtype=F64)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    assert factor.source.shape == (3, 4, 2, 2)  # [shift | unconstrained scale] channels
    jac = jacobian(lambda xx: layer(xx)[0], x)
    assert_coupling_is_lower_triangular(jac, coupling_order(layer, (4, 2, 2)))
    torch.testing.assert_close(diag(jac), coupling_diagonal(layer, x, [factor.log_abs_d()]))
    assert_log_det(rec, layer(x)[1])


def test_master_scale_activation_is_followed() -> None:
    """nflows master makes the scale activation configurable; the adapter calls the layer's
    own ``_scale_and_shift``, so any activation is read correctly."""

    class SoftplusCoupling(T.AffineCouplingTransform):
        def _scale_and_shift(self, transform_params: Tensor) -> tuple[Tensor, Tensor]:
            u = transform_params[:, self.num_transform_features :]
            shift = transform_params[:, : self.num_transform_features]
            return nn.functional.softplus(u) + 1e-3, shift

    layer = perturb(SoftplusCoupling(MASK, net_maker())).double()
    x, _ = inputs(0)
    rec = only(records(layer, lambda: layer(x)))
    jac = jacobian(lambda xx: layer(xx)[0], x)
    torch.testing.assert_close(diag(jac), coupling_diagonal(layer, x, [rec.factors[0].log_abs_d()]))
    assert_log_det(rec, layer(x)[1])


def test_scales_not_computed_in_the_call_are_an_error_not_a_stale_read() -> None:
    """A coupling whose forward no longer runs the subnetwork klj-reg watches (here: replaced
    after attach) fails loudly, even when an earlier sampling pass left that subnetwork's
    output behind: a call never reads what another call stashed."""
    layer = perturb(T.AffineCouplingTransform(MASK, net_maker()))
    flow = flows.Flow(layer, distributions.StandardNormal([FEATURES]))
    klj_reg.attach(flow)
    x = torch.randn(8, FEATURES)
    flow.log_prob(x)
    klj_reg.penalty(flow, x, alpha=1e-2)
    flow.sample(5)  # the inverse runs the watched subnetwork: its output is stashed
    shape = (layer.num_identity_features, 2 * layer.num_transform_features)
    layer.transform_net = perturb(net_maker()(*shape))  # no klj-reg hook on this one
    with pytest.raises(klj_reg.CaptureError, match=r"transform_net \(.*\), captured, is gone"):
        flow.log_prob(x)  # the pass names the change (tests/core/test_model_changes.py)
    capture = get_capture(flow)
    capture.book.check = None  # past that check, the call itself still refuses
    with pytest.raises(klj_reg.AdapterMismatchError, match="did not compute"):
        flow.log_prob(x)


def test_version_drift_is_detected() -> None:
    """A layer computing its scale differently from what the adapter reads fails loudly."""

    class Drifted(T.AffineCouplingTransform):
        def _coupling_transform_forward(
            self, inputs: Tensor, transform_params: Tensor
        ) -> tuple[Tensor, Tensor]:
            scale, shift = self._scale_and_shift(transform_params)
            scale = scale.square()  # not what _scale_and_shift says
            return inputs * scale + shift, torch.log(scale).sum(1)

    flow = flows.Flow(perturb(Drifted(MASK, net_maker())), distributions.StandardNormal([6]))
    x = torch.randn(8, FEATURES)
    klj_reg.attach(flow)
    flow.log_prob(x)
    with pytest.raises(klj_reg.AdapterMismatchError, match="Drifted"):
        klj_reg.penalty(flow, x, alpha=1e-2)


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
@pytest.mark.parametrize("cls", SPLINES)
def test_spline_coupling_factor_is_the_elementwise_derivative(cls: type, context: int) -> None:
    kw = {"tails": "linear", "tail_bound": 3.0, "num_bins": 4}
    layer = perturb(cls(MASK, net_maker(context), **kw)).double()
    x, cs = inputs(context)
    rec = only(records(layer, lambda: layer(x, *cs)))
    (factor,) = rec.factors
    jac = jacobian_each(lambda xx, *cc: layer(xx, *cc)[0], x, *cs)
    assert_coupling_is_lower_triangular(jac, coupling_order(layer, (FEATURES,)))
    torch.testing.assert_close(diag(jac), coupling_diagonal(layer, x, [factor.log_abs_d()]))
    assert_log_det(rec, layer(x, *cs)[1])
    assert factor.log_abs_d().abs().max() > 0.05


@pytest.mark.parametrize("affine", [False, True])
def test_unconditional_transform_on_identity_features_is_its_own_factor(affine: bool) -> None:
    def unconditional(features: int) -> T.Transform:
        return T.PiecewiseRationalQuadraticCDF(
            [features], num_bins=4, tails="linear", tail_bound=3.0
        )

    if affine:
        layer = T.AffineCouplingTransform(MASK, net_maker(), unconditional_transform=unconditional)
    else:
        layer = T.PiecewiseRationalQuadraticCouplingTransform(
            MASK,
            net_maker(),
            num_bins=4,
            tails="linear",
            tail_bound=3.0,
            apply_unconditional_transform=True,
        )
    layer = perturb(layer).double()
    x, _ = inputs(0)
    rec = only(records(layer, lambda: layer(x)))
    assert len(rec.factors) == 2
    jac = jacobian_each(lambda xx: layer(xx)[0], x)
    assert_coupling_is_lower_triangular(jac, coupling_order(layer, (FEATURES,)))
    expected = coupling_diagonal(layer, x, [f.log_abs_d() for f in rec.factors])
    torch.testing.assert_close(diag(jac), expected)
    assert_log_det(rec, layer(x)[1])
    assert rec.factors[1].log_abs_d().abs().max() > 0.05


# ----------------------------------------------------------------------------- autoregressive


def autoregressive(name: str, context: int) -> nn.Module:
    if name == "affine":
        return T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(context))
    return T.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        FEATURES,
        num_bins=4,
        tails="linear",
        tail_bound=3.0,
        **made_kwargs(context),
    )


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
@pytest.mark.parametrize("name", ["affine", "spline"])
def test_masked_autoregressive_factor_is_the_lower_triangular_diagonal(
    name: str, context: int
) -> None:
    layer = perturb(autoregressive(name, context)).double()
    x, cs = inputs(context)
    rec = only(records(layer, lambda: layer(x, *cs)))
    (factor,) = rec.factors
    jac = jacobian_each(lambda xx, *cc: layer(xx, *cc)[0], x, *cs)
    assert_triangular(jac, lower=True)
    torch.testing.assert_close(diag(jac), factor.log_abs_d().exp())
    assert_log_det(rec, layer(x, *cs)[1])
    assert factor.log_abs_d().abs().max() > 0.05


@pytest.mark.parametrize(
    "name",
    [
        "MaskedPiecewiseLinearAutoregressiveTransform",
        "MaskedPiecewiseQuadraticAutoregressiveTransform",
        "MaskedPiecewiseCubicAutoregressiveTransform",
    ],
)
def test_other_autoregressive_splines_match_their_log_det(name: str) -> None:
    kw: dict[str, object] = {"num_bins": 4, "features": FEATURES, **made_kwargs(0)}
    if name == "MaskedPiecewiseQuadraticAutoregressiveTransform":
        kw.update(tails="linear", tail_bound=3.0)
    layer = perturb(getattr(T, name)(**kw)).double()
    x = torch.rand(4, FEATURES, dtype=F64)  # linear/cubic splines live on [0, 1]
    rec = only(records(layer, lambda: layer(x)))
    jac = jacobian_each(lambda xx: layer(xx)[0], x)
    assert_triangular(jac, lower=True)
    torch.testing.assert_close(diag(jac), rec.factors[0].log_abs_d().exp())
    assert_log_det(rec, layer(x)[1])


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
@pytest.mark.parametrize("name", ["affine", "spline", "coupling"])
def test_inverse_transform_records_the_inverse_diagonal(name: str, context: int) -> None:
    """Data -> noise through ``InverseTransform`` runs the inner ``inverse`` directly (for
    autoregressive layers, the MADE D times); the factor is the inverse map's diagonal."""
    if name == "coupling":
        inner = T.AffineCouplingTransform(MASK, net_maker(context))
    else:
        inner = autoregressive(name, context)
    inner = perturb(inner)
    layer = T.InverseTransform(inner).double()
    x, cs = inputs(context)
    calls = []
    net = inner.transform_net if name == "coupling" else inner.autoregressive_net
    counter = net.register_forward_hook(lambda *_: calls.append(1))
    rec = only(records(layer, lambda: layer(x, *cs)))
    counter.remove()
    assert len(calls) == (1 if name == "coupling" else FEATURES)
    jac = jacobian_each(lambda xx, *cc: layer(xx, *cc)[0], x, *cs)
    if name == "coupling":
        assert_coupling_is_lower_triangular(jac, coupling_order(inner, (FEATURES,)))
        expected = coupling_diagonal(inner, x, [rec.factors[0].log_abs_d()])
    else:
        assert_triangular(jac, lower=True)
        expected = rec.factors[0].log_abs_d().exp()
    torch.testing.assert_close(diag(jac), expected)
    assert_log_det(rec, layer(x, *cs)[1])
    # It is the inverse of the inner layer's own diagonal at the inverse's output.
    y = layer(x, *cs)[0].detach()
    forward = only(records(inner, lambda: inner(y, *cs)))
    torch.testing.assert_close(rec.factors[0].log_abs_d(), -forward.factors[0].log_abs_d())


# ----------------------------------------------------------------------------- elementwise / linear


@pytest.mark.parametrize("shape", [(6,), (3, 2, 2)])
def test_act_norm_is_one_factor_per_channel_shared_by_pixels(shape: tuple[int, ...]) -> None:
    layer = T.ActNorm(shape[0]).double()
    x = 2 * torch.randn(5, *shape, dtype=F64) + 1
    layer(x)  # data-dependent initialisation
    perturb(layer, 0.2)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    assert factor.selected().shape == (1, shape[0]) and factor.repeat == math.prod(shape[1:])
    jac = jacobian(lambda xx: layer(xx)[0], x)
    expected = factor.log_abs_d().exp().reshape(1, -1, *[1] * (len(shape) - 1)).expand(5, *shape)
    torch.testing.assert_close(jac, torch.diag_embed(expected.reshape(5, -1)))
    assert_log_det(rec, layer(x)[1])


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_uses_the_variance_nflows_uses(training: bool) -> None:
    layer = perturb(T.BatchNorm(FEATURES)).double()
    x = 3 * torch.randn(16, FEATURES, dtype=F64)
    layer.train(training)
    if not training:
        layer.running_var.copy_(torch.rand(FEATURES, dtype=F64) + 0.5)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    assert_log_det(rec, layer(x)[1])
    # With the batch statistics frozen (what nflows' log-det assumes) the map is diagonal.
    var = x.var(0) if training else layer.running_var
    frozen = T.BatchNorm(FEATURES).double().eval()
    frozen.load_state_dict(layer.state_dict())
    frozen.running_var.copy_(var)
    frozen.running_mean.copy_(x.mean(0))
    jac = jacobian(lambda xx: frozen(xx)[0], x)
    torch.testing.assert_close(jac, torch.diag_embed(factor.log_abs_d().exp().expand(16, -1)))


def test_pointwise_affine_is_elementwise() -> None:
    for scale in (torch.tensor(1.7, dtype=F64), torch.rand(FEATURES, dtype=F64) + 0.5):
        layer = T.PointwiseAffineTransform(0.3, scale)
        x, _ = inputs(0)
        rec = only(records(layer, lambda layer=layer, x=x: layer(x)))
        (factor,) = rec.factors
        assert factor.repeat * factor.source.numel() == FEATURES
        jac = jacobian(lambda xx, layer=layer: layer(xx)[0], x)
        d = factor.log_abs_d().exp().expand(4, FEATURES)  # a scalar scale stands for all D
        torch.testing.assert_close(jac, torch.diag_embed(d))
        assert_log_det(rec, layer(x)[1])


def test_lu_linear_factor_is_the_diagonal_of_u() -> None:
    layer = T.LULinear(FEATURES, identity_init=False).double()
    x, _ = inputs(0)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    lower, upper = layer._create_lower_upper()
    torch.testing.assert_close(layer.weight(), lower @ upper)
    torch.testing.assert_close(torch.diagonal(lower), torch.ones(FEATURES, dtype=F64))
    jac_u = jacobian(lambda xx: nn.functional.linear(xx, upper), x)
    assert_triangular(jac_u, lower=False)
    torch.testing.assert_close(diag(jac_u), factor.log_abs_d().exp().expand(4, -1))
    assert_log_det(rec, layer(x)[1])


def test_one_by_one_convolution_is_lu_per_pixel() -> None:
    layer = T.OneByOneConvolution(4, identity_init=False).double()
    x = torch.randn(2, 4, 3, 3, dtype=F64)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    assert factor.repeat == 9 and factor.selected().shape == (1, 4)
    _, upper = layer._create_lower_upper()  # per pixel: W = L U after a fixed permutation
    torch.testing.assert_close(factor.log_abs_d().exp().reshape(-1), torch.diagonal(upper))
    assert_log_det(rec, layer(x)[1])


@pytest.mark.parametrize("name", ["QRLinear", "SVDLinear"])
def test_qr_and_svd_linear_read_their_triangular_or_diagonal_factor(name: str) -> None:
    layer = perturb(getattr(T, name)(FEATURES, num_householder=4)).double()
    x, _ = inputs(0)
    rec = only(records(layer, lambda: layer(x)))
    (factor,) = rec.factors
    d = factor.log_abs_d().exp().reshape(-1)
    if name == "QRLinear":  # W = Q R, Q orthogonal: d = diag(R)
        torch.testing.assert_close(d, torch.diagonal(layer._create_upper()))
    else:  # W = U S V^T: d = the singular values
        singular = torch.linalg.svdvals(layer.weight())
        torch.testing.assert_close(d.sort().values, singular.sort().values)
    assert_log_det(rec, layer(x)[1])


# ----------------------------------------------------------------------------- flows


def flow(context: int = 0, inverse: bool = True) -> flows.Flow:
    """A small flow with one of each main kind of layer, perturbed off the identity."""
    embedded = 4 if context else 0
    layers: list[T.Transform] = [
        T.ActNorm(FEATURES),
        T.AffineCouplingTransform(MASK, net_maker(embedded)),
        T.ReversePermutation(FEATURES),
        T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(embedded)),
        T.RandomPermutation(FEATURES),
        T.PiecewiseRationalQuadraticCouplingTransform(
            1 - MASK, net_maker(embedded), num_bins=4, tails="linear", tail_bound=3.0
        ),
        T.LULinear(FEATURES, identity_init=False),
    ]
    if inverse:
        layers.append(
            T.InverseTransform(
                T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(embedded))
            )
        )
    embedding = nn.Linear(context, embedded) if context else None
    model = flows.Flow(
        T.CompositeTransform(layers), distributions.StandardNormal([FEATURES]), embedding
    )
    return perturb(model, 0.2).double()


def transform_nets(model: nn.Module) -> list[nn.Module]:
    """Every coupling network and MADE in ``model``, in order."""
    nets = []
    for layer in model.modules():
        for name in ("transform_net", "autoregressive_net"):
            if isinstance(layer, T.Transform) and isinstance(getattr(layer, name, None), nn.Module):
                nets.append(getattr(layer, name))
    return nets


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
def test_flow_records_each_layer_once_and_matches_its_log_det(context: int) -> None:
    model = flow(context)
    x, cs = inputs(context, batch=8)
    c = cs[0] if cs else None
    model.log_prob(x, c)  # ActNorm initialisation
    recs = records(model, lambda: model.log_prob(x, c))
    names = [f"_transform._transforms.{i}" for i in (0, 1, 3, 5, 6, 7)]
    assert sorted(recs) == names
    _, log_det = model._transform(x, context=model._embedding_net(c))
    for name, rec in recs.items():  # per layer
        layer = model.get_submodule(name)
        inner_x = x
        for previous in model._transform._transforms[: int(name.split(".")[-1])]:
            inner_x, _ = previous(inner_x, model._embedding_net(c))
        assert_log_det(rec, layer(inner_x, model._embedding_net(c))[1])
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(total, log_det)  # whole flow


def test_multiscale_image_flow_with_squeeze_matches_its_log_det() -> None:
    """Images: squeeze (neutral), ActNorm and 1x1 convolutions shared by pixels, conv
    couplings, and a multiscale split; nothing is left uncaptured."""

    def level(channels: int) -> T.Transform:
        mask = torch.arange(channels) % 2
        return T.CompositeTransform(
            [
                T.SqueezeTransform(),
                T.ActNorm(4 * channels),
                T.OneByOneConvolution(4 * channels, identity_init=False),
                T.AffineCouplingTransform(mask.repeat(4), conv_maker),
            ]
        )

    multiscale = T.MultiscaleCompositeTransform(2)
    shape = multiscale.add_transform(level(2), (8, 2, 2))
    multiscale.add_transform(level(shape[0]), (16, 1, 1))
    model = flows.Flow(multiscale, distributions.StandardNormal([32]))
    model = perturb(model, 0.1).double()
    x = torch.randn(3, 2, 4, 4, dtype=F64)
    model._transform(x)  # ActNorm initialisation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recs = records(model, lambda: model._transform(x))
    assert len(recs) == 6
    assert {r.factors[0].repeat for r in recs.values() if r.kind == "ActNorm"} == {4, 1}
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(total, model._transform(x)[1])


def identity_flow() -> flows.Flow:
    """A flow at its identity: every factor d = 1. nflows' own zero-init is *not* the
    identity: the affine coupling's scale sigmoid(0 + 2) + 1e-3 = 0.882, so its last layer's
    scale bias is set to logit(1 - 1e-3) - 2; the MAF's softplus(u) + 1e-3 needs
    u = log(e^(1 - 1e-3) - 1); the spline needs equal bins and unit derivatives."""
    model = flow(inverse=False).float()
    unit_softplus = math.log(math.expm1(1 - 1e-3))
    act, coupling, _, made, _, spline, lu = model._transform._transforms
    with torch.no_grad():
        act.log_scale.zero_()
        act.initialized.fill_(True)
        last = coupling.transform_net.final_layer
        last.weight.zero_()
        last.bias.zero_()
        last.bias[3:] = math.log(999.0) - 2.0
        last = made.autoregressive_net.final_layer
        last.weight.zero_()
        last.bias.view(FEATURES, 2)[:, 0] = unit_softplus
        last.bias.view(FEATURES, 2)[:, 1] = 0.0
        last = spline.transform_net.final_layer
        last.weight.zero_()
        last.bias.view(3, -1)[:, :8] = 0.0  # widths and heights
        last.bias.view(3, -1)[:, 8:] = unit_softplus  # inner derivatives
        lu.unconstrained_upper_diag.fill_(unit_softplus)
        lu.lower_entries.zero_()
        lu.upper_entries.zero_()
    return model


def test_penalty_is_zero_at_identity_and_positive_otherwise() -> None:
    model = identity_flow()
    x = torch.randn(16, FEATURES)
    z, log_det = model._transform(x)
    assert log_det.abs().max() < 1e-5  # it really is volume-preserving
    model.log_prob(x)
    assert klj_reg.penalty(model, x, alpha=1e-2).item() == pytest.approx(0.0, abs=1e-6)
    # A zero coupling output (what nflows' zero-init aims at) is scale sigmoid(2) + 1e-3.
    coupling = T.AffineCouplingTransform(MASK, net_maker())
    nn.init.zeros_(coupling.transform_net.final_layer.weight)
    nn.init.zeros_(coupling.transform_net.final_layer.bias)
    zero = flows.Flow(coupling, distributions.StandardNormal([FEATURES]))
    zero.log_prob(x)
    s = torch.sigmoid(torch.tensor(2.0)).item() + 1e-3
    expected = 3 * (s**2 - 1 - 2 * math.log(s)) * 1e-2  # per sample: no division by D
    assert klj_reg.penalty(zero, x, alpha=1e-2).item() == pytest.approx(expected, rel=1e-5)
    perturbed = flow().float()
    perturbed.log_prob(x)
    perturbed.log_prob(x)
    per_sample = klj_reg.penalty(perturbed, x, reduction="none", alpha=1e-2)
    assert (per_sample >= 0).all() and per_sample.mean().item() > 1e-3


def test_penalty_backward_reaches_every_scale_network() -> None:
    model = flow()
    x, _ = inputs(0, batch=8)
    model.log_prob(x)
    model.zero_grad()
    model.log_prob(x)
    klj_reg.penalty(model, x, alpha=1e-2).backward()
    for net in transform_nets(model):
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), type(net).__name__
    layers = model._transform._transforms
    assert layers[0].log_scale.grad.abs().sum() > 0  # ActNorm
    assert layers[6].unconstrained_upper_diag.grad.abs().sum() > 0  # LULinear


@pytest.mark.parametrize("context", [0, CONTEXT_FEATURES])
def test_sampling_records_nothing(context: int) -> None:
    model = flow(context).float()  # nflows' StandardNormal samples in the default dtype
    x, cs = inputs(context)
    x, c = x.float(), (cs[0].float() if cs else None)
    model.log_prob(x, c)
    capture = klj_reg.attach(model)
    capture.records.clear()
    with torch.no_grad():
        model.sample(5, context=c)
        model.sample_and_log_prob(3, context=c)
    assert capture.records == {}
    model.log_prob(x, c)
    assert len(capture.records) == 6


def test_one_transform_net_pass_per_layer_per_step() -> None:
    model = flow(CONTEXT_FEATURES)
    x, (c,) = inputs(CONTEXT_FEATURES, batch=8)
    model.log_prob(x, c)
    klj_reg.attach(model)
    calls: dict[int, int] = {}
    nets = transform_nets(model)
    hooks = [
        n.register_forward_hook(lambda m, a, o: calls.__setitem__(id(m), calls.get(id(m), 0) + 1))
        for n in nets
    ]
    loss = -model.log_prob(x, c).mean() + klj_reg.penalty(model, x, alpha=1e-2)
    loss.backward()
    for h in hooks:
        h.remove()
    # one pass per net; the inverse (IAF) layer's MADE runs D times by nflows' own design
    expected = [FEATURES if i == len(nets) - 1 else 1 for i in range(len(nets))]
    assert [calls[id(n)] for n in nets] == expected


def test_runner_gives_the_flows_transform_and_the_exact_fallback() -> None:
    """Without a captured pass the penalty runs the flow's transform with its embedding net.
    For a single elementwise layer the captured diagonal is the whole Jacobian, so the exact
    fallback (full Jacobian of the runner's pass) agrees."""
    model = flows.Flow(T.ActNorm(FEATURES), distributions.StandardNormal([FEATURES]))
    x, _ = inputs(0, batch=8)
    x = x.float()
    model.log_prob(x)
    with torch.no_grad():
        model._transform.log_scale.add_(0.3 * torch.randn(FEATURES))
    exact = klj_reg.penalty(model, x, estimator="exact", alpha=1e-2)
    captured = klj_reg.penalty(model, x, alpha=1e-2)  # first use: runs the runner
    torch.testing.assert_close(captured, exact)
    conditional = flow(CONTEXT_FEATURES).float()
    x, (c,) = inputs(CONTEXT_FEATURES, batch=8)
    x, c = x.float(), c.float()
    conditional.log_prob(x, c)
    first = klj_reg.penalty(conditional, x, context=c, alpha=1e-2)
    conditional.log_prob(x, c)
    torch.testing.assert_close(klj_reg.penalty(conditional, x, alpha=1e-2), first)


def test_uncaptured_invertible_layers_are_warned_about() -> None:
    layers = [
        T.AffineCouplingTransform(MASK, net_maker()),
        T.NaiveLinear(FEATURES),
        T.InverseTransform(T.CompositeTransform([T.LeakyReLU(), T.ActNorm(FEATURES)])),
    ]
    model = flows.Flow(T.CompositeTransform(layers), distributions.StandardNormal([FEATURES]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        klj_reg.attach(model)
    messages = " ".join(str(w.message) for w in caught)
    assert "NaiveLinear" in messages  # the core's warning, top level
    assert "LeakyReLU" in messages  # the adapter's, inside the InverseTransform
    x = torch.randn(4, FEATURES)
    model.log_prob(x)  # still captures the supported layers (ActNorm inside the inverse)
    assert len(klj_reg.attach(model).records) == 2


def test_spline_functions_are_restored_on_detach() -> None:
    import nflows.transforms.autoregressive as ar
    import nflows.transforms.splines as sp

    from klj_reg.adapters.nflows import TAP

    # Models other tests attached and dropped without detach may still hold the tap: count
    # this layer's use, and expect the functions as they were before it.
    users = TAP.users
    before = (sp.rational_quadratic_spline, ar.rational_quadratic_spline)
    layer = autoregressive("spline", 0)
    klj_reg.attach(layer)
    assert TAP.users == users + 1
    assert getattr(sp.rational_quadratic_spline, "_klj_tap", False)
    klj_reg.detach(layer)
    assert TAP.users == users
    assert (sp.rational_quadratic_spline, ar.rational_quadratic_spline) == before
    if users == 0:
        assert not getattr(sp.rational_quadratic_spline, "_klj_tap", False)


# ----------------------------------------------------------------------------- for the lead


def training_model(
    context: bool = False,
) -> tuple[nn.Module, Callable[[Tensor, Tensor | None], Tensor]]:
    """A small nflows ``Flow`` on D = 6 (ActNorm, affine coupling, MAF, rational-quadratic
    spline coupling) and its usual training loss ``-flow.log_prob(x, context=c).mean()``.

    With ``context=True`` the flow is conditioned on ``c`` of shape ``(B, 3)``
    (``CONTEXT_FEATURES``) through a linear embedding net; otherwise ``c`` is ignored.
    """
    embedded = 4 if context else 0
    layers: list[T.Transform] = [
        T.ActNorm(FEATURES),
        T.AffineCouplingTransform(MASK, net_maker(embedded)),
        T.ReversePermutation(FEATURES),
        T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(embedded)),
        T.ReversePermutation(FEATURES),
        T.PiecewiseRationalQuadraticCouplingTransform(
            1 - MASK, net_maker(embedded), num_bins=4, tails="linear", tail_bound=4.0
        ),
    ]
    embedding = nn.Linear(CONTEXT_FEATURES, embedded) if context else None
    model = flows.Flow(
        T.CompositeTransform(layers), distributions.StandardNormal([FEATURES]), embedding
    )

    def loss(x: Tensor, c: Tensor | None) -> Tensor:
        return -model.log_prob(x, context=c if context else None).mean()

    return model, loss


@pytest.mark.parametrize("context", [False, True])
def test_training_model_trains_with_the_penalty(context: bool) -> None:
    model, loss_fn = training_model(context)
    x = torch.randn(32, FEATURES)
    c = torch.randn(32, CONTEXT_FEATURES) if context else None
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran its own pass", no uncaptured layer
        for _ in range(3):
            optimiser.zero_grad()
            loss = loss_fn(x, c) + klj_reg.penalty(model, x, context=c, alpha=1e-2)
            loss.backward()
            optimiser.step()
    assert torch.isfinite(loss)
    assert len(klj_reg.attach(model).sites) == 4


def test_maf_reads_the_log_scale_the_layer_summed() -> None:
    """MaskedAffineAutoregressiveTransform keeps ``log_scale`` only as a local that it sums into
    its log-det: the capture reads that very tensor (no ``log(softplus(u) + eps)`` again in
    the penalty), and ``form="released-code"`` still reads the MADE output's unconstrained
    half; in a sampling pass (the layer's ``inverse``) it reads the MADE output as before."""
    torch.manual_seed(0)
    layer = perturb(T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(0)).double())
    x, _ = inputs(0, batch=5)
    rec = only(truth.records(layer, lambda: layer(x), detach=True))
    (factor,) = rec.factors
    assert factor.log_abs is None and factor.activation is None
    assert type(factor.source.grad_fn).__name__ == "LogBackward0"
    assert rec.log_det is not None
    torch.testing.assert_close(factor.source.sum(1), rec.log_det)
    u = layer._unconstrained_scale_and_shift(layer.autoregressive_net(x))[0]
    torch.testing.assert_close(factor.pre_activation(), u)
    diagonal = torch.diagonal(jacobian(lambda t: layer(t)[0], x), dim1=1, dim2=2)
    torch.testing.assert_close(factor.source, diagonal.abs().log())

    maf = perturb(T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(0)))
    flow = flows.Flow(maf, distributions.StandardNormal([FEATURES]))  # it samples float32
    capture = klj_reg.attach(flow, direction="sample")
    flow.sample_and_log_prob(5)
    (sampled,) = only(capture.records).factors
    assert sampled.log_abs is not None  # the MADE output's unconstrained half
    penalty = klj_reg.penalty(
        flow, direction="sample", alpha=1e-2
    )  # checked against nflows' log-det
    assert penalty.requires_grad and torch.isfinite(penalty)
    klj_reg.detach(flow)


def test_a_model_dropped_without_detach_gives_its_taps_back() -> None:
    """The spline and log-det taps wrap nflows' functions while a captured layer needs them:
    a model that is collected without ``klj_reg.detach`` gives its hold back at the next
    attach or detach (the functions are unwrapped once no model holds them)."""
    import gc

    from klj_reg.adapters.nflows import SUMS, TAP

    gc.collect()  # models of earlier tests collected now, not during the count below
    klj_reg.detach(nn.Linear(1, 1))
    held = (TAP.users, SUMS.users)
    steps = [
        T.MaskedAffineAutoregressiveTransform(FEATURES, **made_kwargs(0)),
        autoregressive("spline", 0),
    ]
    model = flows.Flow(T.CompositeTransform(steps), distributions.StandardNormal([FEATURES]))
    klj_reg.attach(model)
    model.log_prob(torch.randn(4, FEATURES))
    assert TAP.users > held[0] and SUMS.users > held[1]
    del model, steps
    gc.collect()
    assert TAP.users > held[0]  # the collector changes no function (it may run in a compile)
    klj_reg.detach(nn.Linear(1, 1))
    assert (TAP.users, SUMS.users) == held
