"""The wheel works where users install it: in a clean virtual environment with only torch,
``import klj_reg`` works and reports an unsupported model clearly; with the ``zuko`` extra,
the README's zuko quick start runs.

The wheel is ``$KLJ_WHEEL`` (``.ci/run`` passes the one ``make dist`` built and checked), or
one built here from the working tree. torch is installed first, as ``$TORCH_SPEC`` (the
Makefile's, default ``torch==2.13.0``): a bare ``torch`` requirement would pull the multi-GB
CUDA build on Linux. Skipped, with the reason, where a clean venv or that torch cannot be had
(no ``ensurepip``, no network and no local wheel).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import klj_reg

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
FRAMEWORKS = ("FrEIA", "nflows", "normflows", "zuko")
NETWORK = re.compile(
    r"Could not find a version|No matching distribution|NewConnectionError|"
    r"Failed to establish|Temporary failure in name resolution|Network is unreachable|"
    r"ConnectTimeout|ReadTimeout|ProxyError"
)


def _env() -> dict[str, str]:
    """The environment without the running venv's (a clean one must not see this one)."""
    drop = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _run(
    args: list[str | Path], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _tail(done: subprocess.CompletedProcess[str], lines: int = 15) -> str:
    return "\n".join((done.stdout + done.stderr).strip().splitlines()[-lines:])


def _pip(python: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return _run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-compile",
            "--disable-pip-version-check",
            *args,
        ],
        cwd=python.parents[2],
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``$KLJ_WHEEL``, or a wheel built here (sdist first, the wheel from it)."""
    given = os.environ.get("KLJ_WHEEL")
    if given:
        path = Path(given).resolve()
        assert path.is_file(), f"KLJ_WHEEL={given} is not a file"
    else:
        pytest.importorskip("build", reason="`build` (the release extra) builds the wheel")
        out = tmp_path_factory.mktemp("dist")
        done = _run(
            [sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], cwd=ROOT
        )
        assert done.returncode == 0, _tail(done, 40)
        (path,) = out.glob("*.whl")
    assert path.name.startswith(f"klj_reg-{klj_reg.__version__}-py3-none-any"), path.name
    return path


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The python of a clean venv with torch (``$TORCH_SPEC``) and nothing else."""
    root = tmp_path_factory.mktemp("venv") / "env"
    done = _run([sys.executable, "-m", "venv", root], cwd=root.parent, timeout=300)
    if done.returncode != 0:
        pytest.skip(f"python -m venv cannot make a clean venv here: {_tail(done, 5)}")
    python = root / "bin" / "python"
    done = _pip(python, TORCH_SPEC)
    if done.returncode != 0:
        pytest.skip(
            f"cannot install {TORCH_SPEC} into a clean venv (offline, and no local wheel?); set "
            f"TORCH_SPEC to one pip can get here:\n{_tail(done, 8)}"
        )
    return python


def _python(venv: Path, code: str) -> str:
    """Run ``code`` in the clean venv, outside the repository (so that ``import klj_reg``
    cannot find the source tree); its stdout."""
    done = _run([venv, "-c", code], cwd=venv.parents[2])
    assert done.returncode == 0, _tail(done, 40)
    assert "klj" not in done.stderr.lower(), done.stderr  # no klj-reg warning
    return done.stdout


WITHOUT_FRAMEWORKS = """
import importlib.util, pathlib, sys
import torch
from torch import nn
import klj_reg

here = pathlib.Path(klj_reg.__file__).resolve()
assert pathlib.Path(sys.prefix).resolve() in here.parents, here  # the wheel, not the source
assert (here.parent / "py.typed").is_file()
print("frameworks:", [m for m in {frameworks!r} if importlib.util.find_spec(m) is not None])

try:
    klj_reg.penalty(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(4, 3), alpha=1.0)
except klj_reg.UnsupportedModelError as error:
    print("error:", error)


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.s = nn.Parameter(torch.full((3,), 0.5))

    def forward(self, x):
        return x * self.s.exp(), self.s.sum().expand(x.shape[0])


value = klj_reg.penalty(Scale(), torch.randn(4, 3), estimator="exact", alpha=1.0)
print("exact:", float(value))
"""


def test_import_without_a_framework_and_a_clear_error(wheel: Path, venv: Path) -> None:
    done = _pip(venv, "--no-index", wheel)  # torch is there: nothing to download
    assert done.returncode == 0, _tail(done)
    out = _python(venv, WITHOUT_FRAMEWORKS.format(frameworks=FRAMEWORKS))
    assert "frameworks: []" in out
    (error,) = re.findall(r"^error: (.*)$", out, re.M)
    assert "no layer of Sequential is supported by klj-reg" in error
    assert "klj_reg.register_adapter" in error and "estimator='exact'" in error
    # Without any framework, the estimators still give the exact KLJ: 3 (e - 1 - 1).
    (exact,) = re.findall(r"^exact: (.*)$", out, re.M)
    assert float(exact) == pytest.approx(3 * (2.718281828 - 2), rel=1e-5)


def _readme_block(framework: str) -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    (block,) = [b for b in blocks if re.search(rf"^import {framework}$", b, re.M)]
    return block


def test_the_zuko_extra_runs_the_readme_quick_start(wheel: Path, venv: Path) -> None:
    done = _pip(venv, f"{wheel}[zuko]")
    if done.returncode != 0 and NETWORK.search(done.stdout + done.stderr):
        pytest.skip(f"cannot download zuko here:\n{_tail(done, 8)}")
    assert done.returncode == 0, _tail(done)
    out = _python(venv, _readme_block("zuko") + "\nprint('loss:', float(loss))\n")
    (loss,) = re.findall(r"^loss: (.*)$", out, re.M)
    assert math.isfinite(float(loss))
    others = _python(
        venv,
        "import importlib.util\n"
        f"print([m for m in {FRAMEWORKS!r} if importlib.util.find_spec(m) is not None])",
    )
    assert others.strip() == "['zuko']"
