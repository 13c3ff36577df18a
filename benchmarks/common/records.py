"""What every benchmark run records about itself: where it ran and from which code
(:func:`run_metadata`), and how large its model is (:func:`parameter_count`); with their
one-line forms for the reports (:func:`commit_text`, :func:`machine_text`,
:func:`parameters_text`). The text functions also read the forms older result files hold (a
``git describe`` string as the commit, a sentence as the machine, overhead's ``cpu_count``
and ``torch_threads``)."""

from __future__ import annotations

import os
import pathlib
import platform
import subprocess
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMPORT_NAMES = {"freia": "FrEIA"}  # distribution names that differ from the backend's


def run_metadata(
    device: str | torch.device = "cpu", packages: Iterable[str] = ()
) -> dict[str, Any]:
    """``{"commit", "machine", "versions"}`` of a run on ``device``.

    ``commit``: ``{"commit": the checkout's HEAD (or ``$KLJ_COMMIT``, for a copy without
    git), "dirty": whether tracked files have changes (None where unknown)}``. ``machine``:
    platform, processor, Python and torch versions, the device and its name (the GPU's, or the
    CPU's model), the CPU count, the cores this process may use, torch's threads, the load
    average, and CUDA's version on a GPU. ``versions``: torch, numpy and ``packages`` (backend
    names such as ``"freia"`` are accepted), ``"missing"`` where not installed.
    """
    return {
        "commit": _commit(),
        "machine": _machine(torch.device(device)),
        "versions": _versions(packages),
    }


def _commit() -> dict[str, Any]:
    if os.environ.get("KLJ_COMMIT"):
        return {"commit": os.environ["KLJ_COMMIT"], "dirty": None}
    try:
        head = _git("rev-parse", "HEAD")
        status = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head or None, "dirty": bool(status) if head else None}


def _git(*args: str) -> str:
    run = subprocess.run(
        ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True, timeout=10
    )
    return run.stdout.strip()


def _machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "device_name": _cpu_name(),
        "cpus": os.cpu_count(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "threads": torch.get_num_threads(),
        "load": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions(packages: Iterable[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ["torch", "numpy", *packages]:
        try:
            found[name] = version(IMPORT_NAMES.get(name, name))
        except PackageNotFoundError:
            found[name] = "missing"
    return found


def commit_text(commit: dict[str, Any] | str | None, length: int = 40) -> str:
    """``"<hash>"``, with ``-dirty`` where the tree had changes (``git describe --dirty``'s
    form, which older overhead results hold as a string)."""
    if isinstance(commit, str):
        return commit
    if not commit or not commit.get("commit"):
        return "unknown"
    return str(commit["commit"])[:length] + ("-dirty" if commit.get("dirty") else "")


def machine_text(machine: dict[str, Any] | str, torch_version: bool = True) -> str:
    """``"<device name>, <n> cores, <t> torch thread(s), torch <version>"``, each part where
    the record has it (older demo and stability results hold this line as a string); without
    the torch version where ``torch_version`` is false."""
    if isinstance(machine, str):
        return machine
    name = machine.get("device_name") or machine.get("gpu") or machine.get("processor") or "?"
    cores = machine.get("cores") or machine.get("cpus") or machine.get("cpu_count")
    threads = machine.get("threads", machine.get("torch_threads"))
    parts = [str(name)]
    if cores:
        parts.append(f"{cores} cores")
    if threads:
        parts.append(f"{threads} torch thread{'' if threads == 1 else 's'}")
    if torch_version and machine.get("torch"):
        parts.append(f"torch {machine['torch']}")
    return ", ".join(parts)


def parameter_count(module: nn.Module) -> int:
    """The number of trainable parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def parameters_text(counts: Iterable[int]) -> str:
    """``"2.47M"`` or ``"85k"`` per count, joined by ``/``."""
    return "/".join(f"{p / 1e6:.2f}M" if p >= 1e5 else f"{p / 1e3:.0f}k" for p in counts)
