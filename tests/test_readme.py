"""The README's code snippets run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = [
    b for b in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "import klj_reg" in b
]
FRAMEWORKS = {"FrEIA": "FrEIA", "nflows": "nflows", "normflows": "normflows", "zuko": "zuko"}


def test_the_readme_has_snippets_for_every_framework() -> None:
    for name in FRAMEWORKS:
        assert any(re.search(rf"^(import|from) {name}\b", b, re.M) for b in BLOCKS), name


@pytest.mark.parametrize("block", BLOCKS, ids=[f"snippet{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(block: str) -> None:
    for name, module in FRAMEWORKS.items():
        if re.search(rf"^(import|from) {name}\b", block, re.M):
            pytest.importorskip(module)
    with _no_klj_warning():
        exec(compile(block, "README.md", "exec"), {"__name__": "readme"})


class _no_klj_warning:
    """Fail on a klj-reg warning (e.g. an uncaptured layer or a doubled pass)."""

    def __enter__(self) -> None:
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc: object) -> None:
        self._catch.__exit__(*exc)
        ours = [w for w in self._seen if "klj" in str(w.message).lower()]
        assert not ours, [str(w.message) for w in ours]
