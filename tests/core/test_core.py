"""The framework-agnostic core: math, capture lifecycle, errors, fallbacks, user adapters."""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import klj_reg
from klj_reg import records
from klj_reg.divergence import mean_divergence
from klj_reg.fallback import exact_klj, hutchinson_klj
from klj_reg.records import Factor, LayerRecord, as_row
from tests.truth import jacobian


class Coupling(nn.Module):
    """A user's own affine coupling, y2 = x2 * exp(s(x1)) + t(x1), storing its log-scale."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.half = dim // 2
        self.net = nn.Sequential(nn.Linear(self.half, 16), nn.Tanh(), nn.Linear(16, 2 * self.half))
        self.calls = 0

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self.calls += 1
        x1, x2 = x[:, : self.half], x[:, self.half :]
        s, t = self.net(x1).chunk(2, dim=1)
        self.log_scale = torch.tanh(s)
        return torch.cat([x1, x2 * self.log_scale.exp() + t], 1), self.log_scale.sum(1)


class Stack(nn.Module):
    def __init__(self, n: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Coupling(dim) for _ in range(n))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        log_det = torch.zeros(x.shape[0], dtype=x.dtype)
        for layer in self.layers:
            x = x.flip(1)
            x, ld = layer(x)
            log_det = log_det + ld
        return x, log_det


@pytest.fixture(autouse=True)
def _user_adapter() -> None:
    klj_reg.register_adapter(
        Coupling,
        lambda layer, inputs, output: layer.log_scale,
        log_det=lambda layer, inputs, output: output[1],
        subnets=lambda layer: [layer.net],
    )


def train_step(model: Stack, x: Tensor, **kw: object) -> Tensor:
    z, log_det = model(x)
    nll = (0.5 * z.square().sum(1) - log_det).mean()
    return nll + klj_reg.penalty(model, x, **{"alpha": 1e-2, **kw})  # type: ignore[arg-type]


# ---------------------------------------------------------------- the math


@given(st.floats(-8, 8, allow_nan=False))
def test_klj_term_is_the_kl_of_the_diagonal(s: float) -> None:
    t = klj_reg.klj_terms(torch.tensor([s], dtype=torch.float64)).item()
    d = math.exp(s)
    assert t == pytest.approx(d * d - 1 - 2 * math.log(d), rel=1e-9, abs=1e-12)
    assert t >= 0
    if 1e-6 < abs(s) < 1e-3:  # precise near d = 1: t = 2 s^2 + 4/3 s^3 + O(s^4)
        assert t == pytest.approx(2 * s * s + 4 / 3 * s**3, rel=1e-5, abs=0)
    if s == 0:
        assert t == 0


@settings(deadline=None, max_examples=20)
@given(st.integers(0, 2**16), st.sampled_from([1.0, -1.0, 0.7, -2.5]))
def test_klj_sum_is_the_sum_of_klj_terms_twice_differentiable(seed: int, scale: float) -> None:
    """The batch mean's fused sum (fewer temporaries, in place) against the elementwise terms:
    value (also in float32 near the identity), gradient and second derivatives (its backward
    builds a graph when asked to)."""
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.7).requires_grad_()
    bounded = (-5.0, 5.0)  # a known activation range: no continuation operators
    for bounds in (None, bounded):
        torch.testing.assert_close(
            klj_reg.klj_sum(s, scale, bounds), klj_reg.klj_terms(s, scale).sum()
        )
        assert torch.autograd.gradcheck(lambda t, b=bounds: klj_reg.klj_sum(t, scale, b), (s,))
        assert torch.autograd.gradgradcheck(lambda t, b=bounds: klj_reg.klj_sum(t, scale, b), (s,))
    # float32 near the identity, where sum(expm1(2s)) - sum(2s) would cancel: term by term
    near = torch.randn(64, 512, generator=g) * 1e-3 + 2e-3
    exact = klj_reg.klj_terms(near.double(), scale).sum()
    torch.testing.assert_close(klj_reg.klj_sum(near, scale).double(), exact, rtol=1e-5, atol=0)


def test_divergence_counts_repeats_and_shared_factors() -> None:
    per_sample = torch.tensor([[0.1, -0.2], [0.3, 0.0]], dtype=torch.float64)
    shared = torch.tensor([[0.05]], dtype=torch.float64)
    rec = LayerRecord("l", "L", (Factor(per_sample), Factor(shared, repeat=4)), None, 6)
    expected = klj_reg.klj_terms(per_sample).sum(1) + 4 * klj_reg.klj_terms(shared).sum()
    torch.testing.assert_close(klj_reg.divergence([rec]), expected)


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 2**16), st.sampled_from(["jacobian", "released-code"]))
def test_batch_mean_equals_the_mean_of_per_sample_divergences(seed: int, form: str) -> None:
    """mean_divergence groups factors (by batch, repeat, dtype, activation, scale), applies a
    shared activation once per group and counts batch-expanded factors once: it must equal
    divergence(...).mean() and the divergence of the materialised log|d|, for mixed shapes,
    shared and expanded factors, repeats, dtypes, activations and scales, in value and in
    gradient."""
    g = torch.Generator().manual_seed(seed)
    batch = 3

    def leaf(*shape: int, dtype: torch.dtype = torch.float64) -> Tensor:
        return (0.3 * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    sources = [
        leaf(batch, 4),  # a coupling half, 2-D
        leaf(batch, 2, 3, 3),  # a conv coupling half, 4-D (not contiguous below)
        leaf(1, 2),  # an ActNorm-like shared factor
        leaf(batch, 5),
        leaf(batch, 3, dtype=torch.float32),  # another dtype: its own group
        leaf(batch, 6),  # sliced, then a shared activation and scale (grouped with [0]'s)
        leaf(1, 4),  # a per-feature scale expanded over the batch (stride 0)
        leaf(1, 8),  # part of one, expanded
    ]
    sources = [t.requires_grad_() for t in sources]
    tanh_raw = {"log_abs": lambda a: 0.7 * torch.tanh(a), "raw": lambda a: a}
    shared = {"activation": torch.tanh, "scale": 0.7}
    records = [
        LayerRecord(
            "a",
            "A",
            (Factor(sources[0], **tanh_raw), Factor(sources[2], repeat=9)),
            None,
            10,
        ),
        LayerRecord("b", "B", (Factor(sources[1].transpose(2, 3), repeat=2),), None, 40),
        LayerRecord("c", "C", (Factor(sources[3], **tanh_raw), Factor(sources[4])), None, 12),
        LayerRecord(
            "d",
            "D",
            (
                Factor(sources[5], lambda a: a[:, 1:4], raw=lambda a: a[:, 1:4], **shared),
                Factor(sources[0], raw=lambda a: a, **shared),
                Factor(sources[6].expand(batch, 4), scale=-1.0),
                Factor(sources[7][:, 2:6].expand(batch, 4), repeat=3),
            ),
            None,
            14,
        ),
    ]
    got = mean_divergence(records, form)
    expected = klj_reg.divergence(records, form).double().mean()
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-9)
    materialised = [
        LayerRecord(
            r.name,
            r.kind,
            tuple(Factor(f.log_abs_d(), repeat=f.repeat) for f in r.factors),
            None,
            r.dim,
        )
        for r in records
    ]
    if form == "jacobian":  # (released-code needs each factor's raw, from its source)
        reference = klj_reg.divergence(materialised, form).double().mean()
        torch.testing.assert_close(got.double(), reference, rtol=1e-6, atol=1e-9)
    grads = torch.autograd.grad(got, sources, retain_graph=True)
    expected_grads = torch.autograd.grad(expected, sources)
    for a, b in zip(grads, expected_grads, strict=True):
        # Rounding of the largest entry: the batch mean's klj_sum and divergence's chain of
        # operators compute the same gradient by different float expressions.
        atol = max(1e-8, 4 * torch.finfo(a.dtype).eps * float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


@dataclass
class Scaled:
    """An activation that is a mutable dataclass, so not hashable."""

    factor: float

    def __call__(self, t: Tensor) -> Tensor:
        return self.factor * torch.tanh(t)


def test_unhashable_activations_form_groups_of_their_own() -> None:
    a, b = Scaled(0.5), Scaled(2.0)  # equal-looking instances must not share a group either
    x = torch.randn(4, 3, dtype=torch.float64)
    records = [
        LayerRecord("a", "A", (Factor(x, activation=a),), None, 3),
        LayerRecord("b", "B", (Factor(x, activation=b, scale=-1.0),), None, 3),
    ]
    expected = klj_reg.klj_terms(0.5 * torch.tanh(x)) + klj_reg.klj_terms(-2.0 * torch.tanh(x))
    torch.testing.assert_close(mean_divergence(records), expected.sum(1).mean())


def test_as_row_sources_are_shared_factors_without_a_view() -> None:
    """A parameter without the batch dimension with ``log_abs=as_row`` is a factor shared by
    the batch: the same penalty, per-sample divergence, implied log-det and gradient as its
    ``(1, C)`` row, and the batch mean adds no view operator for it."""
    x = torch.randn(5, 3, dtype=torch.float64)
    p, q = (torch.randn(c, dtype=torch.float64, requires_grad=True) for c in (3, 2))

    def records(row: bool) -> list[LayerRecord]:
        def shared(t: Tensor, **fields: object) -> Factor:
            return Factor(t, log_abs=as_row, **fields) if row else Factor(t.unsqueeze(0), **fields)

        return [
            LayerRecord("a", "A", (Factor(x, activation=torch.tanh), shared(p, repeat=4)), None, 3),
            LayerRecord("b", "B", (shared(q, scale=-1.0, activation=torch.tanh),), None, 2),
        ]

    flat, rows = records(True), records(False)
    assert [f.batch for r in flat for f in r.factors] == [5, 1, 1]
    value = mean_divergence(flat)
    torch.testing.assert_close(value, mean_divergence(rows))
    torch.testing.assert_close(klj_reg.divergence(flat), klj_reg.divergence(rows))
    (got,) = torch.autograd.grad(value, p)
    (want,) = torch.autograd.grad(mean_divergence(rows), p)
    torch.testing.assert_close(got, want)
    with Views() as views:
        mean_divergence(flat)
    assert views.count == 0


class Views(TorchDispatchMode):
    """Counts view operators (unsqueeze, view, reshape) dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func.overloadpacket.__name__ in ("unsqueeze", "view", "reshape", "_unsafe_view"):
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_batch_mean_traces_as_one_graph() -> None:
    """Inside torch.compile the grouped batch mean (expanded factors included) adds no graph
    break, and gives the eager value."""
    leaf = torch.randn(1, 4, requires_grad=True)

    def fn(a: Tensor) -> Tensor:
        t = torch.tanh(a).expand(3, 4)  # an expansion over the batch, compacted
        return mean_divergence([LayerRecord("x", "X", (Factor(t, scale=-1.0),), None, 4)])

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(leaf)
    assert explanation.graph_count == 1 and not explanation.break_reasons
    torch.testing.assert_close(torch.compile(fn, backend="eager")(leaf), fn(leaf))
    torch._dynamo.reset()


