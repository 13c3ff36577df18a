"""normflows adapter: captured diagonals against exact Jacobians of each triangular factor of
the data-to-latent map (the layers' ``.inverse``) and normflows' own log-dets; sampling,
detach, call counts, runners."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import klj_reg
from klj_reg import hooks
from tests.truth import (
    assert_log_det,
    assert_triangular,
    attach,
    detach_later,
    implied_log_det,
    jacobian_each,
    only,
    records,
)

nf = pytest.importorskip("normflows")

from normflows.flows.affine.coupling import AffineCoupling  # noqa: E402
from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling  # noqa: E402

DIM = 6
CONTEXT_DIM = 3

# The classes klj-reg patches, as they are before any test runs (collection time).
PATCHED = [
    (AffineCoupling, "inverse"),
    (AffineCoupling, "forward"),
    (nf.flows.MaskedAffineAutoregressive, "inverse"),
    (nf.flows.MaskedAffineAutoregressive, "forward"),
    (nf.flows.ActNorm, "inverse"),
    (nf.flows.ActNorm, "forward"),
    (nf.flows.CoupledRationalQuadraticSpline, "inverse"),
    (nf.flows.CoupledRationalQuadraticSpline, "forward"),
    (PiecewiseRationalQuadraticCoupling, "_piecewise_cdf"),
    (nf.flows.LULinearPermute, "inverse"),
]
ORIGINAL = {key: key[0].__dict__.get(key[1]) for key in PATCHED}

pytestmark = pytest.mark.usefixtures("float64")  # normflows allocates log-dets in the default dtype


def noisy(module: nn.Module, std: float = 0.3) -> nn.Module:
    """Non-trivial weights: normflows zero-initialises many output layers."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn_like(p))
    return module


def per_sample(log_abs: Tensor, batch: int) -> Tensor:
    return log_abs.reshape(log_abs.shape[0], -1).expand(batch, -1)


def diag(jac: Tensor) -> Tensor:
    return torch.diagonal(jac, dim1=1, dim2=2)


def nontrivial(record: klj_reg.LayerRecord) -> None:
    assert max(f.log_abs_d().abs().max().item() for f in record.factors) > 0.05


# Affine couplings -------------------------------------------------------------------------


