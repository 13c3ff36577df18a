"""A factor's parameters are the ones its pass ran with (issue 27, "Parameters read outside the
pass"): every parameter or buffer a layer's Jacobian factor depends on is read during the call
that records it, never at attach (``prepare``) nor later at penalty time. So under
``torch.func.functional_call`` with other parameters, and after
``load_state_dict(state, assign=True)`` (new Parameter objects), the penalty is that of the
parameters the pass used, and its gradient reaches them, not the module's own (orphaned) ones.

Each case is a small model of one framework whose layer has a parameter factor; the truth is
an unattached copy of it that holds the new parameters, attached and run as a user would.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from tests import truth

pytestmark = [
    pytest.mark.usefixtures("float64"),  # normflows and pyro allocate in the default dtype
    # Batch norm in training and CCAffineConst keep their parameter in the factor's map, not
    # its source (the input, the class): the untrained-capture warning must still see it.
    pytest.mark.filterwarnings("error:nothing klj-reg captured"),
]

D = 4
B = 8
STATISTICS = ("running_mean", "running_var", "moving_mean", "moving_variance")
"""Batch-norm buffers the eval-mode factor depends on, replaced along with the parameters."""


class Case(NamedTuple):
    """A model whose layer has a parameter factor, and how a user runs its pass."""

    build: Callable[[], nn.Module]
    run: Callable[[nn.Module, Tensor], Any]
    shape: tuple[int, ...] = (D,)
    train: bool = True
    direction: str = "data"


class _Pass(nn.Module):
    """The user's pass as one call of a module holding the model, for ``functional_call``."""

    def __init__(self, model: nn.Module, run: Callable[[nn.Module, Tensor], Any]) -> None:
        super().__init__()
        self.model = model
        self.run = run

    def forward(self, x: Tensor) -> Any:
        return self.run(self.model, x)


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))


# FrEIA --------------------------------------------------------------------------------------


