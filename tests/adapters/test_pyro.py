"""Pyro adapter: captured diagonals against exact Jacobians and pyro's own
``log_abs_det_jacobian``, for ``pyro.distributions.transforms`` used the Pyro way: a
``TransformedDistribution(base, [t1, t2, ...])`` whose transforms the user keeps in an
``nn.ModuleList`` (or a ``ComposeTransformModule``) to train them.

In Pyro a transform's forward call maps the base (latent) to the data; ``log_prob`` runs the
data-to-latent direction through ``t.inv``, so the factors of a training pass are those of
each transform's inverse.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from tests import truth
from tests.truth import assert_log_det, jacobian, jacobian_each, only

pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
import pyro.distributions.transforms as T  # noqa: E402
from pyro.nn import AutoRegressiveNN, DenseNN  # noqa: E402

pytestmark = pytest.mark.usefixtures("float64")  # pyro allocates some inputs in the default dtype

DIMS = [2, 3, 4, 5, 6]
BATCH = 4
BINS = 8

# ----------------------------------------------------------------------------- builders


def quadratic_spline_coupling(dim: int) -> nn.Module:
    """``T.spline_coupling`` with quadratic splines (the helper builds linear ones only)."""
    split = dim // 2
    rest = dim - split
    net = DenseNN(split, [10 * dim], param_dims=[rest * BINS, rest * BINS, rest * (BINS - 1)])
    return T.SplineCoupling(dim, split, net, count_bins=BINS, order="quadratic")


def quadratic_spline_autoregressive(dim: int) -> nn.Module:
    """``T.spline_autoregressive`` with quadratic splines (pyro 1.9's helper gives the network
    the four outputs of linear splines, which quadratic ones cannot unpack)."""
    arn = AutoRegressiveNN(dim, [10 * dim], param_dims=[BINS, BINS, BINS - 1])
    return T.SplineAutoregressive(dim, arn, count_bins=BINS, order="quadratic")


def batch_norm(dim: int) -> nn.Module:
    """``T.batchnorm`` in eval mode, with moving statistics and a gamma away from 1 (in
    training mode its Jacobian couples the samples: tested on its own below)."""
    layer = T.batchnorm(dim)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 2.0)
        layer.moving_mean.normal_()
        layer.moving_variance.uniform_(0.5, 2.0)
    return layer.eval()


BUILD: dict[str, Callable[[int], nn.Module]] = {
    "affine_autoregressive": T.affine_autoregressive,
    "affine_autoregressive_stable": partial(T.affine_autoregressive, stable=True),
    "affine_coupling": T.affine_coupling,
    "spline_linear": T.spline,
    "spline_quadratic": partial(T.spline, order="quadratic"),
    "spline_coupling_linear": T.spline_coupling,
    "spline_coupling_quadratic": quadratic_spline_coupling,
    "spline_autoregressive_linear": T.spline_autoregressive,
    "spline_autoregressive_quadratic": quadratic_spline_autoregressive,
    "batch_norm": batch_norm,
}
"""Every supported transform, by name: ``build(dim)``."""

SPLINES = (T.Spline, T.SplineCoupling, T.SplineAutoregressive)

CASES = [
    pytest.param(
        kind,
        dim,
        id=f"{kind}-{dim}",
        # the exact Jacobian of an autoregressive spline's inverse (D network passes), one
        # sample and one output at a time
        marks=[pytest.mark.slow] if kind.startswith("spline_autoregressive") and dim >= 4 else [],
    )
    for kind in BUILD
    for dim in DIMS
]
"""Every supported transform at every D."""


def randomise(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Non-trivial random weights, well away from the identity (batch norm keeps its own)."""
    if isinstance(module, T.BatchNorm):
        return module
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def build(kind: str, dim: int) -> nn.Module:
    return randomise(BUILD[kind](dim))


def base(dim: int) -> dist.Distribution:
    return dist.Normal(torch.zeros(dim), torch.ones(dim)).to_event(1)


# ----------------------------------------------------------------------------- truth


def data_to_latent(t: Any) -> Callable[[Tensor], Tensor]:
    """The transform's data-to-latent map (its inverse), uncached: what ``log_prob`` runs."""
    return lambda y: t._inverse(y)


def exact_jacobian(t: Any, y: Tensor) -> Tensor:
    """Per-sample Jacobian ``(B, D, D)`` of ``y -> t.inv(y)`` (torch.func; splines, which
    branch on data and index by masks, one sample at a time with autograd)."""
    if isinstance(t, SPLINES):
        return jacobian_each(data_to_latent(t), y)
    return jacobian(data_to_latent(t), y)