def coupling_net(dims: tuple[int, ...], mode: str) -> nn.Module:
    c = dims[0]
    if len(dims) == 1:
        return noisy(nf.nets.MLP([c // 2, 16, c], init_zeros=True))
    c_in = c if "checkerboard" in mode else c // 2
    c_out = 2 * (c if "checkerboard" in mode else c // 2)
    return noisy(nf.nets.ConvNet2d([c_in, 8, 8, c_out], [3, 1, 3], init_zeros=True))


@pytest.mark.parametrize(
    ("dims", "mode"), [((6,), "channel"), ((4, 2, 2), "channel"), ((2, 2, 4), "checkerboard")]
)
@pytest.mark.parametrize("scale_map", ["exp", "sigmoid", "sigmoid_inv"])
def test_affine_coupling_block(scale_map: str, dims: tuple[int, ...], mode: str) -> None:
    block = nf.flows.AffineCouplingBlock(
        coupling_net(dims, mode), scale_map=scale_map, split_mode=mode
    )
    x = torch.randn(3, *dims)
    rec = only(records(block, lambda: block.inverse(x)))
    assert rec.name == "flows.1" and rec.kind == "AffineCoupling"
    (factor,) = rec.factors
    jac = jacobian_each(lambda xx: block.inverse(xx)[0], x)
    if mode == "channel":  # (x1, x2) -> (x1, g(x2; x1))
        assert_triangular(jac, lower=True)
    scaled = factor.log_abs_d().exp()
    placed, _ = nf.flows.Split(mode).inverse([torch.ones_like(scaled), scaled])
    torch.testing.assert_close(diag(jac), placed.reshape(3, -1))
    if scale_map == "sigmoid":  # Glow's map: sigmoid(s + 2), no epsilon
        params = block.flows[1].param_map(nf.flows.Split(mode)(x)[0][0])
        torch.testing.assert_close(scaled, torch.sigmoid(params[:, 1::2] + 2))
    assert_log_det(rec, block.inverse(x)[1], own=True)
    nontrivial(rec)


def test_released_code_form_of_affine_coupling() -> None:
    block = nf.flows.AffineCouplingBlock(coupling_net((6,), "channel"))
    x = torch.randn(4, 6)
    attach(block)
    _, log_det = block.inverse(x)
    raw = block.flows[1].param_map(x[:, :3])[:, 1::2]
    # ones on the pass-through half; weight D / layers = 6 (per-sample units of the authors')
    expected = 6 * (raw.square().sum(1) + 3 - 2 * log_det).mean()
    got = klj_reg.penalty(block, x, alpha=1.0, form="released-code")
    torch.testing.assert_close(got, expected)


def test_masked_affine_flow() -> None:
    b = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    layer = nf.flows.MaskedAffineFlow(
        b, t=noisy(nf.nets.MLP([6, 16, 6])), s=noisy(nf.nets.MLP([6, 16, 6], init_zeros=True))
    )
    x = torch.randn(4, 6)
    rec = only(records(layer, lambda: layer.inverse(x)))
    jac = jacobian_each(lambda xx: layer.inverse(xx)[0], x)
    order = torch.cat([torch.nonzero(b).flatten(), torch.nonzero(1 - b).flatten()])
    assert_triangular(jac[:, order][:, :, order], lower=True)
    torch.testing.assert_close(diag(jac), rec.factors[0].log_abs_d().exp())
    assert_log_det(rec, layer.inverse(x)[1], own=True)
    nontrivial(rec)


def maf(context: int) -> nn.Module:
    layer = nf.flows.MaskedAffineAutoregressive(DIM, 16, context_features=context or None)
    return noisy(layer, 0.2)


@pytest.mark.parametrize("reverse", [False, True])
def test_a_layer_attached_as_the_model_records_into_the_pass_its_inverse_began(
    reverse: bool,
) -> None:
    """The layer's record lands in the pass its own ``inverse`` began (``Reverse``'s too,
    whose ``inverse`` runs the inner ``forward``), not in a stray pass outside it: so
    penalties on two micro-batches each read their own."""
    layer = nf.flows.Reverse(maf(0)) if reverse else maf(0)
    capture = attach(layer)
    x1, x2 = torch.randn(4, DIM), torch.randn(5, DIM)
    layer.inverse(x1)
    assert [p.inputs is x1 for p in capture.book.grad if p.records] == [True]
    want1 = klj_reg.penalty(layer, x1, alpha=1e-2)
    layer.inverse(x2)
    want2 = klj_reg.penalty(layer, x2, alpha=1e-2)
    layer.inverse(x1)
    torch.testing.assert_close(klj_reg.penalty(layer, x1, alpha=1e-2), want1)
    layer.inverse(x1)
    layer.inverse(x2)  # one unread pass per model: the pass on x1 is dropped
    torch.testing.assert_close(klj_reg.penalty(layer, x2, alpha=1e-2), want2)
    with pytest.raises(klj_reg.CaptureError, match="dropped unread"):
        klj_reg.penalty(layer, x1, alpha=1e-2)


@pytest.mark.parametrize("context", [0, CONTEXT_DIM])
def test_masked_affine_autoregressive(context: int) -> None:
    layer = maf(context)
    x = torch.randn(4, DIM)
    cs = [torch.randn(4, context)] if context else []
    calls = []
    layer.autoregressive_net.register_forward_pre_hook(lambda m, a: calls.append(1))
    rec = only(records(layer, lambda: layer.inverse(x, *cs)))
    assert len(calls) == DIM  # normflows' own D passes; the record is from the last one
    jac = jacobian_each(lambda xx, *cc: layer.inverse(xx, *cc)[0], x, *cs)
    assert_triangular(jac, lower=True)
    torch.testing.assert_close(diag(jac), rec.factors[0].log_abs_d().exp())
    assert_log_det(rec, layer.inverse(x, *cs)[1], own=True)
    nontrivial(rec)


# Elementwise and linear layers --------------------------------------------------------------


@pytest.mark.parametrize(("dims", "shape"), [((6,), (6,)), ((2, 4, 4), (2, 1, 1))])
@pytest.mark.parametrize("act_norm", [True, False])
def test_act_norm_and_affine_const(
    act_norm: bool, dims: tuple[int, ...], shape: tuple[int, ...]
) -> None:
    cls = nf.flows.ActNorm if act_norm else nf.flows.AffineConstFlow
    layer = cls(shape)
    x = 2 * torch.randn(5, *dims) + 1
    layer.inverse(x)  # ActNorm: data-dependent initialisation
    noisy(layer)
    rec = only(records(layer, lambda: layer.inverse(x)))
    (factor,) = rec.factors
    assert factor.source.shape[0] == 1 and factor.repeat == x[0].numel() // math.prod(shape)
    jac = jacobian_each(lambda xx: layer.inverse(xx)[0], x)
    expected = factor.log_abs_d().exp().expand(1, *dims).reshape(1, -1).expand(5, -1)
    torch.testing.assert_close(jac, torch.diag_embed(expected))
    assert_log_det(rec, layer.inverse(x)[1], own=True)


def test_class_conditional_affine_const() -> None:
    layer = noisy(nf.flows.CCAffineConst((6,), 3))
    x, y = torch.randn(4, 6), F.one_hot(torch.tensor([0, 2, 1, 2]), 3).double()
    rec = only(records(layer, lambda: layer.inverse(x, y)))
    jac = jacobian_each(lambda xx, yy: layer.inverse(xx, yy)[0], x, y)
    torch.testing.assert_close(jac, torch.diag_embed(rec.factors[0].log_abs_d().exp()))
    assert_log_det(rec, layer.inverse(x, y)[1], own=True)


def lu_parts(layer: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    lower = torch.tril(layer.L, -1) + layer.eye
    upper = torch.triu(layer.U, 1) + torch.diag(layer.sign_S * layer.log_S.exp())
    return layer.P, lower, upper


def test_invertible_1x1_conv_records_the_lu_scale() -> None:
    conv = noisy(nf.flows.Invertible1x1Conv(3, use_lu=True))
    x = torch.randn(2, 3, 2, 2)
    rec = only(records(conv, lambda: conv.inverse(x)))
    (factor,) = rec.factors
    assert factor.repeat == 4 and factor.selected().shape == (1, 3)
    perm, lower, upper = lu_parts(conv)
    eye = torch.eye(4)
    # the layer is P L U per pixel (channel-major flattening) ...
    torch.testing.assert_close(
        jacobian_each(lambda xx: conv.inverse(xx)[0], x)[0], torch.kron(perm @ lower @ upper, eye)
    )
    # ... whose last factor U is triangular with the captured diagonal, L's diagonal is 1
    u_jac = jacobian_each(lambda xx: F.conv2d(xx, upper[..., None, None]), x)
    assert_triangular(u_jac, lower=False)
    expected = factor.log_abs_d().exp().repeat_interleave(4, dim=1).expand(2, -1)
    torch.testing.assert_close(diag(u_jac).abs(), expected)
    torch.testing.assert_close(torch.diagonal(lower), torch.ones(3))
    assert_log_det(rec, conv.inverse(x)[1], own=True)
    nontrivial(rec)


def test_invertible_affine_records_the_lu_scale() -> None:
    layer = noisy(nf.flows.InvertibleAffine(4, use_lu=True))
    x = torch.randn(3, 4)
    rec = only(records(layer, lambda: layer.inverse(x)))
    perm, lower, upper = lu_parts(layer)
    jac = jacobian_each(lambda xx: layer.inverse(xx)[0], x)
    torch.testing.assert_close(jac[0], (perm @ lower @ upper).T)  # z @ W
    u_jac = jacobian_each(lambda xx: xx @ upper, x)  # U^T, lower triangular
    assert_triangular(u_jac, lower=True)
    torch.testing.assert_close(diag(u_jac).abs(), per_sample(rec.factors[0].log_abs_d(), 3).exp())
    assert_log_det(rec, layer.inverse(x)[1], own=True)


@pytest.mark.parametrize("cls", ["Invertible1x1Conv", "InvertibleAffine"])
def test_free_mixing_matrix_is_left_out_with_a_warning(cls: str) -> None:
    shape = (3, 2, 2) if cls == "Invertible1x1Conv" else (3,)
    layer = getattr(nf.flows, cls)(3, use_lu=False)
    scale = nf.flows.AffineConstFlow((3,) + (1,) * (len(shape) - 1))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(shape), [layer, scale])
    with pytest.warns(UserWarning, match="use_lu=False"):
        attach(model)
    recs = records(model, lambda: model.forward_kld(torch.randn(2, *shape)))
    assert list(recs) == ["flows.1"]


def test_lu_linear_permute() -> None:
    layer = nf.flows.LULinearPermute(5, identity_init=False)
    x = torch.randn(3, 5)
    rec = only(records(layer, lambda: layer.inverse(x)))
    lower, upper = layer.linear._create_lower_upper()
    perm = torch.eye(5)[layer.permutation._permutation]
    jac = jacobian_each(lambda xx: layer.inverse(xx)[0], x)
    torch.testing.assert_close(jac[0], lower @ upper @ perm)
    u_jac = jacobian_each(lambda xx: F.linear(xx, upper), x)
    assert_triangular(u_jac, lower=False)
    torch.testing.assert_close(diag(u_jac), per_sample(rec.factors[0].log_abs_d(), 3).exp())
    assert_log_det(rec, layer.inverse(x)[1], own=True)
    nontrivial(rec)


# Splines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("context", [0, CONTEXT_DIM])
@pytest.mark.parametrize("circular", [False, True])
def test_coupled_rational_quadratic_spline(circular: bool, context: int) -> None:
    ctx = context or None
    if circular:
        layer = nf.flows.CircularCoupledRationalQuadraticSpline(
            DIM, 1, 16, [0, 3], num_context_channels=ctx, init_identity=False
        )
    else:
        layer = nf.flows.CoupledRationalQuadraticSpline(DIM, 1, 16, num_context_channels=ctx)
    noisy(layer, 0.5)
    x = 2.5 * torch.rand(4, DIM) * 2 - 2.5  # inside the tail bound 3: the splines are active
    cs = [torch.randn(4, context)] if context else []
    rec = only(records(layer, lambda: layer.inverse(x, *cs)))
    transformed, identity = rec.factors
    coupling = layer.prqct
    jac = jacobian_each(lambda xx, *cc: layer.inverse(xx, *cc)[0], x, *cs)
    order = torch.cat([coupling.identity_features, coupling.transform_features])
    assert_triangular(jac[:, order][:, :, order], lower=True)
    expected = torch.empty(4, DIM)
    expected[:, coupling.transform_features] = transformed.log_abs_d().exp()
    expected[:, coupling.identity_features] = identity.log_abs_d().exp()
    torch.testing.assert_close(diag(jac), expected)
    assert_log_det(rec, layer.inverse(x, *cs)[1], own=True)
    nontrivial(rec)


@pytest.mark.parametrize(
    ("circular", "context", "scaled"),
    [(False, 0, False), (False, CONTEXT_DIM, False), (True, 0, False), (True, CONTEXT_DIM, True)],
)
def test_autoregressive_rational_quadratic_spline(
    circular: bool, context: int, scaled: bool
) -> None:
    ctx = context or None
    if circular:
        layer = nf.flows.CircularAutoregressiveRationalQuadraticSpline(
            DIM, 1, 16, [1, 4], num_context_channels=ctx, permute_mask=False
        )
    else:
        layer = nf.flows.AutoregressiveRationalQuadraticSpline(DIM, 1, 16, num_context_channels=ctx)
    noisy(layer, 0.3)
    if scaled:  # a net with hidden_features: the layer divides widths/heights in place
        layer.mprqat.autoregressive_net.hidden_features = 4
    x = 2.5 * torch.rand(4, DIM) * 2 - 2.5
    cs = [torch.randn(4, context)] if context else []
    rec = only(records(layer, lambda: layer.inverse(x, *cs)))
    jac = jacobian_each(lambda xx, *cc: layer.inverse(xx, *cc)[0], x, *cs)
    assert_triangular(jac, lower=True)
    torch.testing.assert_close(diag(jac), rec.factors[0].log_abs_d().exp())
    assert_log_det(rec, layer.inverse(x, *cs)[1], own=True)
    nontrivial(rec)


@pytest.mark.parametrize("kind", ["coupled", "autoregressive"])
def test_a_spline_layer_attached_on_its_own_and_in_a_flow_records_for_both(kind: str) -> None:
    """Both sites read the spline's own log-derivative of the same call (found by the peer
    harness: the second site raised AdapterMismatchError)."""
    make = (
        nf.flows.CoupledRationalQuadraticSpline
        if kind == "coupled"
        else nf.flows.AutoregressiveRationalQuadraticSpline
    )
    layers = [noisy(make(DIM, 1, 16), 0.3) for _ in range(2)]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM), layers)
    for layer in layers:
        attach(layer)
    attach(model)
    x = 2.5 * torch.rand(4, DIM) * 2 - 2.5
    model.log_prob(x)
    each = [
        klj_reg.penalty(layer, reduction="none", normaliser=1.0, alpha=1e-2) for layer in layers
    ]
    whole = klj_reg.penalty(model, x, reduction="none", normaliser=1.0, alpha=1e-2)
    assert all((p > 0).all() for p in each)
    torch.testing.assert_close(whole, each[0] + each[1])  # the same calls' own tensors


# Reverse ----------------------------------------------------------------------------------


@pytest.mark.parametrize("inner", ["maf", "act_norm"])
def test_reverse_records_the_inner_forward(inner: str) -> None:
    layer = maf(0) if inner == "maf" else noisy(nf.flows.ActNorm((DIM,)))
    if inner == "act_norm":
        layer.data_dep_init_done.fill_(1.0)
    rev = nf.flows.Reverse(layer)
    x = torch.randn(4, DIM)
    capture = attach(rev)
    rev.forward(x)  # latent -> data: the inner inverse, not recorded
    assert capture.records == {} and capture.sites[""].state == {}
    rec = only(records(rev, lambda: rev.inverse(x)))
    jac = jacobian_each(lambda xx: rev.inverse(xx)[0], x)
    assert_triangular(jac, lower=True)
    expected = per_sample(rec.factors[0].log_abs_d(), 4).exp()
    torch.testing.assert_close(diag(jac), expected)
    assert_log_det(rec, rev.inverse(x)[1], own=True)
    nontrivial(rec)


def test_reverse_of_a_spline_is_left_out_with_a_warning() -> None:
    rev = nf.flows.Reverse(nf.flows.CoupledRationalQuadraticSpline(DIM, 1, 8))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM), [rev, maf(0)])
    with pytest.warns(UserWarning, match="Reverse of CoupledRationalQuadraticSpline"):
        attach(model)


