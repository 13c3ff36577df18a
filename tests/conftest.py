"""Fixtures for every test: a fixed seed, and no model left attached after a test; and, for the
tests that ask for it (``pytestmark = pytest.mark.usefixtures("float64")``), float64 as the
default dtype."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch

from tests.truth import detach_all


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)  # FrEIA draws its permutations from numpy


@pytest.fixture(autouse=True)
def _detach_attached() -> Iterator[None]:
    """Leave no class patched behind: detach every model a test attached through
    ``tests.truth.attach`` (or ``records``)."""
    yield
    detach_all()


@pytest.fixture
def float64() -> Iterator[None]:
    """Build the test's models in float64 (normflows allocates its log-dets in the default
    dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