def allowed(t: Any, dim: int) -> Tensor:
    """Where the inverse's Jacobian may be non-zero: triangular in the transform's order."""
    eye = torch.eye(dim, dtype=torch.bool)
    arn = getattr(t, "arn", None)
    if arn is not None:  # autoregressive: x_i depends on y_j earlier in the order
        rank = torch.empty(dim, dtype=torch.long)
        rank[arn.permutation] = torch.arange(dim)
        return (rank[None, :] < rank[:, None]) | eye
    split = getattr(t, "split_dim", None)
    if split is not None:  # coupling: the second part depends on the first
        index = torch.arange(dim)
        return ((index[None, :] < split) & (index[:, None] >= split)) | eye
    return eye  # elementwise


def assert_pattern(jac: Tensor, pattern: Tensor) -> None:
    torch.testing.assert_close(jac * ~pattern, torch.zeros_like(jac), atol=1e-10, rtol=0)


def captured(record: klj_reg.LayerRecord, batch: int, dim: int) -> Tensor:
    """The record's log|d| per sample, ``(batch, dim)``: every factor's entries (a factor
    shared by the batch expanded to it), then zeros for the entries left out (d = 1)."""
    flat = torch.cat(
        [
            f.log_abs_d()
            .reshape(-1 if f.batch > 1 else 1, f.selected()[0].numel())
            .expand(batch, -1)
            .repeat_interleave(f.repeat, 1)
            for f in record.factors
        ],
        1,
    )
    assert flat.shape[1] <= dim
    return torch.cat([flat, flat.new_zeros(batch, dim - flat.shape[1])], 1)


def own_log_det(t: Any, y: Tensor) -> Tensor:
    """The data-to-latent log-determinant pyro's ``log_prob`` uses: ``-log_abs_det_jacobian``
    of the forward map at ``(t.inv(y), y)``, summed over the event."""
    x = t.inv(y)
    ladj = t.log_abs_det_jacobian(x, y)
    return -(ladj.sum(-1) if t.domain.event_dim == 0 else ladj)  # elementwise: summed


def klj(log_abs: Tensor) -> Tensor:
    """KLJ per sample of a diagonal given by log|d|: sum(d^2 - 1 - 2 log|d|)."""
    return ((2 * log_abs).exp() - 1 - 2 * log_abs).sum(1)


def exact_klj(transforms: list[Any], y: Tensor) -> Tensor:
    """The penalty by hand (alpha = 1, per sample, mean over the batch): the KLJ of each
    layer's exact inverse-Jacobian diagonal, at the point ``log_prob`` evaluates it."""
    total = torch.zeros(y.shape[0])
    h = y
    for t in reversed(transforms):
        if isinstance(t, nn.Module) and not isinstance(t, T.Householder):
            jac = exact_jacobian(t, h)
            total = total + klj(torch.diagonal(jac, dim1=1, dim2=2).abs().log())
        with torch.no_grad():
            h = t._inverse(h)
    return total.mean()


# ----------------------------------------------------------------------------- each transform


@pytest.mark.parametrize(("kind", "dim"), CASES)
def test_each_transform_records_its_exact_inverse_diagonal(kind: str, dim: int) -> None:
    t = build(kind, dim)
    model = nn.ModuleList([t])
    flow = dist.TransformedDistribution(base(dim), [t])
    y = 1.5 * torch.randn(BATCH, dim)
    rec = only(truth.records(model, lambda: flow.log_prob(y), detach=True))
    assert rec.dim == dim
    # pyro's own log-det (from the pass's cache), which the capture checks the factors against
    assert_log_det(rec, own_log_det(t, y), own=True)
    jac = exact_jacobian(t, y)
    assert_pattern(jac, allowed(t, dim))  # triangular: its diagonal is its determinant
    exact = torch.diagonal(jac, dim1=1, dim2=2).abs().log()
    torch.testing.assert_close(exact.sum(1), torch.linalg.slogdet(jac)[1])
    # Entries compared as sets per sample: the KLJ is a sum over them (SplineCoupling keeps
    # its two halves' derivatives in the other order).
    got = captured(rec, BATCH, dim)
    torch.testing.assert_close(got.sort(1).values, exact.sort(1).values)
    assert exact.abs().max() > 0.05  # the test is not at the identity


