"""The penalty inside the training loops people write: copies (EMA, SWA), saving, gradient
accumulation, validation passes, checkpointing, compile, empty batches, non-finite steps and
layers shared by several models, on every backend.

Each test compares with the *reference*: the penalty (value and gradient) computed right after
a plain forward pass of the same model on the same batch, nothing in between.
"""

from __future__ import annotations

import copy
import io
import pickle
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import klj_reg
from klj_reg.capture import get_capture
from tests.core.test_performance import BACKENDS, Loss, inputs, model_for


def noisy_model(backend: str, context: bool = False) -> tuple[nn.Module, Loss, int, int]:
    """A backend's training model away from the identity (so that the penalty and its
    gradient are not ~0), with data-dependent initialisations (ActNorm) done."""
    model, loss, dim, features = model_for(backend, context)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():  # FrEIA master keeps permutations as int64 parameters
                p.add_(0.2 * torch.randn_like(p))
    x, c = inputs(dim, features)
    loss(x, c)  # ActNorm-style layers initialise on their first pass
    return model, loss, dim, features


def params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def value_and_grads(value: Tensor, model: nn.Module) -> tuple[Tensor, list[Tensor]]:
    grads = torch.autograd.grad(value, params(model), allow_unused=True, retain_graph=True)
    return value.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(
        params(model), grads, strict=True)]  # fmt: skip


def reference(
    model: nn.Module, loss: Loss, x: Tensor, c: Tensor | None
) -> tuple[Tensor, list[Tensor]]:
    """The penalty right after a plain pass on ``x``."""
    klj_reg.clear(model)
    loss(x, c)
    return value_and_grads(klj_reg.penalty(model, x, alpha=1e-2), model)


def assert_same(got: tuple[Tensor, list[Tensor]], want: tuple[Tensor, list[Tensor]]) -> None:
    torch.testing.assert_close(got[0], want[0])
    assert want[0] > 0
    assert any(bool(g.abs().sum() > 0) for g in want[1])
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


