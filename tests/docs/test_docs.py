"""Every Python code block of the documentation pages (docs/**/*.md) runs as written.

A page's blocks run in order in one namespace, so a later block may use what an earlier one
built; a page that imports a framework is skipped when that framework is not installed.
Illustrative fragments that cannot run are fenced as ``text``.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import pytest

from tests.docs.snippets import release

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)
FRAMEWORKS = ("FrEIA", "nflows", "normflows", "zuko", "pyro")
LANGUAGES = {"python", "bash", "text", "yaml"}


def python_blocks(text: str) -> list[str]:
    return [code for lang, code in FENCE.findall(text) if lang == "python"]


def run_page(name: str, blocks: list[str]) -> None:
    for framework in FRAMEWORKS:
        if any(re.search(rf"^(import|from) {framework}\b", b, re.M) for b in blocks):
            pytest.importorskip(framework)
    namespace: dict[str, Any] = {"__name__": "docs_" + re.sub(r"\W", "_", name)}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            for i, block in enumerate(blocks):
                exec(compile(block, f"{name} (block {i})", "exec"), namespace)
    finally:
        release(namespace)


def test_the_docs_have_pages_with_code() -> None:
    assert PAGES
    assert sum(len(python_blocks(p.read_text())) for p in PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=[p.relative_to(DOCS).as_posix() for p in PAGES])
def test_every_fence_has_a_known_language(page: Path) -> None:
    for lang, _ in FENCE.findall(page.read_text()):
        assert lang in LANGUAGES, f"{page.name}: a code block fenced as {lang!r}"


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if python_blocks(p.read_text())],
    ids=[p.relative_to(DOCS).as_posix() for p in PAGES if python_blocks(p.read_text())],
)
def test_page_code_runs(page: Path) -> None:
    run_page(page.relative_to(DOCS).as_posix(), python_blocks(page.read_text()))


def test_the_api_reference_covers_the_public_api() -> None:
    import klj_reg

    documented = set(
        re.findall(r"^::: klj_reg\.(?:\w+\.)?(\w+)$", (DOCS / "api.md").read_text(), re.M)
    )
    assert set(klj_reg.__all__) <= documented, set(klj_reg.__all__) - documented


# An NLL divided by D: ``....mean() / 8``, ``/ dim`` or ``/ D`` after a mean.
PER_DIM_NLL = re.compile(r"\.mean\(\)\s*/\s*(\d+|dim|D)\b")


def convention_breaks(code: str) -> list[str]:
    """Lines of ``code`` that add a penalty to a per-dimension NLL without making the penalty
    per dimension too (``normaliser="dim"``), and penalties added to such an NLL later."""
    per_dim = {m.group(0) for m in PER_DIM_NLL.finditer(code)}
    if not per_dim:
        return []
    return [
        line.strip()
        for line in code.splitlines()
        if "penalty(" in line and "normaliser" not in line and "=" in line
    ]


@pytest.mark.parametrize(
    "source",
    [*PAGES, ROOT / "README.md"],
    ids=[*(p.relative_to(DOCS).as_posix() for p in PAGES), "README.md"],
)
def test_one_loss_convention(source: Path) -> None:
    """Every code block adds the penalty to a per-sample NLL, or makes it per dimension
    (``normaliser="dim"``) next to a per-dimension one: never a per-sample penalty next to a
    per-dimension NLL."""
    blocks = python_blocks(source.read_text())
    assert not [line for block in blocks for line in convention_breaks(block)]


def test_the_convention_check_catches_a_mixed_loss() -> None:
    mixed = "nll = flow.log_prob(x).mean() / 8\nloss = nll + klj_reg.penalty(flow, x)\n"
    assert convention_breaks(mixed)
    fixed = mixed.replace("penalty(flow, x)", 'penalty(flow, x, normaliser="dim")')
    assert not convention_breaks(fixed)
