"""A pickle of an attached model (``torch.save(model)``) holds nothing of klj-reg: it loads and
runs where klj-reg is not installed, gives the same log-probabilities, and, loaded where
klj-reg is, attaches again without a hook left from the pickle (issue 27).

FrEIA's blocks are left out: they hold lambdas, so they do not pickle attached or not."""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.capture import get_capture

D = 4


def _nflows() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    from nflows.flows import MaskedAutoregressiveFlow

    return MaskedAutoregressiveFlow(D, 8, 2, 2), lambda m, x: m.log_prob(x)


def _zuko() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    import zuko

    return zuko.flows.NSF(D, transforms=2, hidden_features=(8,)), lambda m, x: m().log_prob(x)


def _normflows() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    import normflows as nf

    layers = [
        nf.flows.AffineCouplingBlock(nf.nets.MLP([D // 2, 8, D])),
        nf.flows.Permute(D),
        nf.flows.ActNorm(D),
    ]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(D), layers)
    return model, lambda m, x: m.log_prob(x)


def _pyro() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    import pyro.distributions as dist
    import pyro.distributions.transforms as T

    def log_prob(m: nn.Module, x: Tensor) -> Tensor:
        base = dist.Normal(torch.zeros(D), torch.ones(D)).to_event(1)
        return dist.TransformedDistribution(base, list(m)).log_prob(x)

    return nn.ModuleList([T.affine_autoregressive(D), T.spline_coupling(D)]), log_prob


def _sbi() -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    from sbi.neural_nets import posterior_nn

    theta = torch.rand(64, D)
    est = posterior_nn(model="nsf", hidden_features=8, num_transforms=2)(theta, theta)
    return est, lambda m, x: m.log_prob(x, condition=x)


BUILDERS = {"nflows": _nflows, "zuko": _zuko, "normflows": _normflows, "pyro": _pyro, "sbi": _sbi}


def _build(name: str) -> tuple[nn.Module, Callable[[nn.Module, Tensor], Tensor]]:
    pytest.importorskip(name)
    torch.manual_seed(0)
    return BUILDERS[name]()


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def _attached_and_used(name: str) -> tuple[nn.Module, Callable[..., Tensor], Tensor, bytes]:
    model, log_prob = _build(name)
    x = torch.randn(8, D)
    klj_reg.attach(model)
    log_prob(model, x)
    klj_reg.penalty(model, x, alpha=1.0).backward()
    log_prob(model, x)  # and a pass left unread
    buffer = io.BytesIO()
    torch.save(model, buffer)
    return model, log_prob, x, buffer.getvalue()


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_pickle_of_an_attached_model_holds_nothing_of_klj_reg(name: str) -> None:
    *_, data = _attached_and_used(name)
    assert b"klj_reg" not in data


LOADER = """
import sys
sys.modules["klj_reg"] = None  # as if not installed: importing it fails
import torch
model = torch.load(sys.argv[1], weights_only=False)
x = torch.load(sys.argv[2])
exec(sys.argv[3])
torch.save(log_prob(model, x).detach(), sys.argv[4])
"""

LOG_PROB = {
    "nflows": "log_prob = lambda m, x: m.log_prob(x)",
    "zuko": "log_prob = lambda m, x: m().log_prob(x)",
    "normflows": "log_prob = lambda m, x: m.log_prob(x)",
    "pyro": (
        "import pyro.distributions as dist\n"
        "log_prob = lambda m, x: dist.TransformedDistribution("
        "dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1), list(m)).log_prob(x)"
    ),
    "sbi": "log_prob = lambda m, x: m.log_prob(x, condition=x)",
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_it_loads_and_runs_without_klj_reg(name: str, tmp_path: pathlib.Path) -> None:
    model, log_prob, x, data = _attached_and_used(name)
    (tmp_path / "model.pt").write_bytes(data)
    torch.save(x, tmp_path / "x.pt")
    args = [str(tmp_path / f) for f in ("model.pt", "x.pt")]
    done = subprocess.run(
        [sys.executable, "-c", LOADER, *args, LOG_PROB[name], str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    klj_reg.detach(model)
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), log_prob(model, x).detach())


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_loaded_copy_attaches_again_as_a_fresh_model(name: str) -> None:
    model, log_prob, x, data = _attached_and_used(name)
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    assert get_capture(loaded) is None
    log_prob(loaded, x)  # runs, records nowhere
    klj_reg.attach(loaded)
    fresh, _ = _build(name)
    fresh.load_state_dict(model.state_dict())
    klj_reg.attach(fresh)
    assert _hooks(loaded) == _hooks(fresh)  # nothing left over from the pickle
    log_prob(loaded, x)
    log_prob(fresh, x)
    torch.testing.assert_close(
        klj_reg.penalty(loaded, x, alpha=1.0), klj_reg.penalty(fresh, x, alpha=1.0)
    )