def test_released_code_form_per_record() -> None:
    raw = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    s = 0.7 * torch.tanh(0.1 * raw)
    rec = LayerRecord(
        "l", "L", (Factor(raw, lambda a: 0.7 * torch.tanh(0.1 * a), 1, lambda a: a),), None, 5
    )
    expected = raw.square().sum() + 3 - 2 * s.sum()  # three pass-through entries filled with ones
    torch.testing.assert_close(klj_reg.divergence([rec], "released-code"), expected.reshape(1))


# ---------------------------------------------------------------- capture lifecycle


def test_user_adapter_matches_exact_jacobian_and_penalty_formula() -> None:
    model = Stack().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    klj_reg.attach(model)
    z, log_det = model(x)
    capture = klj_reg.attach(model)
    recs = list(capture.records.values())
    assert len(recs) == 3
    value = klj_reg.penalty(model, x, alpha=0.5)
    layer_sums = []
    for layer in model.layers:
        s = layer.log_scale
        layer_sums.append((s.exp() ** 2 - 1 - 2 * s).sum(1))
    torch.testing.assert_close(value, 0.5 * torch.stack(layer_sums).sum(0).mean())
    # the layer's factor is the diagonal of its exact Jacobian
    layer = model.layers[0]
    jac = jacobian(lambda xx: layer(xx)[0], x)
    torch.testing.assert_close(
        torch.diagonal(jac, dim1=1, dim2=2)[:, 2:],
        layer(x)[1].new_tensor(0) + layer.log_scale.exp(),
    )