# Whole models -----------------------------------------------------------------------------


def training_model(
    context: bool = False,
) -> tuple[nn.Module, Callable[[Tensor, Tensor | None], Tensor]]:
    """A small normflows model on D = 6 and its usual training loss ``(x, c) -> forward_kld``.

    Without context: NormalizingFlow of AffineCouplingBlock ('exp'), Permute,
    MaskedAffineAutoregressive, ActNorm, CoupledRationalQuadraticSpline, LULinearPermute.
    With context (``c``: ``(B, 3)``): ConditionalNormalizingFlow of MaskedAffineAutoregressive,
    Permute, CoupledRationalQuadraticSpline, AutoregressiveRationalQuadraticSpline,
    LULinearPermute (normflows' affine coupling and ActNorm take no context). Default
    normflows initialisations.
    """
    if not context:
        flows = [
            nf.flows.AffineCouplingBlock(nf.nets.MLP([DIM // 2, 16, DIM], init_zeros=True)),
            nf.flows.Permute(DIM, mode="swap"),
            nf.flows.MaskedAffineAutoregressive(DIM, 16),
            nf.flows.ActNorm((DIM,)),
            nf.flows.CoupledRationalQuadraticSpline(DIM, 1, 16),
            nf.flows.LULinearPermute(DIM),
        ]
        plain = nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM), flows)
        return plain, lambda x, c: plain.forward_kld(x)
    flows = [
        nf.flows.MaskedAffineAutoregressive(DIM, 16, context_features=CONTEXT_DIM),
        nf.flows.Permute(DIM),
        nf.flows.CoupledRationalQuadraticSpline(DIM, 1, 16, num_context_channels=CONTEXT_DIM),
        nf.flows.AutoregressiveRationalQuadraticSpline(
            DIM, 1, 16, num_context_channels=CONTEXT_DIM
        ),
        nf.flows.LULinearPermute(DIM),
    ]
    encoder = nf.nets.MLP([CONTEXT_DIM, 16, 2 * DIM])
    q0 = nf.distributions.base.ConditionalDiagGaussian(DIM, encoder)
    conditional = nf.ConditionalNormalizingFlow(q0, flows)
    return conditional, lambda x, c: conditional.forward_kld(x, context=c)


def random_model(context: bool) -> tuple[nn.Module, Callable[[Tensor, Tensor | None], Tensor]]:
    model, loss = training_model(context)
    return noisy(model, 0.2), loss


def batch(context: bool, n: int = 8) -> tuple[Tensor, Tensor | None]:
    return torch.randn(n, DIM), (torch.randn(n, CONTEXT_DIM) if context else None)


def subnets(model: nn.Module) -> dict[str, nn.Module]:
    names = ("param_map", "autoregressive_net", "transform_net")
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in names}