@pytest.mark.parametrize(("kind", "dim"), CASES)
def test_each_transform_penalty_is_the_klj_of_its_exact_diagonal(kind: str, dim: int) -> None:
    t = build(kind, dim)
    model = nn.ModuleList([t])
    truth.attach(model)
    flow = dist.TransformedDistribution(base(dim), [t])
    y = 1.5 * torch.randn(BATCH, dim)
    flow.log_prob(y)
    got = klj_reg.penalty(model, y, alpha=1.0, normaliser="none")
    klj_reg.detach(model)
    jac = exact_jacobian(t, y)
    expected = klj(torch.diagonal(jac, dim1=1, dim2=2).abs().log()).mean()
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_uses_the_statistics_pyro_uses(training: bool) -> None:
    dim = 4
    layer = batch_norm(dim).train(training)
    model = nn.ModuleList([layer])
    flow = dist.TransformedDistribution(base(dim), [layer])
    y = 2 * torch.randn(16, dim) + 1
    moving = layer.moving_variance.clone()
    rec = only(truth.records(model, lambda: flow.log_prob(y), detach=True))
    assert_log_det(rec, own_log_det(layer, y), own=True)
    # With the statistics frozen (those pyro's log-det assumes: the batch's in training, the
    # moving ones in eval) the inverse is diagonal.
    mean, var = (y.mean(0), y.var(0)) if training else (layer.moving_mean, moving)
    gamma, beta = layer.constrained_gamma.detach(), layer.beta.detach()

    def frozen(yy: Tensor) -> Tensor:
        return (yy - mean) * gamma / torch.sqrt(var + layer.epsilon) + beta

    jac = jacobian(frozen, y)
    torch.testing.assert_close(
        jac, torch.diag_embed(torch.diagonal(jac, dim1=1, dim2=2))
    )  # diagonal
    exact = torch.diagonal(jac, dim1=1, dim2=2).abs().log()
    torch.testing.assert_close(captured(rec, 16, dim), exact)


# ----------------------------------------------------------------------------- whole flows


def mixed(dim: int) -> list[Any]:
    """Every supported kind in one flow, with permutations and Householder layers (both
    volume-preserving: no KLJ term) between them; the Pyro way: a plain list."""
    layers: list[Any] = []
    for kind in BUILD:
        layers += [randomise(BUILD[kind](dim), 0.15), T.permute(dim)]
    layers.insert(3, randomise(T.householder(dim, count_transforms=2)))
    return layers


@pytest.mark.slow  # the exact Jacobian of every layer of a flow of ten
@pytest.mark.parametrize("dim", DIMS)
def test_module_list_flow_penalty_is_the_klj_of_every_layer(dim: int) -> None:
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # permutations and Householder are neutral: no warning
        truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = 1.5 * torch.randn(BATCH, dim)
    log_p = flow.log_prob(y)
    assert torch.isfinite(log_p).all()
    got = klj_reg.penalty(modules, y, alpha=1.0, normaliser="none")
    klj_reg.detach(modules)
    torch.testing.assert_close(got, exact_klj(layers, y))


@pytest.mark.slow  # the exact Jacobian of every layer of a flow of ten
@pytest.mark.parametrize("single", [True, False], ids=["transform", "list"])
def test_compose_transform_module_is_a_model(single: bool) -> None:
    dim = 4
    layers = mixed(dim)
    composed = T.ComposeTransformModule(layers)
    truth.attach(composed)
    flow = dist.TransformedDistribution(base(dim), composed if single else [composed])
    y = 1.5 * torch.randn(BATCH, dim)
    flow.log_prob(y)
    got = klj_reg.penalty(composed, y, alpha=1.0, normaliser="none")
    klj_reg.detach(composed)
    torch.testing.assert_close(got, exact_klj(layers, y))


def test_records_every_captured_layer_once_and_match_pyros_log_prob() -> None:
    dim = 5
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    capture = truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = torch.randn(BATCH, dim)
    log_p = flow.log_prob(y)
    recs = capture.records
    captured_names = {str(i) for i, m in enumerate(modules) if not isinstance(m, T.Householder)}
    assert set(recs) == captured_names
    # the factors' log-dets, the neutral layers' (zero) and the base density give log_prob
    implied = sum(truth.implied_log_det(r).expand(BATCH) for r in recs.values())
    with torch.no_grad():
        z = y
        for t in reversed(layers):
            z = t._inverse(z)
    torch.testing.assert_close(log_p, base(dim).log_prob(z) + implied)


def hypernet(t: nn.Module) -> nn.Module | None:
    """The network that computes a transform's scales or spline parameters, if any."""
    if isinstance(t, T.SplineCoupling):
        return t.upper_spline.nn
    for name in ("arn", "nn"):
        net = getattr(t, name, None)
        if isinstance(net, nn.Module):
            return net
    return None


