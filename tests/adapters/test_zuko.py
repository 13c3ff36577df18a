"""zuko adapter: captured diagonals against exact Jacobians and zuko's own ladj."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from tests.truth import assert_log_det, implied_log_det, jacobian, only, records

zuko = pytest.importorskip("zuko")

from zuko.flows import (  # noqa: E402
    MAF,
    NSF,
    ElementWiseTransform,
    FFJTransform,
    Flow,
    GeneralCouplingTransform,
    MaskedAutoregressiveTransform,
    RealNVP,
    UnconditionalDistribution,
    UnconditionalTransform,
)
from zuko.lazy import LazyInverse, Unconditional  # noqa: E402
from zuko.transforms import (  # noqa: E402
    AutoregressiveTransform,
    ComposedTransform,
    DependentTransform,
    LULinearTransform,
    MonotonicAffineTransform,
    MonotonicRQSTransform,
    PermutationTransform,
    RotationTransform,
    SoftclipTransform,
)

F64 = torch.float64
FEATURES = 6
HIDDEN = {"hidden_features": [16, 16]}
RQS = {"univariate": MonotonicRQSTransform, "shapes": [(5,), (5,), (4,)]}
UNIVARIATES = {"affine": {}, "rqs": RQS}


def randomise(module: nn.Module, std: float = 0.5) -> nn.Module:
    """Non-trivial random weights, well away from the identity."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)
    return module


def identity_init(module: nn.Module) -> nn.Module:
    """Zero the last layer of every hyper-network: every univariate becomes the identity."""
    for sub in module.modules():
        hyper = getattr(sub, "hyper", None)
        if hyper is not None:
            nn.init.zeros_(hyper[-1].weight)
            nn.init.zeros_(hyper[-1].bias)
    return module


def batch(context: int, n: int = 4) -> tuple[Tensor, Tensor | None]:
    x = torch.randn(n, FEATURES, dtype=F64)
    return x, (torch.randn(n, context, dtype=F64) if context else None)


def lazy_jacobian(t: nn.Module, x: Tensor, c: Tensor | None) -> Tensor:
    """Exact per-sample Jacobian of x -> t(c)(x), shape (B, D, D)."""
    if c is None:
        return jacobian(lambda xx: t()(xx), x)
    return jacobian(lambda xx, cc: t(cc)(xx), x, c)


def diagonal(record: klj_reg.LayerRecord, positions: Tensor | None = None) -> Tensor:
    """log|d| of a one-factor record on the full diagonal (pass-through entries 0)."""
    (factor,) = record.factors
    log_abs = factor.log_abs_d()
    full = torch.zeros(log_abs.shape[0], FEATURES, dtype=log_abs.dtype)
    full[:, positions if positions is not None else slice(None)] = log_abs
    return full


def assert_pattern(jac: Tensor, allowed: Tensor) -> None:
    """The Jacobian vanishes outside ``allowed``: it is triangular in the layer's order."""
    torch.testing.assert_close(jac * ~allowed, torch.zeros_like(jac), atol=1e-10, rtol=0)


def check_layer(t: nn.Module, x: Tensor, c: Tensor | None, allowed: Tensor, positions: Any) -> None:
    """Captured diagonal == exact Jacobian diagonal; sum log|d| == the layer's own ladj."""
    jac = lazy_jacobian(t, x, c)
    assert_pattern(jac, allowed)
    rec = only(records(t, lambda: t(c).call_and_ladj(x)))
    log_abs = diagonal(rec, positions)
    exact = torch.diagonal(jac, dim1=1, dim2=2).abs().log()
    torch.testing.assert_close(log_abs, exact)
    _, ladj = t(c).call_and_ladj(x)
    assert_log_det(rec, ladj, own=True)
    torch.testing.assert_close(ladj, torch.linalg.slogdet(jac)[1])
    assert log_abs.abs().max() > 0.05  # the test is not at the identity


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("passes", [None, 2])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("univariate", list(UNIVARIATES))
def test_masked_autoregressive(
    univariate: str, context: int, passes: int | None, inverse: bool
) -> None:
    kwargs = {**UNIVARIATES[univariate], **HIDDEN}
    order = torch.randperm(FEATURES)
    maf = MaskedAutoregressiveTransform(FEATURES, context, passes, order, **kwargs)
    maf = randomise(maf).double()
    t = LazyInverse(maf) if inverse else maf
    x, c = batch(context)
    rank = maf.order
    allowed = (rank[None, :] < rank[:, None]) | torch.eye(FEATURES, dtype=torch.bool)
    check_layer(t, x, c, allowed, None)


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("univariate", list(UNIVARIATES))
def test_general_coupling(univariate: str, context: int, inverse: bool) -> None:
    mask = torch.tensor([True, False, False, True, False, True])
    kwargs = {**UNIVARIATES[univariate], **HIDDEN}
    coupling = randomise(GeneralCouplingTransform(FEATURES, context, mask, **kwargs)).double()
    t = LazyInverse(coupling) if inverse else coupling
    x, c = batch(context)
    allowed = (mask[None, :] & ~mask[:, None]) | torch.eye(FEATURES, dtype=torch.bool)
    check_layer(t, x, c, allowed, (~mask).nonzero().squeeze(1))