@pytest.mark.parametrize("context", [False, True])
def test_whole_model_log_det_and_penalty(context: bool) -> None:
    model, loss_fn = random_model(context)
    x, c = batch(context)
    loss_fn(x, c)  # ActNorm initialisation
    recs = records(model, lambda: loss_fn(x, c))
    expected = 4 if context else 5  # every layer but Permute
    assert len(recs) == expected
    kwargs = {"context": c} if context else {}
    _, log_det = model.inverse_and_log_det(x, **kwargs)
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(torch.broadcast_to(total, log_det.shape), log_det)
    loss_fn(x, c)
    assert klj_reg.penalty(model, x, alpha=1e-2).item() > 1e-3


@pytest.mark.parametrize("context", [False, True])
def test_training_call_runs_each_subnet_as_often_as_normflows(context: bool) -> None:
    model, loss_fn = random_model(context)
    x, c = batch(context)
    loss_fn(x, c)  # ActNorm initialisation
    counts: dict[str, int] = {}
    for name, net in subnets(model).items():
        net.register_forward_pre_hook(lambda m, a, n=name: counts.__setitem__(n, counts[n] + 1))

    def count(step: Callable[[], object]) -> dict[str, int]:
        counts.update(dict.fromkeys(subnets(model), 0))
        step()
        return dict(counts)

    plain = count(lambda: loss_fn(x, c))
    attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran its own pass" warning
        captured = count(lambda: (loss_fn(x, c) + klj_reg.penalty(model, x, alpha=1e-2)).backward())
    assert captured == plain
    for name, n in captured.items():  # couplings once, MAF D times (normflows' own inverse)
        maf_net = name.endswith("autoregressive_net") and "mprqat" not in name
        assert n == (DIM if maf_net else 1), name