def test_penalty_backward_reaches_every_hypernetwork_and_tau_sees_them() -> None:
    dim = 4
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    capture = truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = torch.randn(BATCH, dim)
    flow.log_prob(y)
    klj_reg.penalty(modules, y, alpha=1e-2).backward()
    nets = [n for n in map(hypernet, modules) if n is not None]
    assert len(nets) == 7  # 2 affine autoregressive, coupling, 2 spline couplings, 2 spline AR
    weights = {id(p) for n in nets for p in n.parameters() if p.dim() >= 2}
    assert {id(p) for p in capture.subnet_parameters()} == weights  # what tau regularises
    for net in nets:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    for m in modules:  # the elementwise splines' and batch norm's own parameters too
        if isinstance(m, (T.Spline, T.BatchNorm)):
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


def test_no_second_pass_of_any_network() -> None:
    dim = 4
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    nets = [m for m in modules.modules() if isinstance(m, (AutoRegressiveNN, DenseNN))]
    counts = [0] * len(nets)
    for i, net in enumerate(nets):

        def count(*_: Any, i: int = i) -> None:
            counts[i] += 1

        net.register_forward_hook(count)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = torch.randn(BATCH, dim)
    flow.log_prob(y)
    plain = list(counts)
    counts[:] = [0] * len(nets)
    truth.attach(modules)
    loss = -flow.log_prob(y).mean() + klj_reg.penalty(modules, y, alpha=1e-2)
    loss.backward()
    assert counts == plain


def test_sampling_records_nothing() -> None:
    dim = 4
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    capture = truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    with torch.no_grad():
        flow.sample((8,))
    flow.rsample((8,))
    assert capture.records == {}


def test_trains_in_float32_with_the_penalty() -> None:
    torch.set_default_dtype(torch.float32)
    dim = 3
    layers = [
        T.affine_autoregressive(dim),
        T.permute(dim),
        T.spline_coupling(dim),
        T.batchnorm(dim),
        T.affine_autoregressive(dim, stable=True),
    ]
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    klj_reg.attach(modules)
    truth.detach_later(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    optimizer = torch.optim.Adam(modules.parameters(), lr=1e-2)
    for _ in range(3):
        x = torch.randn(64, dim) * torch.tensor([1.0, 2.0, 0.5]) + 1.0
        loss = -flow.log_prob(x).mean() + klj_reg.penalty(modules, x, alpha=1.0)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------- neutral and unsupported


def test_householder_and_permutations_are_neutral() -> None:
    dim = 4
    householder = randomise(T.householder(dim, count_transforms=3))
    layers = [T.affine_autoregressive(dim), householder, T.permute(dim)]
    modules = nn.ModuleList([layers[0], householder])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        capture = truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = torch.randn(BATCH, dim)
    flow.log_prob(y)
    assert set(capture.records) == {"0"}
    x = householder.inv(y)
    ladj = householder.log_abs_det_jacobian(x, y)
    assert torch.equal(ladj, torch.zeros_like(ladj))  # volume-preserving, orthogonal


UNSUPPORTED: dict[str, Callable[[int], nn.Module]] = {
    "Planar": T.planar,
    "Radial": T.radial,
    "Sylvester": T.sylvester,  # a subclass of Householder, which is neutral: it is not
    "Polynomial": T.polynomial,
    "BlockAutoregressive": T.block_autoregressive,
    "NeuralAutoregressive": T.neural_autoregressive,
    "MatrixExponential": T.matrix_exponential,
    "ConditionalAffineAutoregressive": partial(T.conditional_affine_autoregressive, context_dim=2),
}


@pytest.mark.parametrize("name", list(UNSUPPORTED))
def test_unsupported_transforms_are_named_at_attach(name: str) -> None:
    dim = 4
    modules = nn.ModuleList([T.affine_autoregressive(dim), UNSUPPORTED[name](dim)])
    with pytest.warns(UserWarning, match=rf"does not regularise.*\b1 \({name}\)"):
        truth.attach(modules)


def test_only_unsupported_transforms_is_an_error_naming_them() -> None:
    modules = nn.ModuleList([T.planar(4), T.radial(4)])
    with pytest.raises(klj_reg.UnsupportedModelError, match="Planar"):
        truth.attach(modules)


# ----------------------------------------------------------------------------- self-check


def test_a_pyro_that_computes_the_log_det_differently_is_caught(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = T.AffineAutoregressive.log_abs_det_jacobian

    def drifted(self: Any, x: Tensor, y: Tensor) -> Tensor:
        return original(self, x, y) + 0.3  # a pyro version that computes the layer otherwise

    monkeypatch.setattr(T.AffineAutoregressive, "log_abs_det_jacobian", drifted)
    dim = 4
    t = build("affine_autoregressive", dim)
    modules = nn.ModuleList([t])
    truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), [t])
    y = torch.randn(BATCH, dim)
    with pytest.raises(klj_reg.AdapterMismatchError, match="pyro"):
        flow.log_prob(y)
        klj_reg.penalty(modules, y, alpha=1e-2)