class RawCoupling(Coupling):
    """Keeps the subnet's raw scale output ``s``; its log|d| is ``tanh(s)``."""

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x1 = x[:, : self.half]
        self.params = self.net(x1)
        return super().forward(x)


def test_user_factors_with_a_shared_activation_match_the_penalty_formula() -> None:
    """An adapter returning Factor(params, slice, activation=torch.tanh) for every layer (one
    shared activation, evaluated once for all layers) gives the per-layer KLJ of log|d| =
    tanh(s), the diagonal of each layer's Jacobian."""
    klj_reg.register_adapter(
        RawCoupling,
        lambda layer, inputs, output: klj_reg.Factor(
            layer.params, lambda p: p[:, : layer.half], activation=torch.tanh
        ),
        log_det=lambda layer, inputs, output: output[1],
    )
    model = Stack().double()
    model.layers = nn.ModuleList(RawCoupling(4) for _ in range(3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    klj_reg.attach(model)
    model(x)
    value = klj_reg.penalty(model, x, alpha=1.0, normaliser="none")
    per_layer = [klj_reg.klj_terms(layer.log_scale).sum(1) for layer in model.layers]
    torch.testing.assert_close(value, torch.stack(per_layer).sum(0).mean())
    layer = model.layers[0]  # what the capture read is the diagonal of the exact Jacobian
    capture = klj_reg.attach(layer)
    layer(x)
    (record,) = capture.take()
    diagonal = torch.diagonal(jacobian(lambda xx: layer(xx)[0], x), dim1=1, dim2=2)[:, 2:]
    torch.testing.assert_close(diagonal, record.factors[0].log_abs_d().exp())


def test_no_extra_forward_pass_when_captured() -> None:
    model = Stack()
    klj_reg.attach(model)
    x = torch.randn(8, 4)
    train_step(model, x).backward()
    assert [layer.calls for layer in model.layers] == [1, 1, 1]


def test_first_use_without_attach_runs_one_pass_silently_then_warns_on_doubling(
    recwarn: pytest.WarningsRecorder,
) -> None:
    model = Stack()
    klj_reg.register_runner(Stack, lambda m, x, c: m(x))
    x = torch.randn(8, 4)
    klj_reg.penalty(model, x, alpha=1e-2)  # attaches now: one own pass, expected
    assert not [w for w in recwarn if "doubles" in str(w.message)]
    with pytest.warns(UserWarning, match="doubles the cost"):
        klj_reg.penalty(model, x, alpha=1e-2)  # attached but no forward ran: doubling


def test_records_do_not_grow_and_are_released_after_penalty() -> None:
    model = Stack()
    capture = klj_reg.attach(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        train_step(model, torch.randn(8, 4)).backward()
        opt.step()
        assert capture.records == {}
        assert all(site.state == {} for site in capture.sites.values())
    for _ in range(5):
        with torch.no_grad():
            model(torch.randn(8, 4))
    assert len(capture.records) == 3


def test_penalty_without_capture_or_x_raises() -> None:
    model = Stack()
    klj_reg.attach(model)
    with pytest.raises(klj_reg.CaptureError, match="no captured forward pass"):
        klj_reg.penalty(model, alpha=1e-2)


def test_batch_mismatch_is_detected() -> None:
    model = Stack()
    klj_reg.attach(model)
    model(torch.randn(8, 4))
    with pytest.raises(klj_reg.CaptureError, match="ran on 8 samples"):
        klj_reg.penalty(model, torch.randn(4, 4), alpha=1e-2)


def test_detach_removes_every_hook_and_capturing_is_scoped() -> None:
    model = Stack()
    before = [dict(m._forward_hooks) for m in model.modules()]
    classes = {type(layer) for layer in model.layers}

    def holders() -> dict[type, int]:  # captures holding each layer class's forward
        return {c: klj_reg.hooks._patched.get((c, "forward"), (0, 0, 0))[2] for c in classes}

    gc.collect()
    klj_reg.capture.give_back_collected()  # what models collected without detach held
    held = holders()  # (other live captures in this process may hold them too)
    klj_reg.attach(model)
    # the captured layers' class forward is wrapped while attached, and given back
    assert holders() == {c: n + 1 for c, n in held.items()}
    assert all(getattr(c.forward, "_klj_wrapper", False) for c in classes)
    klj_reg.detach(model)
    assert [dict(m._forward_hooks) for m in model.modules()] == before
    assert holders() == held
    assert all(getattr(c.forward, "_klj_wrapper", False) == bool(held[c]) for c in classes)
    assert klj_reg.capture.get_capture(model) is None
    with klj_reg.capturing(model) as capture:
        model(torch.randn(2, 4))
        assert len(capture.records) == 3
    assert all(not m._forward_hooks for m in model.modules())


def test_lifted_takes_every_wrapper_off_for_the_block() -> None:
    """``kit.lifted()`` (the overhead benchmark's plain steps): inside the block the classes
    and framework functions are the originals (an unattached twin runs as it would alone; the
    attached model records nothing), after it the wrappers are back and recording resumes."""
    model = Stack()
    capture = klj_reg.attach(model)
    flows = pytest.importorskip("nflows.flows")
    flow = flows.MaskedAutoregressiveFlow(
        features=3, hidden_features=4, num_layers=1, num_blocks_per_layer=1
    )
    klj_reg.attach(flow)  # taps nflows' sum_except_batch
    classes = {type(layer) for layer in model.layers}
    taps = [
        (namespace, name, original, getattr(namespace, name))
        for tap in klj_reg.kit._WRAPPING
        for (namespace, name), original in tap.originals.items()
    ]
    assert taps and all(wrapper is not original for _, _, original, wrapper in taps)
    x = torch.randn(2, 4)
    capture.take()
    with klj_reg.kit.lifted():
        assert not any(getattr(c.forward, "_klj_wrapper", False) for c in classes)
        assert all(getattr(ns, name) is original for ns, name, original, _ in taps)
        model(x)
        assert capture.take() == []
    assert all(getattr(c.forward, "_klj_wrapper", False) for c in classes)
    assert all(getattr(ns, name) is wrapper for ns, name, _, wrapper in taps)
    model(x)
    assert len(capture.take()) == 3


def test_attach_is_idempotent() -> None:
    model = Stack()
    assert klj_reg.attach(model) is klj_reg.attach(model)
    for layer in model.layers:  # watched once, through its class's forward (no torch hook)
        found = klj_reg.hooks.binding(layer)
        assert found is not None and len(found.after["forward"]) == 1
        assert not layer._forward_hooks and not layer._forward_pre_hooks


def test_a_copied_model_does_not_write_into_the_original() -> None:
    model = Stack()
    original = klj_reg.attach(model)
    twin = copy.deepcopy(model)
    klj_reg.attach(twin)
    twin(torch.randn(3, 4))
    assert original.records == {}
    assert len(klj_reg.attach(twin).records) == 3


# ---------------------------------------------------------------- errors


def test_unsupported_model_lists_classes_and_the_fix() -> None:
    with pytest.raises(klj_reg.UnsupportedModelError, match=r"Linear.*register_adapter"):
        klj_reg.attach(nn.Sequential(nn.Linear(3, 3), nn.Tanh()))


def test_data_parallel_is_refused() -> None:
    with pytest.raises(klj_reg.UnsupportedModelError, match="DistributedDataParallel"):
        klj_reg.attach(nn.DataParallel(Stack()))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"alpha": -1.0},
        {"alpha": float("nan")},
        {"alpha": "1"},
        {"tau": -0.1},
        {"form": "paper"},
        {"estimator": "magic"},
        {"reduction": "max"},
        {"normaliser": "pixels"},
        {"normaliser": 0.0},
    ],
)
def test_invalid_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    model = Stack()
    klj_reg.attach(model)
    model(torch.randn(2, 4))
    with pytest.raises(ValueError):
        klj_reg.penalty(model, torch.randn(2, 4), **{"alpha": 1e-2, **kwargs})  # type: ignore[arg-type]