@pytest.mark.parametrize("context", [False, True])
def test_backward_reaches_the_scale_subnetworks(context: bool) -> None:
    model, loss_fn = random_model(context)
    x, c = batch(context)
    loss_fn(x, c)
    attach(model)
    loss_fn(x, c)
    model.zero_grad()
    klj_reg.penalty(model, x, alpha=1e-2).backward()
    for name, net in subnets(model).items():
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads), name
    linear = model.flows[-1].linear
    assert linear.unconstrained_upper_diag.grad.abs().sum() > 0
    if not context:
        assert model.flows[3].s.grad.abs().sum() > 0  # ActNorm
    spline = model.flows[2 if context else 4].prqct.unconditional_transform
    assert spline.unnormalized_derivatives.grad.abs().sum() > 0


@pytest.mark.parametrize("context", [False, True])
def test_sampling_records_nothing(context: bool) -> None:
    model, loss_fn = random_model(context)
    x, c = batch(context)
    loss_fn(x, c)
    capture = attach(model)
    kwargs = {"context": c} if context else {}
    with torch.no_grad():
        model.sample(8, **kwargs)
    assert capture.records == {}
    assert all(site.state == {} for site in capture.sites.values())
    loss_fn(x, c)
    before = dict(capture.records)
    model.sample(8, **kwargs)
    assert capture.records == before  # the latest data-to-latent pass is kept, unchanged
    assert all(site.state == {} for site in capture.sites.values())


