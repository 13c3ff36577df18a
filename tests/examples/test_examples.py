"""Every script in examples/ runs at a tiny size (one thread), and the Lightning and
Accelerate examples give the penalty of the plain loop, step for step.

Examples that need a package outside the ``all`` extra (sbi, Lightning, Accelerate) skip
with a message where it is not installed (``pip install "klj-reg[stack]"``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(name: str, *needs: str) -> ModuleType:
    """``examples/<name>.py`` as a module (not on ``sys.path``: ``lightning_module`` must not
    shadow a package), skipping when a package it needs is missing."""
    for package in needs:
        pytest.importorskip(package, reason=f"examples/{name}.py needs {package}")
    spec = importlib.util.spec_from_file_location(f"klj_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested_and_runs_as_a_script() -> None:
    names = {p.stem for p in EXAMPLES.glob("*.py")}
    assert names == {
        "tabular",
        "image_flow",
        "reverse_kl",
        "sbi_npe",
        "lightning_module",
        "accelerate_loop",
        "ddp",
    }, "a new example needs its test here"
    for path in EXAMPLES.glob("*.py"):
        text = path.read_text()
        assert 'if __name__ == "__main__":\n    main()' in text, path.name
        assert "def main(" in text, path.name
        assert "alpha=" in text, path.name  # alpha always passed explicitly


def test_tabular() -> None:
    example = load("tabular", "sklearn", "zuko")
    result = example.main(steps=3, alphas=(0.0, 0.1))
    assert result["alpha"] in (0.0, 0.1)
    assert set(result["val"]) == {0.0, 0.1}
    assert torch.isfinite(torch.tensor(result["test"]))


def test_image_flow() -> None:
    example = load("image_flow", "sklearn", "FrEIA")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no layer left out, no extra pass
        result = example.main(steps=3, batch=16, n=100)
    assert 0 < result["test_bits_per_dim"] < 20


def test_reverse_kl() -> None:
    example = load("reverse_kl", "normflows")
    result = example.main(steps=3, batch=32)
    assert result["klj"] >= 0


def test_sbi_npe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    example = load("sbi_npe", "sbi")
    monkeypatch.chdir(tmp_path)  # sbi's training writes its TensorBoard logs to ./sbi-logs
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Maximum number of epochs", UserWarning)
        warnings.filterwarnings("ignore", "torch.triangular_solve is deprecated")  # nflows' LU
        result = example.main(n=300, steps=3, epochs=1)
    for samples in result.values():
        assert samples.shape == (500, 2)
        assert torch.isfinite(samples).all()


def fixed_batches(data: torch.Tensor, steps: int, size: int = 64) -> list[torch.Tensor]:
    return [data[i * size : (i + 1) * size] for i in range(steps)]


def plain_penalties(flow: torch.nn.Module, batches: list[torch.Tensor], alpha: float) -> list:
    """The plain loop: Adam, the NLL plus the penalty on each batch (attached first, as the
    examples do: a penalty's own pass on first use would sum the gradients in another
    order)."""
    import klj_reg

    klj_reg.attach(flow)
    optimizer = torch.optim.Adam(flow.parameters(), lr=1e-3)
    values = []
    for x in batches:
        nll = -flow().log_prob(x).mean()
        klj = klj_reg.penalty(flow, x, alpha=alpha)
        values.append(klj.detach())
        optimizer.zero_grad()
        (nll + klj).backward()
        optimizer.step()
    klj_reg.detach(flow)
    return values


def test_lightning_matches_the_plain_loop(tmp_path: Path) -> None:
    example = load("lightning_module", "lightning", "zuko")
    steps, alpha = 4, 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and loggers
        module = example.main(
            steps=steps, alpha=alpha, root=str(tmp_path), shuffle=False, log_every=1
        )
    torch.manual_seed(0)  # as main: the same initial parameters
    reference = example.FlowModule(alpha=alpha)
    reference.monitor.close()
    expected = plain_penalties(reference.flow, fixed_batches(example.data(), steps), alpha)
    assert len(module.penalties) == steps
    for got, want in zip(module.penalties, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the monitor's per-layer values went through Lightning's logger
    metrics = (Path(module.logger.log_dir) / "metrics.csv").read_text().splitlines()[0]
    assert "klj/transform.transforms.0" in metrics and "nll" in metrics


def test_accelerate_matches_the_plain_loop() -> None:
    example = load("accelerate_loop", "accelerate", "zuko")
    steps, alpha = 4, 0.5
    result = example.main(steps=steps, alpha=alpha, every=2, shuffle=False)
    assert result["monitor"].latest  # observed through the penalty of the prepared model
    torch.manual_seed(0)
    expected = plain_penalties(example.make_flow(), fixed_batches(example.data(), steps), alpha)
    for got, want in zip(result["penalties"], expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_ddp_two_processes(tmp_path: Path) -> None:
    """Two gloo processes on CPU (~10 s: each imports torch and FrEIA): the penalty read
    from the DDP forward, gradients reduced, the ranks' parameters equal after training."""
    pytest.importorskip("FrEIA")
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available in this build")
    code = (
        f"import sys; sys.path.insert(0, {str(EXAMPLES)!r}); import ddp; "
        f"ddp.main(steps=3, out={str(tmp_path)!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    initial = [p.detach() for p in load("ddp").make_flow().parameters()]
    assert all(torch.equal(a, b) for a, b in zip(*ranks, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(ranks[0], initial, strict=True))
