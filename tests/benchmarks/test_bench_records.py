"""benchmarks.common.records: the run metadata every benchmark writes, parameter counts, and
their text in reports, for the records new runs write and the forms older results hold."""

from __future__ import annotations

import pytest
import torch

from benchmarks.common.records import (
    commit_text,
    machine_text,
    parameter_count,
    parameters_text,
    run_metadata,
)


def test_run_metadata_has_commit_machine_and_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KLJ_COMMIT", raising=False)
    meta = run_metadata("cpu", ["freia", "no-such-package"])
    assert list(meta) == ["commit", "machine", "versions"]
    assert set(meta["commit"]) == {"commit", "dirty"}
    machine = meta["machine"]
    for key in ("platform", "python", "torch", "device", "device_name", "cpus", "threads"):
        assert machine[key] is not None  # the keys the CIFAR-10 results have always held
    assert machine["device"] == "cpu" and machine["torch"] == torch.__version__
    assert torch.__version__.startswith(meta["versions"]["torch"])
    assert meta["versions"]["no-such-package"] == "missing"
    assert set(meta["versions"]) == {"torch", "numpy", "freia", "no-such-package"}


def test_klj_commit_stands_for_a_checkout_without_git(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLJ_COMMIT", "abc123")
    assert run_metadata()["commit"] == {"commit": "abc123", "dirty": None}


def test_commit_text_reads_new_and_old_forms() -> None:
    assert commit_text({"commit": "0123456789abcdef", "dirty": False}, 10) == "0123456789"
    assert commit_text({"commit": "0123456789abcdef", "dirty": True}, 4) == "0123-dirty"
    assert commit_text({"commit": None, "dirty": None}) == "unknown"
    assert commit_text("0123abc-dirty") == "0123abc-dirty"  # overhead's git describe


def test_machine_text_reads_new_and_old_forms() -> None:
    new = {"device_name": "Some CPU", "cores": 2, "threads": 1, "torch": "2.13.0"}
    assert machine_text(new) == "Some CPU, 2 cores, 1 torch thread, torch 2.13.0"
    assert machine_text(new, torch_version=False) == "Some CPU, 2 cores, 1 torch thread"
    overhead = {"processor": "x86_64", "cpu_count": 2, "torch_threads": 2}
    assert machine_text(overhead) == "x86_64, 2 cores, 2 torch threads"
    assert machine_text("x86_64 2 cores, torch 2.13.0+cpu") == "x86_64 2 cores, torch 2.13.0+cpu"


def test_parameter_count_counts_trainable_parameters() -> None:
    layer = torch.nn.Linear(3, 4)
    frozen = torch.nn.Linear(2, 2).requires_grad_(False)
    assert parameter_count(torch.nn.Sequential(layer, frozen)) == 3 * 4 + 4
    assert parameters_text([85_000, 2_470_000]) == "85k/2.47M"