def test_detach_restores_the_patched_classes() -> None:
    model, loss_fn = training_model()
    counts = {key: hooks._patched.get(key, (None, None, 0, None))[2] for key in PATCHED}
    attach(model)
    for key in PATCHED:
        assert getattr(key[0].__dict__.get(key[1]), "_klj_wrapper", False), key
    klj_reg.detach(model)
    for key in PATCHED:
        assert hooks._patched.get(key, (None, None, 0, None))[2] == counts[key]
        if counts[key] == 0:  # no other attached model holds the class
            assert key[0].__dict__.get(key[1]) is ORIGINAL[key], key
    for module in model.modules():
        assert hooks.binding(module) is None
    x, c = batch(False)
    loss_fn(x, c)  # runs without the capture


def test_a_deepcopy_records_nothing_into_the_original() -> None:
    model, loss_fn = random_model(False)
    x, _ = batch(False)
    model.forward_kld(x)
    capture = attach(model)
    twin = copy.deepcopy(model)  # carries the instance callbacks and subnet hooks over
    twin.forward_kld(x)
    assert capture.records == {} and all(s.state == {} for s in capture.sites.values())
    twin_capture = attach(twin)
    twin.forward_kld(x)
    assert len(twin_capture.records) == 5 and capture.records == {}
    model.forward_kld(x)
    torch.testing.assert_close(
        klj_reg.penalty(twin, x, alpha=1e-2), klj_reg.penalty(model, x, alpha=1e-2)
    )