def test_wrong_adapter_is_caught_by_the_log_det_check() -> None:
    class Wrong(Coupling):
        pass

    klj_reg.register_adapter(
        Wrong,
        lambda layer, inputs, output: 2 * layer.log_scale,  # a formula drift
        log_det=lambda layer, inputs, output: output[1],
    )
    model = Stack()
    model.layers[1] = Wrong()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    klj_reg.attach(model)
    model(torch.randn(4, 4))
    with pytest.raises(klj_reg.AdapterMismatchError, match=r"layers\.1 \(Wrong"):
        klj_reg.penalty(model, alpha=1e-2)


def test_verified_layers_record_no_log_det() -> None:
    """A layer's own log-det is read only while its records are checked against it: once
    its self-checks are done (the steady state), its records carry none, and the penalty
    is unchanged."""
    torch.manual_seed(0)
    model = Stack()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    capture = klj_reg.attach(model)
    x = torch.randn(4, 4)
    model(x)
    checked = capture.records
    assert checked and all(r.log_det is not None for r in checked.values())
    expected = klj_reg.penalty(model, x, alpha=1e-2)
    for site in capture.sites.values():
        site.checks_left = 0
    model(x)
    verified = capture.records
    assert verified.keys() == checked.keys()
    assert all(r.log_det is None for r in verified.values())
    torch.testing.assert_close(klj_reg.penalty(model, x, alpha=1e-2), expected)


