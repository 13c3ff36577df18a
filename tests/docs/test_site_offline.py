"""The documentation site reads offline: its formulas are MathML rendered at build time (no
raw TeX left, no script to fetch), and every script a page loads is served by the site."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
MATH_PAGES = ["math", "choosing-alpha", "reverse-kl", "adapters", "api"]


class _Page(HTMLParser):
    """A page's visible text outside code and MathML, its ``<math>`` count and script URLs."""

    SKIP = {"script", "style", "code", "pre", "math"}

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.scripts: list[str] = []
        self.maths = 0
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "script":
            self.scripts += [v for k, v in attrs if k == "src" and v]
        if tag == "math":
            self.maths += 1
        if tag in self.SKIP:
            self._skip += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self._skip -= 1

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.text.append(data)


def _read(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    return page


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mkdocs")
    out = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "--site-dir", str(out)],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", MATH_PAGES)
def test_formulas_are_rendered_at_build_time(site: Path, name: str) -> None:
    page = _read(site / name / "index.html")
    assert page.maths > 0
    text = "".join(page.text)
    for raw in ("\\(", "\\[", "$$", "\\frac", "\\mathrm", "\\log"):
        assert raw not in text, (raw, text[max(text.find(raw) - 80, 0) :][:200])


@pytest.mark.slow
def test_every_script_is_served_by_the_site(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    for path in pages:
        for src in _read(path).scripts:
            assert not re.match(r"^(https?:)?//", src), (path.relative_to(site), src)
            local = src.split("?")[0]
            target = site / local[1:] if local.startswith("/") else path.parent / local
            assert target.resolve().is_file(), (path.relative_to(site), src)


def _hooks() -> ModuleType:
    pytest.importorskip("latex2mathml")
    spec = importlib.util.spec_from_file_location("klj_docs_hooks", ROOT / "docs" / "hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_converter_renders_arithmatex_output() -> None:
    html = (
        '<p>For <span class="arithmatex">\\(N &lt; d\\)</span>, '
        '<span class="arithmatex">\\(\\text{log\\_abs}\\)</span>:</p>'
        '<div class="arithmatex">\\[\\sum_i \\log|d_i|\\]</div>'
    )
    out = _hooks().mathml(html)
    assert "\\" not in re.sub(r"<[^>]+>", "", out)
    assert out.count('display="inline"') == 2 and out.count('display="block"') == 1
    assert "<mtext>log_abs</mtext>" in out
    assert "&lt;" in out or "&#x0003C;" in out  # still escaped inside MathML


def test_a_formula_it_cannot_render_fails_the_strict_build(
    caplog: pytest.LogCaptureFixture,
) -> None:
    html = '<span class="arithmatex">\\(\\unknowncommand x\\)</span>'
    with caplog.at_level(logging.WARNING, logger="mkdocs"):
        assert _hooks().mathml(html, "page.md") == html
    assert any(
        r.levelno == logging.WARNING and r.name.startswith("mkdocs.") and "page.md" in r.message
        for r in caplog.records
    )