@pytest.mark.parametrize("context", [False, True])
def test_penalty_without_a_user_pass_runs_the_model_runner(context: bool) -> None:
    model, loss_fn = random_model(context)
    x, c = batch(context)
    loss_fn(x, c)
    own = klj_reg.penalty(
        model, x, context=c, alpha=1e-2
    )  # first use: attaches and runs inverse_and_log_det
    detach_later(model)
    loss_fn(x, c)
    torch.testing.assert_close(own, klj_reg.penalty(model, x, alpha=1e-2))


def test_runners_of_class_conditional_flow_and_single_layer() -> None:
    flows = [maf(0), nf.flows.Permute(DIM), noisy(nf.flows.ActNorm((DIM,)))]
    flows[2].data_dep_init_done.fill_(1.0)
    model = nf.ClassCondFlow(nf.distributions.ClassCondDiagGaussian(DIM, 2), flows)
    layer = nf.flows.AffineCouplingBlock(coupling_net((DIM,), "channel"))
    x, y = torch.randn(5, DIM), torch.tensor([0, 1, 1, 0, 1])
    for target, forward in (
        (model, lambda: model.forward_kld(x, y)),
        (layer, lambda: layer.inverse(x)),
    ):
        own = klj_reg.penalty(target, x, alpha=1e-2)  # first use: attaches and runs the runner
        detach_later(target)
        forward()
        torch.testing.assert_close(own, klj_reg.penalty(target, x, alpha=1e-2))
        assert own.item() > 1e-4