@pytest.mark.parametrize("make", [records.make, records._by_constructor])
def test_make_builds_the_named_tuple(make: object) -> None:
    """``records.make`` (``tuple.__new__`` from torch 2.6 on, the constructor before: the
    hot path's way to build a call's records) gives the NamedTuple itself, every field set."""
    factor = Factor(source=torch.ones(2, 3))
    built = make(LayerRecord, ("a", "Coupling", (factor,), None, 3))  # type: ignore[operator]
    assert type(built) is LayerRecord
    assert built == LayerRecord(name="a", kind="Coupling", factors=(factor,), log_det=None, dim=3)
    assert built.dim == 3 and built.factors[0] is factor


def test_non_finite_scale_names_the_layer() -> None:
    model = Stack()
    klj_reg.attach(model)
    with torch.no_grad():
        model.layers[2].net[-1].bias.fill_(float("nan"))
    model(torch.randn(4, 4))
    with pytest.warns(klj_reg.NonFiniteScaleWarning, match=r"layers\.2 \(Coupling"):
        assert klj_reg.penalty(model, alpha=1e-2).isnan()  # returned as it is, like the NLL
    model(torch.randn(4, 4))
    with pytest.raises(klj_reg.NonFiniteScaleError, match=r"layers\.2 \(Coupling"):
        klj_reg.penalty(model, check_finite=True, alpha=1e-2)