# 1. Copies ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make_copy", ["deepcopy", "averaged"])
def test_a_copy_never_writes_into_the_original(backend: str, make_copy: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    want = reference(model, loss, x, c)
    twin = (
        copy.deepcopy(model)
        if make_copy == "deepcopy"
        else torch.optim.swa_utils.AveragedModel(model).module
    )
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():  # not FrEIA master's int64 permutations
                p.add_(0.3)  # the copy's pass would give another penalty
    loss(x, c)
    _call(twin, torch.randn_like(x), c)  # e.g. an EMA evaluation between forward and penalty
    assert get_capture(twin) is None
    assert_same(value_and_grads(klj_reg.penalty(model, x, alpha=1e-2), model), want)


def _call(model: nn.Module, x: Tensor, c: Tensor | None) -> Tensor:
    """A data-to-latent pass of any backend's model, as its loss does (the loss closures of
    the test models call their own model, not a copy)."""
    name = type(model).__module__.split(".")[0]
    if name == "FrEIA":
        z, log_det = model(x)
        return (0.5 * z.square().sum(1) - log_det).mean()
    if name == "nflows":
        return -model.log_prob(x, context=c).mean()
    if name == "normflows":
        return model.forward_kld(x) if c is None else model.forward_kld(x, context=c)
    return -model(c).log_prob(x).mean()


# 2. deepcopy at any point ---------------------------------------------------------------------


def test_deepcopy_after_a_forward_pass_gives_an_unattached_working_copy(backend: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    loss(x, c)  # records waiting for a penalty
    best = copy.deepcopy(model)  # e.g. keeping the best model after a validation pass
    assert get_capture(best) is None
    torch.testing.assert_close(_call(best, x, c), _call(model, x, c))
    klj_reg.attach(best)
    _call(best, x, c)
    torch.testing.assert_close(
        klj_reg.penalty(best, x, alpha=1e-2), klj_reg.penalty(model, x, alpha=1e-2)
    )


# 3. Saving ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_an_attached_model_saves_and_loads_unattached(backend: str, how: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    try:
        pickle.dumps(model)
    except Exception as error:  # e.g. FrEIA's AllInOneBlock keeps a lambda
        pytest.skip(f"{backend}'s own model does not pickle: {error}")
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    loss(x, c)  # records waiting for a penalty
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert get_capture(loaded) is None  # plainly not attached
    torch.testing.assert_close(_call(loaded, x, c), _call(model, x, c))
    klj_reg.attach(loaded)
    _call(loaded, x, c)
    torch.testing.assert_close(
        klj_reg.penalty(loaded, x, alpha=1e-2), klj_reg.penalty(model, x, alpha=1e-2)
    )


# 4. The latest pass does not win ----------------------------------------------------------------


def test_gradient_accumulation_reads_each_micro_batch(backend: str) -> None:
    """Each micro-batch's penalty right after its pass, summed: each reads its own pass."""
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    (x1, c1), (x2, c2) = inputs(dim, features), inputs(dim, features)
    want1, want2 = reference(model, loss, x1, c1), reference(model, loss, x2, c2)
    loss(x1, c1)
    got1 = value_and_grads(klj_reg.penalty(model, x1, alpha=1e-2), model)
    loss(x2, c2)
    got2 = value_and_grads(klj_reg.penalty(model, x2, alpha=1e-2), model)
    assert_same(got1, want1)
    assert_same(got2, want2)


def test_a_superseded_pass_raises_naming_the_cause(backend: str) -> None:
    """Two passes, then the penalty of the first: it was dropped when the second began (one
    unread grad-mode pass is kept, so that passes nobody reads hold no memory)."""
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    (x1, c1), (x2, c2) = inputs(dim, features), inputs(dim, features)
    want2 = reference(model, loss, x2, c2)
    loss(x1, c1)
    loss(x2, c2)
    with pytest.raises(klj_reg.CaptureError, match="dropped unread"):
        klj_reg.penalty(model, x1, alpha=1e-2)
    assert_same(value_and_grads(klj_reg.penalty(model, x2, alpha=1e-2), model), want2)


def test_a_validation_pass_in_between_changes_nothing(backend: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    val, val_c = inputs(dim, features)  # same size
    want = reference(model, loss, x, c)
    loss(x, c)
    with torch.no_grad():
        loss(val, val_c)
    assert_same(value_and_grads(klj_reg.penalty(model, x, alpha=1e-2), model), want)
    # ... and its own value, for logging, under no_grad
    loss(x, c)
    with torch.no_grad():
        loss(val, val_c)
        logged = klj_reg.penalty(model, val, alpha=1e-2)
    torch.testing.assert_close(logged, reference(model, loss, val, val_c)[0])


def test_x_of_another_batch_raises(backend: str) -> None:
    """An x of the pass's shape but other values never reads that pass."""
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    (x1, c1), (x2, _) = inputs(dim, features), inputs(dim, features)
    loss(x1, c1)
    with pytest.raises(klj_reg.CaptureError, match="not the batch"):
        klj_reg.penalty(model, x2, alpha=1e-2)
    assert_same(
        value_and_grads(klj_reg.penalty(model, x1.clone(), alpha=1e-2), model),
        reference(model, loss, x1, c1),
    )


# 5. Checkpointing ----------------------------------------------------------------------------


def test_checkpoint_non_reentrant_gives_value_and_gradient(backend: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    want = reference(model, loss, x, c)
    checkpoint(loss, x, c, use_reentrant=False)
    assert_same(value_and_grads(klj_reg.penalty(model, x, alpha=1e-2), model), want)


def test_checkpoint_reentrant_raises_naming_the_fix(backend: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "None of the inputs have requires_grad=True"
        checkpoint(loss, x, c, use_reentrant=True)
    with pytest.raises(klj_reg.CaptureError, match="use_reentrant=False"):
        klj_reg.penalty(model, x, alpha=1e-2)


# 6. D comes from the pass --------------------------------------------------------------------


def test_x_with_another_feature_count_raises(backend: str) -> None:
    model, loss, dim, features = noisy_model(backend)
    klj_reg.attach(model)
    x, c = inputs(dim, features)
    loss(x.clone(), c)  # not the same object: matched by shape
    with pytest.raises(klj_reg.CaptureError, match="dimension"):
        klj_reg.penalty(model, torch.randn(x.shape[0], dim + 2), alpha=1e-2)


# 7. Compile, then attach --------------------------------------------------------------------


def test_attach_after_a_compiled_wrapper_ran_raises() -> None:
    fm = pytest.importorskip("FrEIA.modules")
    ff = pytest.importorskip("FrEIA.framework")
    inn = ff.SequenceINN(4)
    inn.append(
        fm.AllInOneBlock,
        subnet_constructor=lambda i, o: nn.Sequential(nn.Linear(i, 8), nn.ReLU(), nn.Linear(8, o)),
    )
    compiled = torch.compile(inn, backend="eager")
    compiled(torch.randn(8, 4))
    try:
        with pytest.raises(klj_reg.CompileOrderError, match="attach.*first"):
            klj_reg.attach(inn)
    finally:
        torch._dynamo.reset()


# 8. Non-finite steps -------------------------------------------------------------------------


def test_the_penalty_stays_finite_while_the_flow_does() -> None:
    """Scales between e^44 (where e^{2s} overflows float32) and e^88 (where the flow's own
    e^s does): the penalty continues along its tangent, finite, still pushing them down."""
    s = torch.tensor([45.0, 60.0, 80.0], requires_grad=True)
    (grad,) = torch.autograd.grad(klj_reg.klj_sum(s), s)
    assert torch.isfinite(klj_reg.klj_terms(s)).all() and torch.isfinite(grad).all()
    assert (grad > 0).all()
    u_c = 40.0
    slope = torch.tensor(u_c, dtype=torch.float64).expm1()
    tangent = slope - u_c + slope * (2 * s.double() - u_c)
    torch.testing.assert_close(klj_reg.klj_terms(s.detach()).double(), tangent, rtol=1e-6, atol=0)
    below = torch.tensor([-3.0, 0.1, 19.0], dtype=torch.float64)
    torch.testing.assert_close(
        klj_reg.klj_terms(below), (2 * below).exp() - 1 - 2 * below, rtol=1e-12, atol=1e-12
    )


def test_a_diverging_deep_coupling_flow_never_raises_and_names_layers() -> None:
    """A 32-layer normflows AffineCouplingBlock flow (unbounded exp scale) on heavy-tailed
    19-D data at a high learning rate, with a loop that skips non-finite steps, as users
    write it: the penalty never raises, and warns naming layers, not "no single layer"."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(3)
    dim = 19
    flows = []
    for _ in range(32):
        flows += [
            nf.flows.AffineCouplingBlock(nf.nets.MLP([(dim + 1) // 2, 32, 2 * (dim // 2)])),
            nf.flows.Permute(dim, mode="shuffle"),
        ]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), flows)
    klj_reg.attach(model)
    data = torch.distributions.StudentT(1.2).sample((4096, dim))
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    skipped = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(40):
            x = data[torch.randint(0, len(data), (128,))]
            loss = model.forward_kld(x) + klj_reg.penalty(model, x, alpha=1.0)
            if not torch.isfinite(loss):
                skipped += 1
                optimiser.zero_grad()
                continue
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    messages = [str(w.message) for w in caught if w.category is klj_reg.NonFiniteScaleWarning]
    assert skipped > 0 and messages, "the setting no longer diverges: make it harder"
    assert all("flows." in m and "no single layer" not in m for m in messages)


# 9. Empty batch -------------------------------------------------------------------------------


def _affine_models(backend: str) -> tuple[nn.Module, Callable[[Tensor], Tensor]]:
    """An affine coupling and an affine autoregressive layer, D = 4."""
    if backend == "nflows":
        pytest.importorskip("nflows")
        from nflows import distributions, flows
        from nflows import transforms as T
        from nflows.nn.nets import ResidualNet

        coupling = T.AffineCouplingTransform(
            torch.tensor([1, 0, 1, 0]), lambda i, o: ResidualNet(i, o, 8, num_blocks=1)
        )
        layers = [coupling, T.MaskedAffineAutoregressiveTransform(4, 8)]
        flow = flows.Flow(T.CompositeTransform(layers), distributions.StandardNormal([4]))
        return flow, lambda x: -flow.log_prob(x).mean()
    nf = pytest.importorskip("normflows")
    model = nf.NormalizingFlow(
        nf.distributions.DiagGaussian(4),
        [
            nf.flows.AffineCouplingBlock(nf.nets.MLP([2, 8, 4])),
            nf.flows.MaskedAffineAutoregressive(4, 8),
        ],
    )
    return model, model.forward_kld


@pytest.mark.parametrize("backend", ["nflows", "normflows"])  # FrEIA and zuko fail on B = 0
def test_an_empty_batch_gives_zero(backend: str) -> None:
    model, loss = _affine_models(backend)
    klj_reg.attach(model)
    x = torch.randn(0, 4)
    loss(x)
    value = klj_reg.penalty(model, x, alpha=1e-2)
    assert value.shape == () and value.item() == 0.0
    loss(x)
    assert klj_reg.penalty(model, x, reduction="none", alpha=1e-2).shape == (0,)


# 10. A layer shared by several attached models ----------------------------------------------------


def _nflows_spline_flows() -> tuple[nn.Module, nn.Module, nn.Module]:
    """An nflows autoregressive spline (read through the spline functions nflows' layers
    look up) shared by two flows."""
    pytest.importorskip("nflows")
    from nflows import distributions, flows
    from nflows import transforms as T

    spline = T.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
        4, 16, num_bins=4, tails="linear", tail_bound=4.0
    )
    with torch.no_grad():
        for p in spline.parameters():
            p.add_(0.3 * torch.randn_like(p))
    base = distributions.StandardNormal([4])
    first = flows.Flow(T.CompositeTransform([spline, T.ReversePermutation(4)]), base)
    second = flows.Flow(T.CompositeTransform([T.ReversePermutation(4), spline]), base)
    return spline, first, second


@pytest.mark.parametrize("order", ["two models", "layer, then model"])
def test_a_layer_shared_by_two_attached_models_records_for_each(order: str) -> None:
    spline, first, second = _nflows_spline_flows()
    x = torch.randn(16, 4)
    want_first = value_and_grads(_fresh_penalty(first, x), first)
    want_second = value_and_grads(_fresh_penalty(second, x), second)
    if order == "two models":
        klj_reg.attach(first)
        klj_reg.attach(second)
        first.log_prob(x)
        second.log_prob(x)
        assert_same(value_and_grads(klj_reg.penalty(first, x, alpha=1e-2), first), want_first)
        assert_same(value_and_grads(klj_reg.penalty(second, x, alpha=1e-2), second), want_second)
    else:
        klj_reg.attach(spline)
        klj_reg.attach(first)
        first.log_prob(x)
        assert_same(value_and_grads(klj_reg.penalty(first, x, alpha=1e-2), first), want_first)
        spline(x)
        assert klj_reg.penalty(spline, x, alpha=1e-2) > 0


def _fresh_penalty(model: nn.Module, x: Tensor) -> Tensor:
    with klj_reg.capturing(model):
        model.log_prob(x)
        return klj_reg.penalty(model, x, alpha=1e-2)
