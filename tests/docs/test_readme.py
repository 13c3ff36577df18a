"""The README's code snippets run as written, and the README stays a short front door."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.docs.snippets import release

README = Path(__file__).resolve().parents[2] / "README.md"
TEXT = README.read_text()
FENCES = re.findall(r"^```(\w*)[^\n]*\n(.*?)^```", TEXT, re.S | re.M)
BLOCKS = [code for lang, code in FENCES if lang == "python"]
FRAMEWORKS = {"FrEIA": "FrEIA", "nflows": "nflows", "normflows": "normflows", "zuko": "zuko"}


def test_the_readme_has_snippets_for_every_framework() -> None:
    for name in FRAMEWORKS:
        assert any(re.search(rf"^(import|from) {name}\b", b, re.M) for b in BLOCKS), name


def test_every_code_block_is_python_or_a_shell_command() -> None:
    assert {lang for lang, _ in FENCES} <= {"python", "bash"}


def test_the_readme_is_short_and_self_contained() -> None:
    assert len(TEXT) <= 8000, len(TEXT)
    hashes = [
        t
        for t in re.findall(r"\b[0-9a-f]{7,40}\b", TEXT)
        if re.search(r"[a-f]", t) and re.search(r"\d", t)
    ]
    assert not hashes, hashes  # no commit hashes: history belongs in the changelog
    assert "../" not in TEXT  # no paths outside the repository
    root = README.parent
    for target in re.findall(r"\]\(([^)#\s]+)", TEXT):
        if not target.startswith(("http://", "https://")):
            assert (root / target).exists(), target


@pytest.mark.parametrize("block", BLOCKS, ids=[f"snippet{i}" for i in range(len(BLOCKS))])
def test_snippet_runs(block: str) -> None:
    for name, module in FRAMEWORKS.items():
        if re.search(rf"^(import|from) {name}\b", block, re.M):
            pytest.importorskip(module)
    namespace: dict[str, Any] = {"__name__": "readme"}
    try:
        with _no_klj_warning():
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        release(namespace)


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