def test_a_pyro_that_caches_no_log_scale_is_an_error_not_a_stale_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    original = T.AffineCoupling._inverse

    def uncached(self: Any, y: Tensor) -> Tensor:
        x = original(self, y)
        self._cached_log_scale = None  # log_abs_det_jacobian then recomputes it
        return x

    monkeypatch.setattr(T.AffineCoupling, "_inverse", uncached)
    dim = 4
    t = build("affine_coupling", dim)
    modules = nn.ModuleList([t])
    truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), [t])
    y = torch.randn(BATCH, dim)
    with pytest.raises(klj_reg.AdapterMismatchError, match="pyro"):
        flow.log_prob(y)
        klj_reg.penalty(modules, y, alpha=1e-2)


# ----------------------------------------------------------------------------- passes


def test_a_single_transform_is_a_model_and_its_pass_is_known_by_its_input() -> None:
    dim = 4
    t = build("affine_autoregressive", dim)
    truth.attach(t)
    flow = dist.TransformedDistribution(base(dim), [t])
    for _ in range(2):
        y = torch.randn(BATCH, dim)
        flow.log_prob(y)
        got = klj_reg.penalty(t, y, alpha=1.0, normaliser="none")
        torch.testing.assert_close(got, exact_klj([t], y))


def test_the_penalty_runs_the_transforms_inverse_when_no_pass_was_captured() -> None:
    dim = 3
    t = build("spline_coupling_linear", dim)
    truth.attach(t)
    y = torch.randn(BATCH, dim)
    with pytest.warns(UserWarning, match="ran its own"):
        own = klj_reg.penalty(t, y, alpha=1.0, normaliser="none")
    klj_reg.detach(t)
    torch.testing.assert_close(own, exact_klj([t], y))


@pytest.mark.parametrize("shape", [(2, 3), ()], ids=["batch-shape", "one-sample"])
def test_batch_shapes_are_flattened(shape: tuple[int, ...]) -> None:
    dim = 4
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)  # batch norm in eval mode
    y = torch.randn(*shape, dim)
    flow.log_prob(y)
    shaped = klj_reg.penalty(modules, y, alpha=1.0, normaliser="none")
    flat = y.reshape(-1, dim)
    flow.log_prob(flat)
    torch.testing.assert_close(shaped, klj_reg.penalty(modules, flat, alpha=1.0, normaliser="none"))


def test_sampling_passes_are_not_read() -> None:
    modules = nn.ModuleList([T.affine_autoregressive(3)])
    with pytest.raises(klj_reg.UnsupportedModelError, match="pyro adapter reads data-to-latent"):
        klj_reg.attach(modules, direction="sample")


def test_a_conditioned_transform_is_read_and_its_network_is_no_subnet() -> None:
    dim, context = 3, 2
    conditional = randomise(T.conditional_affine_autoregressive(dim, context))
    t = conditional.condition(torch.randn(context))  # an AffineAutoregressive on a partial
    capture = truth.attach(t)
    assert list(capture.subnet_parameters()) == []  # its weights are the conditional's
    flow = dist.TransformedDistribution(base(dim), [t])
    y = torch.randn(BATCH, dim)
    flow.log_prob(y)
    got = klj_reg.penalty(t, y, alpha=1.0, normaliser="none")
    klj_reg.detach(t)
    torch.testing.assert_close(got, exact_klj([t], y))


@pytest.mark.slow  # the exact Jacobian of every layer of a flow of ten
def test_log_prob_of_samples_reads_the_data_to_latent_maps_from_pyros_caches() -> None:
    dim = 4
    layers = mixed(dim)
    modules = nn.ModuleList([t for t in layers if isinstance(t, nn.Module)])
    truth.attach(modules)
    flow = dist.TransformedDistribution(base(dim), layers)
    y = flow.rsample((BATCH,))  # records nothing
    flow.log_prob(y)  # each inverse returns what its forward call cached
    got = klj_reg.penalty(modules, y, alpha=1.0, normaliser="none")
    klj_reg.detach(modules)
    torch.testing.assert_close(got, exact_klj(layers, y.detach()))