@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("context", [0, 3])
@pytest.mark.parametrize("univariate", list(UNIVARIATES))
def test_element_wise(univariate: str, context: int, inverse: bool) -> None:
    kwargs = {**UNIVARIATES[univariate], **(HIDDEN if context else {})}
    elementwise = randomise(ElementWiseTransform(FEATURES, context, **kwargs)).double()
    t = LazyInverse(elementwise) if inverse else elementwise
    x, c = batch(context)
    check_layer(t, x, c, torch.eye(FEATURES, dtype=torch.bool), None)


@pytest.mark.parametrize("inverse", [False, True])
def test_unconditional_elementwise_transforms(inverse: bool) -> None:
    shift, scale = torch.randn(FEATURES, dtype=F64), 2 * torch.randn(FEATURES, dtype=F64)
    affine = UnconditionalTransform(MonotonicAffineTransform, shift, scale)
    softclip = UnconditionalTransform(SoftclipTransform, bound=2.0)
    x, _ = batch(0)
    for t in (affine, softclip):
        lazy = LazyInverse(t) if inverse else t
        xx = x.clamp(-1.5, 1.5) if inverse and t is softclip else x  # inside the codomain
        jac = lazy_jacobian(lazy, xx, None)
        rec = only(records(lazy, lambda lz=lazy, xx=xx: lz().call_and_ladj(xx)))
        exact = torch.diagonal(jac, dim1=1, dim2=2).abs().log()
        torch.testing.assert_close(diagonal(rec), exact)
        _, ladj = lazy().call_and_ladj(xx)
        assert_log_det(rec, ladj.sum(-1))
    # the learnable scale gets gradients from the penalty
    klj_reg.attach(affine)
    affine().call_and_ladj(x)
    klj_reg.penalty(affine, x, alpha=1e-2).backward()
    assert affine._1.grad.abs().sum() > 0


@pytest.mark.parametrize("inverse", [False, True])
def test_lu_linear_records_the_diagonal_of_l(inverse: bool) -> None:
    lu = torch.randn(FEATURES, FEATURES, dtype=F64) + 2 * torch.eye(FEATURES, dtype=F64)
    t = UnconditionalTransform(LULinearTransform, lu)
    lazy = LazyInverse(t) if inverse else t
    x, _ = batch(0)
    rec = only(records(lazy, lambda: lazy().call_and_ladj(x)))
    (factor,) = rec.factors
    jac = lazy_jacobian(t, x, None)[0]  # forward map L U, constant
    # For J = L U with unit-diagonal U: L_kk = det J[:k, :k] / det J[:k-1, :k-1].
    minors = torch.stack([torch.linalg.det(jac[:k, :k]) for k in range(1, FEATURES + 1)])
    l_diag = minors / torch.cat([minors.new_ones(1), minors[:-1]])
    expected = -l_diag.abs().log() if inverse else l_diag.abs().log()
    torch.testing.assert_close(factor.log_abs_d().reshape(-1), expected)
    _, ladj = lazy().call_and_ladj(x)
    assert_log_det(rec, ladj)