def identity_model() -> nn.Module:
    """Every layer at its identity initialisation (penalty exactly 0):

    - AffineCouplingBlock('exp'): param_map output 0 (normflows' ``init_zeros=True``);
    - MaskedAffineFlow: ``s`` net output 0;
    - MaskedAffineAutoregressive: MADE final layer weight 0, scale bias logit(0.999) - 2, so
      that sigmoid(u + 2) + 1e-3 = 1;
    - ActNorm / AffineConstFlow: s = 0 (ActNorm's data-dependent init switched off);
    - CoupledRationalQuadraticSpline: transform net final weight 0, bias 0 for widths and
      heights and softplus^{-1}(1 - min_derivative) for derivatives (its unconditional spline
      starts at the identity); AutoregressiveRationalQuadraticSpline: ``init_identity=True``;
    - LULinearPermute: ``identity_init=True``.
    """
    act_norm = nf.flows.ActNorm((DIM,))
    act_norm.data_dep_init_done.fill_(1.0)
    made = nf.flows.MaskedAffineAutoregressive(DIM, 16)
    spline = nf.flows.CoupledRationalQuadraticSpline(DIM, 1, 16, num_bins=4)
    with torch.no_grad():
        final = made.autoregressive_net.final_layer
        final.weight.zero_()
        final.bias.zero_()
        final.bias[0::2] = math.log(0.999 / 0.001) - 2.0
        net = spline.prqct.transform_net.final_layer
        net.weight.zero_()
        net.bias.view(DIM // 2, -1).zero_()
        net.bias.view(DIM // 2, -1)[:, 8:] = math.log(math.expm1(1 - 1e-3))
    b = torch.tensor([1.0, 0.0] * (DIM // 2))
    flows = [
        nf.flows.AffineCouplingBlock(nf.nets.MLP([DIM // 2, 16, DIM], init_zeros=True)),
        nf.flows.MaskedAffineFlow(b, s=nf.nets.MLP([DIM, 16, DIM], init_zeros=True)),
        made,
        act_norm,
        nf.flows.AffineConstFlow((DIM,)),
        spline,
        nf.flows.AutoregressiveRationalQuadraticSpline(DIM, 1, 16),
        nf.flows.LULinearPermute(DIM),
        nf.flows.Permute(DIM),
    ]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(DIM), flows)


def test_penalty_is_zero_at_identity_and_positive_otherwise() -> None:
    model = identity_model()
    x = torch.randn(16, DIM)
    attach(model)
    z, log_det = model.inverse_and_log_det(x)
    # it really is the identity up to the permutations
    torch.testing.assert_close(z.sort(1).values, x.sort(1).values)
    torch.testing.assert_close(log_det, torch.zeros(16), atol=1e-12, rtol=0)
    assert len(klj_reg.attach(model).records) == 8
    assert klj_reg.penalty(model, x, alpha=1e-2).item() == pytest.approx(0.0, abs=1e-12)
    noisy(model, 0.1)
    model.forward_kld(x)
    assert klj_reg.penalty(model, x, reduction="none", alpha=1e-2).min() > 0
    model.forward_kld(x)
    assert klj_reg.penalty(model, x, alpha=1e-2).item() > 1e-4


def glow_block(channels: int = 4) -> nn.Module:
    """A GlowBlock at normflows' initialisation, its 1x1 convolution made the identity."""
    block = nf.flows.GlowBlock(channels, 8)
    conv = block.flows[1]
    with torch.no_grad():
        conv.log_S.zero_()
        conv.L.copy_(torch.eye(channels))
        conv.U.zero_()
    block.flows[2].data_dep_init_done.fill_(1.0)
    return block


def test_glow_sigmoid_coupling_has_no_identity() -> None:
    """At normflows' zero init the 'sigmoid' factor is sigmoid(2), not 1: each scaled entry
    adds d^2 - 1 - 2 log d with d = sigmoid(2) (about 0.029); nothing else contributes."""
    block = glow_block()
    x = torch.randn(3, 4, 2, 2)
    attach(block)
    block.inverse(x)
    got = klj_reg.penalty(block, x, alpha=1.0, normaliser="none")
    d = torch.sigmoid(torch.tensor(2.0))
    assert got.item() == pytest.approx(8 * (d**2 - 1 - 2 * d.log()).item(), rel=1e-10)


def test_glow_block_records_coupling_conv_and_act_norm() -> None:
    block = noisy(glow_block(), 0.2)
    x = torch.randn(3, 4, 2, 2)
    recs = records(block, lambda: block.inverse(x))
    assert {r.kind for r in recs.values()} == {"AffineCoupling", "Invertible1x1Conv", "ActNorm"}
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(total, block.inverse(x)[1])
    for rec in recs.values():
        assert_log_det(rec, rec.log_det, own=True)  # type: ignore[arg-type]


def multiscale_glow(levels: int = 2, classes: int = 3) -> nn.Module:
    """normflows' Glow recipe, tiny: input (2, 4, 4), one GlowBlock per level."""
    shape = (2, 4, 4)
    q0, flows, merges = [], [], []
    for i in range(levels):
        channels = shape[0] * 2 ** (levels + 1 - i)
        flows.append([nf.flows.GlowBlock(channels, 8), nf.flows.Squeeze()])
        if i > 0:
            merges.append(nf.flows.Merge())
            scale = 2 ** (levels - i)
            latent = (shape[0] * scale, shape[1] // scale, shape[2] // scale)
        else:
            latent = (channels, shape[1] // 2**levels, shape[2] // 2**levels)
        q0.append(nf.distributions.ClassCondDiagGaussian(latent, classes))
    return nf.MultiscaleFlow(q0, flows, merges)


def test_multiscale_glow() -> None:
    model = multiscale_glow()
    x, y = torch.rand(4, 2, 4, 4), torch.tensor([0, 1, 2, 1])
    model.forward_kld(x, y)  # ActNorm initialisation
    noisy(model, 0.1)
    recs = records(model, lambda: model.forward_kld(x, y))
    assert len(recs) == 6  # coupling, 1x1 convolution, ActNorm per level
    _, log_det = model.inverse_and_log_det(x)
    klj_reg.clear(model)  # not a pass to train on
    total = sum(implied_log_det(r) for r in recs.values())
    torch.testing.assert_close(torch.broadcast_to(total, log_det.shape), log_det)
    model.zero_grad()
    model.forward_kld(x, y)
    klj_reg.penalty(model, x, alpha=1e-2).backward()
    for level in model.flows:
        glow = level[0]
        param_map = glow.flows[0].flows[1].param_map
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in param_map.parameters())
        assert glow.flows[1].log_S.grad.abs().sum() > 0
        assert glow.flows[2].s.grad.abs().sum() > 0
    capture = klj_reg.attach(model)
    model.sample(2, y=torch.tensor([0, 2]))
    assert capture.records == {} and all(s.state == {} for s in capture.sites.values())
    with pytest.warns(UserWarning, match="ran its own"):
        own = klj_reg.penalty(model, x, alpha=1e-2)  # via the runner (inverse_and_log_det)
    model.forward_kld(x, y)
    torch.testing.assert_close(own, klj_reg.penalty(model, x, alpha=1e-2))


def test_version_drift_is_caught_by_the_layer_log_det() -> None:
    block = nf.flows.AffineCouplingBlock(coupling_net((6,), "channel"), scale_map="exp")
    x = torch.randn(4, 6)
    attach(block)
    block.flows[1].scale_map = "sigmoid"  # the layer now computes what the adapter does not
    block.inverse(x)
    with pytest.raises(klj_reg.AdapterMismatchError, match="AffineCoupling"):
        klj_reg.penalty(block, x, alpha=1e-2)
