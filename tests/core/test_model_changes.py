"""Changes to the module tree after ``attach`` (issue 27): a flow layer appended or replaced, or
a captured layer's subnetwork replaced, raises at the next pass naming what changed, and
``attach`` on the changed model scans it again (then the penalty is the one of a model attached
fresh); changes that touch no captured or flow layer are taken silently."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture
from klj_reg.errors import CaptureError

D = 4
X = torch.randn(16, D, generator=torch.Generator().manual_seed(0))


def _subnet(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(nn.Linear(c_in, 8), nn.Tanh(), nn.Linear(8, c_out))


def _freia(blocks: int = 1) -> nn.Module:
    Ff = pytest.importorskip("FrEIA.framework")
    Fm = pytest.importorskip("FrEIA.modules")
    inn = Ff.SequenceINN(D)
    for _ in range(blocks):
        inn.append(Fm.AllInOneBlock, subnet_constructor=_subnet)
    return inn


def _freia_append(inn: nn.Module) -> None:
    import FrEIA.modules as Fm

    inn.append(Fm.AllInOneBlock, subnet_constructor=_subnet)


def _freia_replace(inn: nn.Module) -> None:
    import FrEIA.modules as Fm

    inn.module_list[0] = Fm.AllInOneBlock([(D,)], subnet_constructor=_subnet)


def _normflows() -> nn.Module:
    nf = pytest.importorskip("normflows")
    layers = [nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 8, D])), nf.flows.Permute(D)]
    return nf.NormalizingFlow(nf.distributions.DiagGaussian(D), layers)


def _normflows_subnet(flow: nn.Module) -> None:
    import normflows as nf

    flow.flows[0].flows[1].param_map = nf.nets.MLP([D // 2, 8, D])


def _normflows_append(flow: nn.Module) -> None:
    import normflows as nf

    flow.flows.append(nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 8, D])))


def _nflows() -> nn.Module:
    pytest.importorskip("nflows")
    from nflows.flows import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(D, 8, 2, 2)


def _nflows_append(flow: nn.Module) -> None:
    from nflows.transforms import MaskedAffineAutoregressiveTransform

    flow._transform._transforms.append(MaskedAffineAutoregressiveTransform(D, 8))


def _run(model: nn.Module) -> None:
    if hasattr(model, "log_prob"):
        model.log_prob(X)
    else:
        model(X)


CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[nn.Module], None], str]] = {
    "freia appended": (_freia, _freia_append, "module_list.1 (AllInOneBlock) is new"),
    "freia replaced": (lambda: _freia(2), _freia_replace, "module_list.0 (AllInOneBlock)"),
    "normflows subnet": (_normflows, _normflows_subnet, "flows.0.flows.1.param_map (MLP)"),
    "normflows appended": (_normflows, _normflows_append, "flows.2 (AffineCouplingBlock) is new"),
    "nflows appended": (_nflows, _nflows_append, "MaskedAffineAutoregressiveTransform) is new"),
}


def _fresh_penalty(model: nn.Module) -> Tensor:
    with klj_reg.capturing(model):
        _run(model)
        return klj_reg.penalty(model, X, alpha=1.0)


def _assert_reads_as_attached_fresh(model: nn.Module) -> None:
    """The attached model's penalty on its waiting pass is that of a fresh capture."""
    value = klj_reg.penalty(model, X, alpha=1.0)
    klj_reg.detach(model)
    torch.testing.assert_close(value, _fresh_penalty(model))


def _attached_used_and_changed(case: str) -> tuple[nn.Module, Any]:
    """The case's model, attached and trained one pass, then changed: with its capture."""
    build, change, _ = CASES[case]
    torch.manual_seed(0)
    model = build()
    capture = klj_reg.attach(model)
    _run(model)
    klj_reg.penalty(model, X, alpha=1.0)
    change(model)
    return model, capture


@pytest.mark.parametrize("case", list(CASES))
def test_a_change_that_matters_raises_at_the_next_pass_naming_it(case: str) -> None:
    model, _ = _attached_used_and_changed(case)
    with pytest.raises(CaptureError, match="changed after klj_reg.attach") as error:
        _run(model)
    assert CASES[case][2] in str(error.value)
    assert "klj_reg.attach(model) again" in str(error.value)


@pytest.mark.parametrize("case", list(CASES))
def test_attach_again_scans_the_changed_model(case: str) -> None:
    model, before = _attached_used_and_changed(case)
    capture = klj_reg.attach(model)
    assert capture is not before and capture is get_capture(model)
    _run(model)
    _assert_reads_as_attached_fresh(model)


def test_attach_on_an_unchanged_model_is_a_no_op() -> None:
    model = _freia(2)
    first = klj_reg.attach(model)
    _run(model)
    assert klj_reg.attach(model) is first
    klj_reg.penalty(model, X, alpha=1.0)  # the pass is still there


def test_a_change_outside_the_flow_layers_is_taken_silently() -> None:
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flow = _normflows()
    klj_reg.attach(flow)
    flow.q0 = nf.distributions.DiagGaussian(D, trainable=False)  # a new base distribution
    flow.flows.append(nf.flows.Permute(D))  # a layer whose term is zero
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(flow)
    _assert_reads_as_attached_fresh(flow)


def test_a_monitor_survives_attach_again() -> None:
    model = _freia(1)
    logged: list[int] = []
    monitor = klj_reg.Monitor(model, log=lambda values, step: logged.append(step))
    _run(model)
    klj_reg.penalty(model, X, alpha=1.0)
    _freia_append(model)
    klj_reg.attach(model)
    _run(model)
    klj_reg.penalty(model, X, alpha=1.0)
    assert logged == [1, 2]
    monitor.close()