def test_attach_after_compile_is_detected() -> None:
    model = Stack()
    compiled = torch.compile(model, backend="eager")
    with pytest.raises(klj_reg.CompileOrderError, match="before"):
        klj_reg.attach(compiled)


def test_attach_then_compile_gives_the_same_penalty() -> None:
    model = Stack()
    x = torch.randn(6, 4)
    klj_reg.attach(model)
    eager = train_step(model, x)
    compiled = torch.compile(model, backend="aot_eager")
    z, log_det = compiled(x)
    value = (0.5 * z.square().sum(1) - log_det).mean() + klj_reg.penalty(compiled, x, alpha=1e-2)
    torch.testing.assert_close(value, eager)


def test_no_graph_break_from_capture() -> None:
    model = Stack()
    klj_reg.attach(model)
    explanation = torch._dynamo.explain(model)(torch.randn(6, 4))
    assert explanation.graph_break_count == 0


def test_penalty_under_bf16_autocast_is_float32_and_finite() -> None:
    model = Stack()
    klj_reg.attach(model)
    x = torch.randn(16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x)
        value = klj_reg.penalty(model, x, alpha=1e-2)
    assert value.dtype == torch.float32 and torch.isfinite(value)


# ---------------------------------------------------------------- fallback estimators


def whole_map_klj(fn, x: Tensor) -> Tensor:  # type: ignore[no-untyped-def]
    jac = jacobian(lambda xx: fn(xx)[0], x)
    return jac.square().sum((1, 2)) - x[0].numel() - 2 * torch.linalg.slogdet(jac)[1]


