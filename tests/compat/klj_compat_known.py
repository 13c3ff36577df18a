"""pytest plugin for `make compat`: the failures a row is known to have, as strict xfails.

``KLJ_COMPAT_KNOWN`` names a file of ``node id  # cause`` lines (tests/compat/known/ROW.txt).
Each listed test still runs: it is reported as xfailed while it fails, and as a failure
(XPASS strict) once it passes, so that the list is shortened when the cause is fixed. A
listed id that no test has fails the run too (a renamed test would otherwise pass silently).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _known() -> dict[str, str]:
    path = os.environ.get("KLJ_COMPAT_KNOWN")
    if not path:
        return {}
    known = {}
    for line in Path(path).read_text().splitlines():
        node, _, cause = line.partition("#")
        if node.strip():
            known[node.strip()] = cause.strip() or "known failure of this row"
    return known


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    known = _known()
    for item in items:
        if item.nodeid in known:
            item.add_marker(pytest.mark.xfail(reason=known.pop(item.nodeid), strict=True))
    if known:
        raise pytest.UsageError(
            "KLJ_COMPAT_KNOWN lists tests that were not collected: " + ", ".join(sorted(known))
        )