def test_orthogonal_layers_are_neutral() -> None:
    order = torch.randperm(FEATURES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        perm = Unconditional(PermutationTransform, order, buffer=True)
    layers = [
        perm,
        UnconditionalTransform(PermutationTransform, order, buffer=True),
        UnconditionalTransform(RotationTransform, torch.randn(FEATURES, FEATURES)),
        LazyInverse(UnconditionalTransform(RotationTransform, torch.randn(FEATURES, FEATURES))),
    ]
    x = torch.randn(4, FEATURES)
    for layer in layers:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            capture = klj_reg.attach(layer)
        z, ladj = layer().call_and_ladj(x)
        assert capture.records == {}
        assert torch.equal(ladj, torch.zeros_like(ladj))


def test_unreadable_transform_warns_once() -> None:
    def composed(order: Tensor) -> ComposedTransform:
        return ComposedTransform(PermutationTransform(order), PermutationTransform(order))

    layer = UnconditionalTransform(composed, torch.randperm(FEATURES), buffer=True)
    klj_reg.attach(layer)
    x = torch.randn(4, FEATURES)
    with pytest.warns(UserWarning, match="does not regularise.*ComposedTransform"):
        layer().call_and_ladj(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer().call_and_ladj(x)


def mixed_flow(context: int) -> Flow:
    """Every captured kind in one flow, with neutral layers between them."""
    order = torch.randperm(FEATURES)
    transforms = [
        MaskedAutoregressiveTransform(FEATURES, context, **HIDDEN),
        UnconditionalTransform(PermutationTransform, order, buffer=True),
        MaskedAutoregressiveTransform(FEATURES, context, passes=3, **RQS, **HIDDEN),
        LazyInverse(MaskedAutoregressiveTransform(FEATURES, context, **HIDDEN)),
        UnconditionalTransform(RotationTransform, torch.randn(FEATURES, FEATURES)),
        GeneralCouplingTransform(FEATURES, context, **HIDDEN),
        LazyInverse(GeneralCouplingTransform(FEATURES, context, **RQS, **HIDDEN)),
        ElementWiseTransform(FEATURES, context, **(HIDDEN if context else {})),
        UnconditionalTransform(
            MonotonicAffineTransform, torch.randn(FEATURES), torch.randn(FEATURES)
        ),
    ]
    base = UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(FEATURES), torch.ones(FEATURES), buffer=True
    )
    return Flow(transforms, base)


CAPTURED = ["0", "2", "3", "5", "6", "7", "8"]


@pytest.mark.parametrize("context", [0, 3])
def test_whole_flow_records_every_layer_once_and_matches_its_ladj(context: int) -> None:
    flow = randomise(mixed_flow(context), 0.4).double()
    x, c = batch(context, 5)
    recs = records(flow, lambda: flow(c).log_prob(x))
    assert sorted(recs) == [f"transform.transforms.{i}" for i in CAPTURED]
    dist = flow(c)
    z, ladj = dist.transform.call_and_ladj(x)
    torch.testing.assert_close(sum(implied_log_det(r).expand(5) for r in recs.values()), ladj)
    torch.testing.assert_close(dist.log_prob(x), dist.base.log_prob(z) + ladj)
    for r in recs.values():
        if r.log_det is not None:
            assert_log_det(r, r.log_det)
    value = klj_reg.penalty(flow, x, alpha=1e-2)
    assert torch.isfinite(value) and value > 1e-4


@pytest.mark.parametrize("make", [MAF, NSF, RealNVP], ids=["MAF", "NSF", "RealNVP"])
@pytest.mark.parametrize("context", [0, 3])
def test_penalty_zero_at_identity_and_positive_otherwise(make: Any, context: int) -> None:
    x, c = batch(context, 8)
    flow = identity_init(make(FEATURES, context, transforms=3, **HIDDEN)).double()
    klj_reg.attach(flow)
    flow(c).log_prob(x)
    assert klj_reg.penalty(flow, x, alpha=1e-2).item() == pytest.approx(0.0, abs=1e-12)
    flow = randomise(make(FEATURES, context, transforms=3, **HIDDEN), 0.3).double()
    klj_reg.attach(flow)
    flow(c).log_prob(x)
    assert klj_reg.penalty(flow, x, alpha=1e-2).item() > 1e-4


def test_penalty_is_mean_of_klj_terms_over_the_exact_layer_diagonals() -> None:
    flow = randomise(MAF(FEATURES, 3, transforms=2, **HIDDEN), 0.4).double()
    x, c = batch(3, 5)
    klj_reg.attach(flow)
    flow(c).log_prob(x)
    got = klj_reg.penalty(flow, x, alpha=1.0, normaliser="none")
    total = torch.zeros(5, dtype=F64)
    h = x
    for layer in flow.transform.transforms:
        d = torch.diagonal(lazy_jacobian(layer, h, c), dim1=1, dim2=2)
        total = total + (d.square() - 1 - 2 * d.abs().log()).sum(1)
        with torch.no_grad():
            h = layer(c)(h)
    torch.testing.assert_close(got, total.mean())


def test_backward_reaches_every_hyper_network() -> None:
    flow = randomise(mixed_flow(3), 0.4).double()
    x, c = batch(3, 5)
    capture = klj_reg.attach(flow)
    flow(c).log_prob(x)
    klj_reg.penalty(flow, x, alpha=1e-2).backward()
    hypers = [m for m in flow.modules() if isinstance(getattr(m, "hyper", None), nn.Module)]
    assert len(hypers) == 6
    weights = {id(p) for m in hypers for p in m.hyper.parameters() if p.dim() >= 2}
    assert {id(p) for p in capture.subnet_parameters()} == weights  # what tau regularises
    for m in hypers:
        grads = [p.grad for p in m.hyper.parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), type(m).__name__


def test_sampling_records_nothing() -> None:
    flow = randomise(mixed_flow(3), 0.3)
    capture = klj_reg.attach(flow)
    c = torch.randn(4, 3)
    with torch.no_grad():
        x = flow(c).sample()
    assert capture.records == {}
    flow(c).rsample_and_log_prob()
    assert capture.records == {}
    flow(c).log_prob(x)
    assert len(capture.records) == len(CAPTURED)


def count_calls(modules: list[nn.Module]) -> list[int]:
    counts = [0] * len(modules)
    for i, m in enumerate(modules):

        def hook(*_: Any, i: int = i) -> None:
            counts[i] += 1

        m.register_forward_hook(hook)
    return counts


@pytest.mark.parametrize("context", [0, 3])
def test_training_step_runs_each_hyper_network_once(context: int) -> None:
    flow = randomise(NSF(FEATURES, context, transforms=3, **HIDDEN), 0.3)
    coupling = randomise(RealNVP(FEATURES, context, transforms=2, **HIDDEN), 0.3)
    for model in (flow, coupling):
        klj_reg.attach(model)
        counts = count_calls([t.hyper for t in model.transform.transforms])
        x = torch.randn(8, FEATURES)
        c = torch.randn(8, context) if context else None
        loss = -model(c).log_prob(x).mean() + klj_reg.penalty(model, x, alpha=1e-2)
        assert counts == [1] * len(counts)
        loss.backward()


def test_penalty_runs_its_own_pass_with_the_runner() -> None:
    flow = randomise(mixed_flow(3), 0.3).double()
    x, c = batch(3, 5)
    twin = copy.deepcopy(flow)
    klj_reg.attach(flow)
    flow(c).log_prob(x)
    after_user_pass = klj_reg.penalty(flow, x, alpha=1e-2)
    # once the user's passes are captured, the penalty refuses to run its own (issue 27);
    # on a model whose passes it has not captured yet, its own pass gives the same value
    with pytest.raises(klj_reg.CaptureError, match="refuses"):
        klj_reg.penalty(flow, x, context=c, alpha=1e-2)
    own = klj_reg.penalty(twin, x, context=c, alpha=1e-2)
    torch.testing.assert_close(own, after_user_pass)
    layer = randomise(GeneralCouplingTransform(FEATURES, 3, **HIDDEN), 0.4).double()
    own_layer = klj_reg.penalty(
        layer, x, context=c, alpha=1e-2
    )  # LazyTransform runner, on first use
    layer(c).call_and_ladj(x)
    torch.testing.assert_close(own_layer, klj_reg.penalty(layer, x, alpha=1e-2))


def test_exact_estimator_uses_the_runner() -> None:
    flow = randomise(MAF(FEATURES, 3, transforms=2, **HIDDEN), 0.3).double()
    x, c = batch(3, 5)
    exact = klj_reg.penalty(flow, x, context=c, estimator="exact", alpha=1.0, normaliser="none")
    jac = jacobian(lambda xx, cc: flow(cc).transform(xx), x, c)
    whole = jac.square().sum((1, 2)) - FEATURES - 2 * torch.linalg.slogdet(jac)[1]
    torch.testing.assert_close(exact, whole.mean())


def test_version_drift_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    original = AutoregressiveTransform.call_and_ladj

    def drifted(self: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        y, ladj = original(self, x)
        return y, ladj + 0.3  # a zuko version that computes the layer differently

    monkeypatch.setattr(AutoregressiveTransform, "call_and_ladj", drifted)
    flow = randomise(MAF(FEATURES, 0, transforms=2, **HIDDEN), 0.3)
    klj_reg.attach(flow)
    x = torch.randn(8, FEATURES)
    flow().log_prob(x)
    with pytest.raises(klj_reg.AdapterMismatchError, match="zuko"):
        klj_reg.penalty(flow, x, alpha=1e-2)


def test_missing_univariate_ladj_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    def meta_free(self: Any, x: Tensor) -> tuple[Tensor, Tensor]:  # never asks the univariate
        y = self(x)
        return y, torch.zeros_like(x[..., 0])

    monkeypatch.setattr(AutoregressiveTransform, "call_and_ladj", meta_free)
    flow = randomise(MAF(FEATURES, 0, transforms=1, **HIDDEN), 0.3)
    klj_reg.attach(flow)
    with pytest.raises(klj_reg.AdapterMismatchError, match="no elementwise"):
        flow().log_prob(torch.randn(3, FEATURES))


@pytest.mark.parametrize("build", [MAF, NSF])
def test_maf_and_coupling_layers_wrap_only_what_they_read(build: Callable[..., Flow]) -> None:
    """A MAF or coupling layer wraps its transform's class (META) and its univariate, and no
    other zuko class: an unattached ``DependentTransform`` or ``LULinearTransform`` runs its
    own methods. A univariate with zuko's generic ``call_and_ladj`` (affine) is watched
    through ``log_abs_det_jacobian`` alone; one with its own (the RQ spline) through both.
    The penalty stays exact either way (the other tests)."""
    flow = randomise(build(FEATURES, 0, transforms=2, **HIDDEN), 0.3)
    classes = {DependentTransform, LULinearTransform, MonotonicAffineTransform}
    classes.add(MonotonicRQSTransform)
    capture = klj_reg.attach(flow)
    x = torch.randn(3, FEATURES)
    flow().log_prob(x)  # (a univariate given as a partial is met, and wrapped, in the pass)
    # (this capture's patches: other live captures in the process may hold more)
    held = {(c, n) for c, n in capture.patches.held if c in classes}
    univariate = MonotonicAffineTransform if build is MAF else MonotonicRQSTransform
    expected = {(univariate, "log_abs_det_jacobian")}
    if build is NSF:
        expected.add((univariate, "call_and_ladj"))
    assert held == expected
    assert klj_reg.penalty(flow, x, alpha=1e-2).item() > 0
    klj_reg.detach(flow)
    assert not capture.patches.held


def test_continuous_flow_is_left_out_with_a_warning() -> None:
    transforms = [MaskedAutoregressiveTransform(FEATURES, 0, **HIDDEN), FFJTransform(FEATURES)]
    base = UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(FEATURES), torch.ones(FEATURES), buffer=True
    )
    with pytest.warns(UserWarning, match="FFJTransform"):
        klj_reg.attach(Flow(transforms, base))


def test_batch_shapes_are_flattened() -> None:
    flow = randomise(MAF(FEATURES, 3, transforms=2, **HIDDEN), 0.3)
    capture = klj_reg.attach(flow)
    x, c = torch.randn(2, 3, FEATURES), torch.randn(2, 3, 3)
    flow(c).log_prob(x)
    for r in capture.records.values():
        assert r.factors[0].source.shape == (6, FEATURES)
    flat = klj_reg.penalty(flow, x.reshape(6, FEATURES), alpha=1e-2)
    flow(c.reshape(6, 3)).log_prob(x.reshape(6, FEATURES))
    torch.testing.assert_close(flat, klj_reg.penalty(flow, x.reshape(6, FEATURES), alpha=1e-2))


def test_attach_then_compile_gives_the_same_loss() -> None:
    flow = randomise(MAF(FEATURES, 3, transforms=2, hidden_features=[8]), 0.3)
    klj_reg.attach(flow)
    x, c = torch.randn(8, FEATURES), torch.randn(8, 3)

    def nll(x: Tensor, c: Tensor) -> Tensor:
        return -flow(c).log_prob(x).mean()

    eager = nll(x, c) + klj_reg.penalty(flow, x, alpha=1e-2)
    compiled = torch.compile(nll, backend="aot_eager")
    value = compiled(x, c) + klj_reg.penalty(flow, x, alpha=1e-2)
    torch.testing.assert_close(value, eager)
    grads = torch.autograd.grad(value, list(flow.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def training_model(
    context: bool = False,
) -> tuple[nn.Module, Callable[[Tensor, Tensor | None], Tensor]]:
    """A small zuko flow on 6 features (MAF layer, NSF layer, affine coupling), optionally
    conditioned on 3 context features, and its usual training loss ``-log p(x | c)``
    (negative log-likelihood, mean over the batch; add ``klj_reg.penalty(flow, x)``)."""
    ctx = 3 if context else 0
    transforms = [
        MaskedAutoregressiveTransform(FEATURES, ctx, hidden_features=[32, 32]),
        MaskedAutoregressiveTransform(
            FEATURES,
            ctx,
            order=torch.arange(FEATURES).flip(0),
            univariate=partial(MonotonicRQSTransform, slope=1e-3),
            shapes=[(8,), (8,), (7,)],
            hidden_features=[32, 32],
        ),
        GeneralCouplingTransform(FEATURES, ctx, hidden_features=[32, 32]),
    ]
    base = UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(FEATURES), torch.ones(FEATURES), buffer=True
    )
    flow = Flow(transforms, base)

    def loss(x: Tensor, c: Tensor | None) -> Tensor:
        return -flow(c).log_prob(x).mean()

    return flow, loss


@pytest.mark.parametrize("context", [False, True])
def test_training_model_trains_with_the_penalty(context: bool) -> None:
    flow, loss_fn = training_model(context)
    klj_reg.attach(flow)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    x = torch.randn(32, FEATURES) * torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0, 1.0])
    c = torch.randn(32, 3) if context else None
    for _ in range(3):
        loss = loss_fn(x, c) + klj_reg.penalty(flow, x, alpha=1e-2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    assert len(klj_reg.attach(flow).sites) == 3


@pytest.mark.slow
def test_capture_adds_no_graph_break() -> None:
    x, c = torch.randn(8, FEATURES), torch.randn(8, 3)
    counts = []
    for attach in (False, True):
        torch.manual_seed(1)
        layers = [
            MaskedAutoregressiveTransform(FEATURES, 3, **RQS, hidden_features=[8]),
            LazyInverse(MaskedAutoregressiveTransform(FEATURES, 3, hidden_features=[8])),
            ElementWiseTransform(FEATURES, 3, hidden_features=[8]),
        ]
        flow = Flow(layers, MAF(FEATURES).base)
        if attach:
            klj_reg.attach(flow)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(lambda x, c, f=flow: -f(c).log_prob(x).mean())(x, c)
        counts.append(explanation.graph_break_count)  # zuko's own, if any
    assert counts[1] == counts[0]


@pytest.mark.parametrize("inverse", [False, True])
def test_attached_transforms_behave_like_unattached_ones_on_every_call_pattern(
    inverse: bool,
) -> None:
    """A transform's method kept and called again (``fn = flow().transform.call_and_ladj;
    fn(x); fn(x)``) works as unattached (it raised AttributeError: the decorated method held
    its transform weakly after its first call), and still records each call."""
    layer: nn.Module = MaskedAutoregressiveTransform(FEATURES, 0, **HIDDEN)
    flow = randomise(Flow([LazyInverse(layer) if inverse else layer], MAF(FEATURES).base))
    x = torch.randn(8, FEATURES)
    expected = flow().transform.call_and_ladj(x)
    capture = klj_reg.attach(flow)
    fn = flow().transform.call_and_ladj
    for _ in range(3):
        y, ladj = fn(x)
        torch.testing.assert_close((y, ladj), expected)
        assert len(capture.records) == 1
        klj_reg.clear(flow)
    t = flow().transform
    bound, inner = t.call_and_ladj, t.transforms[0].call_and_ladj
    del t
    torch.testing.assert_close(bound(x), expected)
    inner(x)
    klj_reg.detach(flow)


def test_a_transform_is_freed_with_its_pass_without_the_garbage_collector() -> None:
    import gc
    import weakref

    flow = randomise(
        Flow([MaskedAutoregressiveTransform(FEATURES, 0, **HIDDEN)], MAF(FEATURES).base)
    )
    klj_reg.attach(flow)
    x = torch.randn(8, FEATURES)
    gc.disable()
    try:
        dist = flow()
        seen = weakref.ref(dist.transform.transforms[0])
        dist.log_prob(x)
        del dist
        assert seen() is None  # no reference cycle keeps it (and its tensors) alive
    finally:
        gc.enable()
    klj_reg.penalty(flow, x, alpha=1e-2)
    klj_reg.detach(flow)