def test_exact_estimator_equals_the_torch_func_jacobian() -> None:
    model = Stack().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    torch.testing.assert_close(exact_klj(model, x), whole_map_klj(model, x))
    value = klj_reg.penalty(model, x, estimator="exact", alpha=1.0, normaliser="none")
    torch.testing.assert_close(value, whole_map_klj(model, x).mean())
    assert value >= 0


def test_hutchinson_estimator_is_unbiased() -> None:
    model = Stack().double()
    x = torch.randn(2, 4, dtype=torch.float64)
    draws = torch.stack([hutchinson_klj(model, x).detach() for _ in range(4000)])
    truth = whole_map_klj(model, x)
    stderr = draws.std(0) / math.sqrt(draws.shape[0])
    assert ((draws.mean(0) - truth).abs() < 4 * stderr + 1e-9).all()


def test_fallback_works_on_a_plain_function_and_backpropagates() -> None:
    weight = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)

    def flow(x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ weight, torch.linalg.slogdet(weight)[1].expand(x.shape[0])

    x = torch.randn(5, 3, dtype=torch.float64)
    value = klj_reg.penalty(flow, x, estimator="hutchinson", n_samples=8, alpha=1e-2)
    value.backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_fused_penalty_equals_eager_with_gradients() -> None:
    model = Stack()
    klj_reg.attach(model)
    x = torch.randn(6, 4)
    grads = []
    for fused in (False, True):
        model.zero_grad()
        model(x)
        value = klj_reg.penalty(model, x, alpha=0.3, fused=fused)
        value.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        if not fused:
            eager = value.detach()
    torch.testing.assert_close(value.detach(), eager)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_tau_on_a_plain_function_is_a_value_error() -> None:
    def flow(x: Tensor) -> tuple[Tensor, Tensor]:
        return 2 * x, torch.full((x.shape[0],), 3 * math.log(2.0))

    with pytest.raises(ValueError, match="tau"):
        klj_reg.penalty(flow, torch.randn(4, 3), estimator="exact", tau=0.1, alpha=1e-2)


def test_tau_adds_the_subnetwork_weight_norm() -> None:
    model = Stack()
    klj_reg.attach(model)
    x = torch.randn(4, 4)
    model(x)
    base = klj_reg.penalty(model, x, alpha=1e-2)
    model(x)
    with_tau = klj_reg.penalty(model, x, tau=0.5, alpha=1e-2)
    weights = [m.weight for layer in model.layers for m in layer.net if isinstance(m, nn.Linear)]
    torch.testing.assert_close(with_tau - base, 0.5 * sum(w.square().sum() for w in weights))
