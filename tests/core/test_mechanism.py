"""The one adapter mechanism: user adapters that watch a method, errors that name the right
culprit, and patches owned by the capture that installed them."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg import hooks
from tests.truth import attach, detach_later, diagonal


def klj(log_d: Tensor) -> Tensor:
    """Per-sample KLJ term of a log-diagonal ``(B, D)``: sum of d^2 - 1 - 2 log d."""
    return ((2 * log_d).exp() - 1 - 2 * log_d).sum(1)


# A layer a framework calls by method ---------------------------------------------------------


def _half_scale() -> type[nn.Module]:
    nf = pytest.importorskip("normflows")

    class HalfScale(nf.flows.Flow):  # type: ignore[misc, name-defined]
        """Data to latent (inverse): x2 -> x2 * exp(-s), s = 2 tanh(net(x1))."""

        def __init__(self, dim: int) -> None:
            super().__init__()
            self.half = dim // 2
            self.net = nn.Linear(self.half, dim - self.half)

        def forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
            z1, z2 = z[:, : self.half], z[:, self.half :]
            s = 2 * torch.tanh(self.net(z1))
            return torch.cat([z1, z2 * s.exp()], 1), s.sum(1)

        def inverse(self, x: Tensor) -> tuple[Tensor, Tensor]:
            x1, x2 = x[:, : self.half], x[:, self.half :]
            s = 2 * torch.tanh(self.net(x1))
            return torch.cat([x1, x2 * torch.exp(-s)], 1), -s.sum(1)

    return HalfScale


def test_a_normflows_flow_with_a_registered_layer_gets_its_exact_term() -> None:
    """normflows trains through each layer's ``.inverse``, never ``Module.__call__``: a layer
    registered with ``method="inverse"`` is captured there (it was left out: penalty 0)."""
    nf = pytest.importorskip("normflows")
    half_scale = _half_scale()
    klj_reg.register_adapter(
        half_scale,
        lambda layer, call: klj_reg.Factor(
            source=call.kept["u"], activation=torch.tanh, scale=-2.0
        ),
        method="inverse",
        keep={"u": "net"},
        sample="forward",
        log_det=lambda layer, call: call.output[1],
    )
    torch.manual_seed(0)
    layers = [half_scale(6), nf.flows.Permute(6, mode="swap"), half_scale(6)]
    for layer in layers:
        if isinstance(layer, half_scale):
            nn.init.normal_(layer.net.weight, std=0.5)
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(6), layers)
    attach(flow)
    x = torch.randn(64, 6)
    flow.forward_kld(x)
    got = klj_reg.penalty(flow, x, alpha=1.0)
    klj_reg.detach(flow)
    exact, z = torch.zeros(64), x
    for layer in reversed(layers):  # forward_kld runs the layers last to first
        if isinstance(layer, half_scale):  # the permutation's term is 0
            exact += klj(diagonal(lambda t, m=layer: m.inverse(t)[0], z).abs().log())
        z = layer.inverse(z)[0]
    assert exact.mean() > 0.5
    torch.testing.assert_close(got, exact.mean())


def test_a_registered_method_layer_records_sampling_passes_as_the_inverse() -> None:
    nf = pytest.importorskip("normflows")
    half_scale = _half_scale()
    klj_reg.register_adapter(
        half_scale,
        lambda layer, call: klj_reg.Factor(
            source=call.kept["u"], activation=torch.tanh, scale=-2.0
        ),
        method="inverse",
        keep={"u": "net"},
        sample="forward",
        log_det=lambda layer, call: call.output[1],
    )
    layer = half_scale(4)
    flow = nf.NormalizingFlow(nf.distributions.DiagGaussian(4), [layer])
    capture = attach(flow, direction="sample")
    torch.manual_seed(1)
    flow.sample(16)
    (record,) = capture.take()
    u = record.factors[0].source
    torch.testing.assert_close(record.factors[0].log_abs_d(), 2 * torch.tanh(u))


def test_a_missing_kept_tensor_names_the_layer() -> None:
    class Direct(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(2, 2)

        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            s = self.net.forward(x[:, :2])  # not through Module.__call__: nothing kept
            return x, s.sum(1)

    klj_reg.register_adapter(Direct, lambda layer, call: call.kept["s"], keep={"s": "net"})
    model = Direct()
    attach(model)
    with pytest.raises(klj_reg.AdapterMismatchError, match=r"Direct.*\(s\).*net\.forward"):
        model(torch.randn(3, 4))


# Errors name the culprit ---------------------------------------------------------------------


def test_a_subclass_overriding_the_math_is_named_with_the_fix() -> None:
    Fm = pytest.importorskip("FrEIA.modules")

    class Mine(Fm.AllInOneBlock):  # type: ignore[misc, name-defined]
        def _affine(self, x: Tensor, a: Tensor, rev: bool = False) -> tuple[Tensor, Tensor]:
            s = torch.sigmoid(a[:, : x.shape[1]])
            return x * s.exp() + a[:, x.shape[1] :], s.sum(dim=self.sum_dims)

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Linear(c_in, c_out)

    block = Mine([(6,)], subnet_constructor=subnet)
    detach_later(block)
    with pytest.raises(klj_reg.AdapterMismatchError) as error:
        klj_reg.attach(block)
    message = str(error.value)
    assert "Mine subclasses FrEIA's AllInOneBlock and overrides _affine" in message
    assert "klj_reg.register_adapter(Mine" in message
    assert "this version of FrEIA" not in message


def test_errors_name_the_framework_the_adapter_declared() -> None:
    from klj_reg.registry import Registrar

    class Thing(nn.Module):
        def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
            return x, torch.zeros(x.shape[0])

    space = type("space", (), {"Thing": Thing})
    Registrar("somelib", space, distribution="torch").adapter(
        "Thing",
        read=lambda layer, call: call.x,  # log|d| = x: wrong, the log-det is 0
    )
    model = Thing()
    attach(model)
    x = torch.full((4, 3), 0.5)
    model(x)
    with pytest.raises(klj_reg.AdapterMismatchError, match=r"torch \d.*this version of somelib"):
        klj_reg.penalty(model, x, alpha=1.0)


# Patches belong to the capture ---------------------------------------------------------------


def _spline_flow() -> nn.Module:
    nf = pytest.importorskip("normflows")
    flows = [nf.flows.CoupledRationalQuadraticSpline(4, 1, 8), nf.flows.Permute(4)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(4), flows)


def test_detach_leaves_no_finalizer_behind() -> None:
    model = _spline_flow()
    before = len(weakref.finalize._registry)  # type: ignore[attr-defined]
    for _ in range(100):
        klj_reg.attach(model)
        klj_reg.detach(model)
    assert len(weakref.finalize._registry) == before  # type: ignore[attr-defined]


def test_a_collected_model_gives_its_class_patches_back() -> None:
    nf = pytest.importorskip("normflows")
    from normflows.utils import splines

    spline_cls = nf.flows.CoupledRationalQuadraticSpline
    own = spline_cls.__dict__["inverse"]
    function = splines.rational_quadratic_spline
    gc.collect()  # models earlier tests dropped without detach give theirs back
    klj_reg.detach(nn.Linear(1, 1))  # now
    holders = hooks._patched.get((spline_cls, "inverse"), (None, None, 0, None))[2]
    model = _spline_flow()
    klj_reg.attach(model)
    assert getattr(spline_cls.__dict__["inverse"], "_klj_wrapper", False)
    assert splines.rational_quadratic_spline is not function
    assert hooks._patched[(spline_cls, "inverse")][2] == holders + 1
    before = len(weakref.finalize._registry)  # type: ignore[attr-defined]
    wrapper, tap = spline_cls.__dict__["inverse"], splines.rational_quadratic_spline
    del model
    gc.collect()
    assert len(weakref.finalize._registry) == before - 1  # type: ignore[attr-defined]
    # The collector (which may run inside a torch.compile trace) changes no class or
    # function: the next attach or detach gives them back.
    assert spline_cls.__dict__["inverse"] is wrapper
    assert splines.rational_quadratic_spline is tap
    klj_reg.detach(nn.Linear(1, 1))
    assert hooks._patched.get((spline_cls, "inverse"), (None, None, 0, None))[2] == holders
    if holders == 0:  # no other attached model holds the class or the functions
        assert spline_cls.__dict__["inverse"] is own
        assert splines.rational_quadratic_spline is function


def test_two_captures_share_a_class_patch_until_the_last_goes() -> None:
    nf = pytest.importorskip("normflows")
    spline_cls = nf.flows.CoupledRationalQuadraticSpline
    own = spline_cls.__dict__["inverse"]
    a, b = _spline_flow(), _spline_flow()
    klj_reg.attach(a)
    klj_reg.attach(b)
    klj_reg.detach(a)
    x = torch.randn(8, 4)
    b.forward_kld(x)
    assert float(klj_reg.penalty(b, x, alpha=1.0)) >= 0.0
    del b
    gc.collect()
    klj_reg.detach(nn.Linear(1, 1))  # gives back what collected models held
    if (spline_cls, "inverse") not in hooks._patched:  # held by no model of another test
        assert spline_cls.__dict__["inverse"] is own


# Callbacks of objects built during a pass ----------------------------------------------------


class _Thing:
    def go(self, v: int) -> int:
        return v + 1


def test_prepared_callbacks_are_shared_and_copied_before_a_change() -> None:
    patches = hooks.Patches()
    own = _Thing.__dict__["go"]
    seen: list[tuple[str, int]] = []
    shared = hooks.Prepared(
        hooks.On("go", after=lambda o, args, kw, out: seen.append(("shared", out))),
        patches=patches,
    )
    a, b = _Thing(), _Thing()
    shared(a)
    shared(b)
    assert _Thing.__dict__["go"] is not own  # held on first use
    assert a.__dict__[hooks.KEY] is b.__dict__[hooks.KEY]  # nothing allocated per object
    # A callback of a's own goes on a copy: b keeps only the shared one.
    hooks.watch_method(
        a, "go", after=lambda o, args, kw, out: seen.append(("a", out)), patches=patches
    )
    assert a.__dict__[hooks.KEY] is not b.__dict__[hooks.KEY]
    # A second prepared set on b: b gets its own copy, the shared callbacks first.
    more = hooks.Prepared(
        hooks.On("go", before=lambda o, args, kw: seen.append(("before", args[0]))),
        patches=patches,
    )
    more(b)
    assert a.go(1) == 2 and b.go(5) == 6
    assert seen == [("shared", 2), ("a", 2), ("before", 5), ("shared", 6)]
    c = _Thing()
    shared(c)
    assert c.__dict__[hooks.KEY] is shared.binding  # the copies left the shared set alone
    patches.release()
    assert _Thing.__dict__["go"] is own


def test_zuko_per_call_transforms_allocate_no_binding(monkeypatch: pytest.MonkeyPatch) -> None:
    zuko = pytest.importorskip("zuko")
    torch.manual_seed(0)
    flow = zuko.flows.MAF(3, transforms=3, hidden_features=[8], passes=3)
    attach(flow, direction="both")
    x = torch.randn(16, 3)

    def step() -> None:
        loss = -flow().log_prob(x).mean() + klj_reg.penalty(flow, x, alpha=1e-2)
        loss.backward()
        y, log_q = flow().rsample_and_log_prob((4,))
        klj_reg.penalty(flow, alpha=1e-2).backward()

    step()  # callbacks made on first use
    made = []
    init = hooks.Binding.__init__

    def counted(self: hooks.Binding) -> None:
        made.append(self)
        init(self)

    monkeypatch.setattr(hooks.Binding, "__init__", counted)
    step()
    step()
    assert made == []
    t1, t2 = flow().transform, flow().transform
    assert t1.__dict__[hooks.KEY] is t2.__dict__[hooks.KEY]