def _freia(block: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        Ff = pytest.importorskip("FrEIA.framework")
        Fm = pytest.importorskip("FrEIA.modules")
        model = Ff.SequenceINN(D)
        model.append(getattr(Fm, block), **kwargs)
        return model

    return build


def _freia_run(model: nn.Module, x: Tensor) -> Any:
    return model(x)


# nflows -------------------------------------------------------------------------------------


def _nflows(make: Callable[[Any], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        pytest.importorskip("nflows")
        from nflows import distributions, flows
        from nflows import transforms as T

        transform = T.CompositeTransform([make(T)])
        return flows.Flow(transform, distributions.StandardNormal([D]))

    return build


def _nflows_run(model: nn.Module, x: Tensor) -> Any:
    return model.log_prob(x)


# normflows ----------------------------------------------------------------------------------


def _normflows(make: Callable[[Any], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        nf = pytest.importorskip("normflows")
        return nf.NormalizingFlow(nf.distributions.DiagGaussian(D, trainable=False), [make(nf)])

    return build


def _normflows_run(model: Any, x: Tensor) -> Any:
    return model.forward_kld(x)


def _normflows_sample(model: Any, z: Tensor) -> Any:
    return model.forward_and_log_det(z)


def _cc_affine_const() -> nn.Module:
    nf = pytest.importorskip("normflows")
    return nf.flows.CCAffineConst((D,), 3)


_CLASSES = torch.nn.functional.one_hot(torch.arange(B) % 3, 3)


def _cc_run(layer: Any, x: Tensor) -> Any:
    """A class-conditional layer attached on its own: its data-to-latent call."""
    return layer.inverse(x, _CLASSES.to(x.dtype))


# zuko ---------------------------------------------------------------------------------------


def _zuko() -> nn.Module:
    """Unconditional LU and affine transforms: factors from their parameters."""
    zuko = pytest.importorskip("zuko")
    from zuko.flows import Flow, UnconditionalDistribution, UnconditionalTransform
    from zuko.transforms import LULinearTransform, MonotonicAffineTransform

    lu = torch.randn(D, D) + 2 * torch.eye(D)
    return Flow(
        [
            UnconditionalTransform(LULinearTransform, lu),
            UnconditionalTransform(MonotonicAffineTransform, torch.randn(D), torch.randn(D)),
        ],
        UnconditionalDistribution(
            zuko.distributions.DiagNormal, torch.zeros(D), torch.ones(D), buffer=True
        ),
    )


def _zuko_run(model: nn.Module, x: Tensor) -> Any:
    return model().log_prob(x)


# Pyro ---------------------------------------------------------------------------------------


def _pyro_batch_norm() -> nn.Module:
    pytest.importorskip("pyro")
    import pyro.distributions.transforms as T

    layer = T.BatchNorm(D)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 2.0)
    return layer


def _pyro_run(model: nn.Module, x: Tensor) -> Any:
    import pyro.distributions as dist

    base = dist.Normal(torch.zeros(D, dtype=x.dtype), torch.ones(D, dtype=x.dtype)).to_event(1)
    return dist.TransformedDistribution(base, [model]).log_prob(x)


CASES = {
    "FrEIA-ActNorm": Case(_freia("ActNorm"), _freia_run),
    "FrEIA-AllInOneBlock": Case(_freia("AllInOneBlock", subnet_constructor=_subnet), _freia_run),
    "FrEIA-OrthogonalTransform": Case(_freia("OrthogonalTransform"), _freia_run),
    "nflows-ActNorm": Case(_nflows(lambda T: T.ActNorm(D)), _nflows_run),
    "nflows-BatchNorm-train": Case(_nflows(lambda T: T.BatchNorm(D)), _nflows_run),
    "nflows-BatchNorm-eval": Case(_nflows(lambda T: T.BatchNorm(D)), _nflows_run, train=False),
    "nflows-LULinear": Case(_nflows(lambda T: T.LULinear(D, identity_init=False)), _nflows_run),
    "nflows-QRLinear": Case(_nflows(lambda T: T.QRLinear(D, num_householder=2)), _nflows_run),
    "nflows-SVDLinear": Case(_nflows(lambda T: T.SVDLinear(D, num_householder=2)), _nflows_run),
    "normflows-ActNorm": Case(_normflows(lambda nf: nf.flows.ActNorm((D,))), _normflows_run),
    "normflows-CCAffineConst": Case(_cc_affine_const, _cc_run),
    "normflows-InvertibleAffine": Case(
        _normflows(lambda nf: nf.flows.InvertibleAffine(D, use_lu=True)), _normflows_run
    ),
    "normflows-LULinearPermute": Case(
        _normflows(lambda nf: nf.flows.LULinearPermute(D)), _normflows_run
    ),
    # sampling: the identity features' unconditional spline, evaluated from its parameters
    "normflows-CoupledRQSpline-sample": Case(
        _normflows(lambda nf: nf.flows.CoupledRationalQuadraticSpline(D, 1, 8)),
        _normflows_sample,
        direction="sample",
    ),
    "zuko-LU-and-affine": Case(_zuko, _zuko_run),
    "pyro-BatchNorm-train": Case(_pyro_batch_norm, _pyro_run),
    "pyro-BatchNorm-eval": Case(_pyro_batch_norm, _pyro_run, train=False),
}


# The check ----------------------------------------------------------------------------------


def _batch(case: Case, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, *case.shape, generator=generator)


def _prepared(case: Case) -> tuple[nn.Module, nn.Module]:
    """The model attached, after one pass and penalty (its first-batch checks done, as in a
    run under way), and an unattached copy of it from before the attach."""
    model = case.build().double()  # FrEIA builds some tensors in float32 whatever the default
    with torch.no_grad():  # data-dependent initialisation (ActNorm), batch statistics
        case.run(model, _batch(case, 1))
    model.train(case.train)
    pristine = copy.deepcopy(model)
    truth.attach(model, direction=case.direction)
    x = _batch(case, 2)
    case.run(model, x)
    _penalty(model, x, case)
    return model, pristine


def _penalty(model: nn.Module, x: Tensor, case: Case) -> Tensor:
    if case.direction == "sample":
        return klj_reg.penalty(model, direction="sample", alpha=1.0)
    return klj_reg.penalty(model, x, alpha=1.0)


def _new_state(model: nn.Module) -> tuple[dict[str, Tensor], list[str]]:
    """The model's state with other values of its trained parameters (and batch statistics),
    positive ones kept positive; and the names of the trained parameters."""
    generator = torch.Generator().manual_seed(3)
    trained = [name for name, p in model.named_parameters() if p.requires_grad]
    state = {name: t.detach().clone() for name, t in model.state_dict(keep_vars=True).items()}
    for name in [*trained, *(n for n in state if n.rsplit(".", 1)[-1] in STATISTICS)]:
        t = state[name]
        state[name] = 1.5 * t + 0.1 * torch.rand(t.shape, generator=generator, dtype=t.dtype)
    return state, trained


def _truth(
    case: Case, pristine: nn.Module, state: dict[str, Tensor], trained: list[str], x: Tensor
) -> tuple[Tensor, list[Tensor | None]]:
    """The penalty (and its gradient) of a copy of the model holding ``state``, attached
    afresh (so that its first batch is checked against the layers' own log-det too)."""
    reference = copy.deepcopy(pristine)
    reference.load_state_dict(state)
    truth.attach(reference, direction=case.direction)
    case.run(reference, x)
    value = _penalty(reference, x, case)
    params = dict(reference.named_parameters())
    return value, list(torch.autograd.grad(value, [params[n] for n in trained], allow_unused=True))


def _assert_same(
    value: Tensor,
    grads: list[Tensor | None],
    expected: Tensor,
    expected_grads: list[Tensor | None],
    names: list[str],
) -> None:
    assert value.item() > 0
    torch.testing.assert_close(value, expected)
    reached = False
    for name, got, want in zip(names, grads, expected_grads, strict=True):
        if want is None:
            assert got is None or not got.any(), name
            continue
        assert got is not None, f"{name}: the penalty's gradient did not reach it"
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")
        reached = reached or bool(want.any())
    assert reached  # some of the layer's parameters do get the penalty's gradient


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_functional_call_penalises_the_parameters_the_pass_ran_with(case: Case) -> None:
    model, pristine = _prepared(case)
    state, trained = _new_state(model)
    new = {n: state[n].clone().requires_grad_() for n in trained}
    new.update({n: state[n] for n in state if n.rsplit(".", 1)[-1] in STATISTICS})
    x = _batch(case, 4)
    torch.func.functional_call(
        _Pass(model, case.run), {f"model.{n}": t for n, t in new.items()}, (x,)
    )
    value = _penalty(model, x, case)
    own = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, [new[n] for n in trained] + own, allow_unused=True)
    assert all(g is None for g in grads[len(trained) :]), "the model's own parameters"
    expected, expected_grads = _truth(case, pristine, state, trained, x)
    _assert_same(value, list(grads[: len(trained)]), expected, expected_grads, trained)


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_load_state_dict_assign_penalises_the_new_parameters(case: Case) -> None:
    model, pristine = _prepared(case)
    state, trained = _new_state(model)
    old = [p for p in model.parameters() if p.requires_grad]
    model.load_state_dict({n: t.clone() for n, t in state.items()}, assign=True)
    params = dict(model.named_parameters())
    assert all(params[n] is not p for n, p in zip(trained, old, strict=True))
    x = _batch(case, 4)
    case.run(model, x)
    value = _penalty(model, x, case)
    grads = torch.autograd.grad(value, [params[n] for n in trained] + old, allow_unused=True)
    assert all(g is None for g in grads[len(trained) :]), "the replaced parameters"
    expected, expected_grads = _truth(case, pristine, state, trained, x)
    _assert_same(value, list(grads[: len(trained)]), expected, expected_grads, trained)


def test_member_reads_the_tensor_the_call_used() -> None:
    """``kit.member`` (how readers read a layer's parameters and buffers in its call) gives
    what ``getattr`` gives: a parameter, a buffer, a tensor ``functional_call`` swapped in, a
    parametrized tensor, and any other attribute."""
    from torch.nn.utils import parametrize

    from klj_reg.kit import member

    layer = nn.Linear(3, 3)
    layer.register_buffer("running", torch.ones(3))
    layer.tag = "x"  # type: ignore[assignment]
    for name in ("weight", "bias", "running", "tag", "in_features"):
        assert member(layer, name) is getattr(layer, name)
    swapped = torch.zeros(3)
    seen = {}

    def read(module: nn.Module, args: Any, out: Any) -> None:
        seen["bias"], seen["running"] = member(module, "bias"), member(module, "running")

    layer.register_forward_hook(read)
    torch.func.functional_call(layer, {"bias": swapped, "running": swapped}, (torch.ones(1, 3),))
    assert seen["bias"] is swapped and seen["running"] is swapped
    parametrize.register_parametrization(layer, "weight", nn.Identity())
    torch.testing.assert_close(member(layer, "weight"), layer.weight)
    with pytest.raises(AttributeError):
        member(layer, "absent")
