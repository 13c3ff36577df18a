"""The peer-test harness (tests/peer): it attaches what a suite builds, checks every pass,
and fails a test whose penalty is wrong, even when the test catches the exception.

Each run is a pytest subprocess: the plugin patches framework classes for its whole session.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

PEER = Path(__file__).parent

pytest_plugins = ["pytester"]

Runner = Callable[..., pytest.RunResult]

SUITE = '''
import torch
from torch import nn
import klj_reg
from klj_reg.capture import get_capture
from nflows import transforms
from nflows.transforms.base import Transform


class Model(nn.Module):
    """Not a framework class: built around two nflows layers."""


class Flow(transforms.CompositeTransform):
    """Defined after the plugin loaded: its __init__ builds layers."""

    def __init__(self):
        layers = [transforms.MaskedAffineAutoregressiveTransform(3, 8) for _ in range(2)]
        self.built = [get_capture(layer) is not None for layer in layers]
        super().__init__(layers)


class Scale(Transform):
    """A user layer whose klj-reg adapter (below) loses the gradient."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((3,), 0.3))

    def forward(self, x, context=None):
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])


klj_reg.register_adapter(
    Scale,
    lambda layer, inputs, output: layer.log_scale.detach().expand_as(inputs[0]),
    log_det=lambda layer, inputs, output: output[1],
)


def test_every_flow_is_attached_and_its_passes_checked():
    flow = Flow()
    assert flow.built == [True, True]  # each layer when its own __init__ finished
    assert get_capture(flow) is not None  # then the flow, when its __init__ finished
    x = torch.randn(5, 3)
    flow(x)[1].sum().backward()
    with torch.no_grad():
        flow(x)


def test_a_penalty_without_gradient_fails_the_test_that_catches_it():
    layer = Scale()
    try:
        layer(torch.randn(5, 3))
    except Exception:
        pass
'''


PYRO_SUITE = """
import torch
import pyro.distributions as dist
import pyro.distributions.transforms as T
from klj_reg.capture import get_capture


def base():
    return dist.Normal(torch.zeros(3), torch.ones(3))


def test_pyro_transforms_are_attached_and_their_passes_checked():
    layers = [T.affine_autoregressive(3), T.permute(3), T.spline_coupling(3)]
    assert get_capture(layers[0]) is not None and get_capture(layers[2]) is not None
    flow = dist.TransformedDistribution(base(), layers)
    flow.log_prob(torch.randn(5, 3)).sum().backward()
    composed = T.ComposeTransformModule([T.affine_coupling(3), T.batchnorm(3)])
    assert get_capture(composed) is not None
    dist.TransformedDistribution(base(), composed).log_prob(torch.randn(5, 3)).sum().backward()
"""


@pytest.fixture
def run(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Runner:
    """Runs the mini suite above with the plugin, in a subprocess."""
    pytester.makepyfile(test_suite=SUITE)
    if importlib.util.find_spec("pyro") is not None:
        pytester.makepyfile(test_pyro_suite=PYRO_SUITE)
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(PEER) + (os.pathsep + path if path else ""))

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_subprocess(
            "-p", "klj_peer_plugin", "-p", "no:cacheprovider", "--klj-suite=mini", *args
        )

    return run


@pytest.mark.slow
def test_the_harness_checks_every_pass_and_fails_a_wrong_penalty(run: Runner) -> None:
    result = run("--klj-min-penalties=1", "test_suite.py")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*HarnessError: 1 klj-reg penalty check(s) failed during the test: Scale: "
            "HarnessError: the penalty of grad-mode pass on an input of shape (5, 3) is not "
            "connected to the graph*",
            # 2 layers and the flow, twice (grad and no-grad), then Scale once
            "klj-reg peer harness [[]mini]: 4 objects attached*; 7 penalties computed and "
            "checked (3 with their gradient*; 1 failed checks",
        ]
    )


@pytest.mark.slow
def test_the_baseline_attaches_nothing_and_too_few_penalties_fail(run: Runner) -> None:
    result = run("--klj-baseline", "-k", "every_flow")
    result.assert_outcomes(failed=1, passed=0)  # nothing attached: Flow.built is False
    result.stdout.fnmatch_lines(["klj-reg peer harness [[]mini]: baseline, nothing attached"])
    result = run("--klj-min-penalties=100", "-k", "every_flow")
    result.assert_outcomes(passed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*6 penalties computed, fewer than --klj-min-penalties=100*"])


@pytest.mark.slow
def test_the_harness_attaches_pyro_transforms_and_checks_their_passes(run: Runner) -> None:
    pytest.importorskip("pyro")
    result = run("--klj-suite=pyro", "--klj-min-penalties=1", "-v", "test_pyro_suite.py")
    result.assert_outcomes(passed=1)
    # each transform and the composed one (and the spline coupling's own elementwise spline,
    # a transform of its own) when built; one checked pass per transform and log_prob
    result.stdout.fnmatch_lines(
        [
            "klj-reg peer harness [[]pyro]: 6 objects attached*; 6 penalties computed and "
            "checked (6 with their gradient*; 0 failed checks",
            "*by model: *AffineAutoregressive 1*",
        ]
    )


def test_the_runner_knows_every_suite(tmp_path: Path) -> None:
    for suite in ("zuko", "nflows", "normflows", "freia", "pyro"):
        (tmp_path / suite).mkdir()
    fake = tmp_path / "pytest"
    fake.write_text('#!/bin/sh\necho "$PWD $*"\n')
    fake.chmod(0o755)
    env = {**os.environ, "PEER_TESTS": str(tmp_path), "PYTEST": str(fake)}
    done = subprocess.run([str(PEER / "run")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all passed (zuko nflows normflows freia pyro)" in done.stdout
    pyro = next(
        line for line in done.stdout.splitlines() if line.startswith(str(tmp_path / "pyro"))
    )
    assert "--klj-suite=pyro" in pyro
    assert pyro.endswith("-c setup.cfg tests/distributions/test_transforms.py")


def test_the_runner_skips_when_the_suites_are_absent(tmp_path: Path) -> None:
    env = {**os.environ, "PEER_TESTS": str(tmp_path / "absent"), "PYTEST": sys.executable}
    done = subprocess.run([str(PEER / "run")], env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert "not found" in done.stdout
