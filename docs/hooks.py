"""MkDocs hooks: the results pages' tables are generated from ``benchmarks/results/`` at build
time, by the same functions that write each benchmark's Markdown table, and the figures are
served from there (nothing is copied into ``docs/`` by hand).

In a page, ``<!-- results: KIND FOLDER -->`` is replaced by the table of the runs in
``benchmarks/results/FOLDER``; KIND is one of ``demo``, ``ood``, ``ood-mean`` (Table 1 in
brief), ``curves`` (learning curves of ``ood`` runs), ``selection`` (alpha chosen on a
validation split), ``outliers``, ``trainsize``, ``sweep``, ``overhead``, ``stability``,
``tabular`` (the alpha grid's rule, ranks and validation choice), ``calibrated`` (the
pre-registered OoD experiment's report, without its title). Figures
are linked as ``figures/<path under benchmarks/results>``.

Math is rendered at build time: every formula (``$...$``, ``$$...$$`` through
``pymdownx.arithmatex``, and the docstrings' ``:math:`` and ``.. math::``) becomes MathML,
which browsers draw without a script or a network; a formula the converter leaves
unrendered fails the strict build.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable
from html import unescape
from pathlib import Path
from typing import Any

from latex2mathml.converter import convert as tex_to_mathml
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MARKER = re.compile(r"<!-- results: ([\w-]+) (\S+) -->")


def _importable() -> None:
    """Put the repository on the import path (MkDocs restores it after loading this file)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def _runs(folder: Path, command: str) -> list[dict[str, Any]]:
    from benchmarks.cifar import report

    runs = report.command_runs(folder, command)
    if not runs:
        raise ValueError(f"no {command} runs under {folder}")
    return runs


def _demo(folder: Path) -> str:
    from benchmarks.toy import demo

    return demo.summary_md(json.loads((folder / "demo.json").read_text()))


def _ood(folder: Path) -> str:
    from benchmarks.cifar import report

    return report.table1_markdown(_runs(folder, "ood"))


def _ood_mean(folder: Path) -> str:
    """Table 1 in brief: per method and backend, the typicality AUROC % averaged over the four
    OoD sets (mean ± std over seeds) with the accuracy % in brackets, beside the paper's."""
    from benchmarks.cifar import report

    runs = _runs(folder, "ood")
    backends = sorted({r["config"]["backend"] for r in runs})
    rows = report.group(runs, "row")
    lines = [
        "| method | " + " | ".join(backends) + " | paper |",
        "|---" * (len(backends) + 2) + "|",
    ]
    for key in report.ordered_rows(rows):
        cells = [report.row_label(rows[(key,)])]
        for backend in backends:
            group = [r for r in rows[(key,)] if r["config"]["backend"] == backend]
            means = []
            for r in group:
                sets = [report.value(r, "auroc_typical", o) for o in report.OOD_SETS]
                means.append(None if None in sets else sum(sets) / len(sets))
            accuracy = report.mean_std(report.value(r, "accuracy") for r in group)
            text = report.cell(report.mean_std(means), None)
            cells.append(text + (f" ({accuracy[0]:.0f})" if accuracy else ""))
        paper = report.PAPER_TABLE1.get(key, {})
        known = [paper[o] for o in report.OOD_SETS if o in paper]
        cells.append(
            f"{sum(known) / len(known):.1f} ({paper['accuracy']:.0f})"
            if len(known) == len(report.OOD_SETS) and "accuracy" in paper
            else "-"
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _outliers(folder: Path) -> str:
    from benchmarks.cifar import outliers

    return outliers.markdown(_runs(folder, "outliers"))


def _trainsize(folder: Path) -> str:
    from benchmarks.cifar import trainsize

    return trainsize.markdown(_runs(folder, "trainsize"))


def _sweep(folder: Path) -> str:
    from benchmarks.cifar import sweep

    return sweep.markdown(_runs(folder, "sweep"))


def _stability(folder: Path) -> str:
    from benchmarks import stability

    return stability.summary_md(json.loads((folder / "stability.json").read_text()))


def _tabular(folder: Path) -> str:
    from benchmarks.tabular import report

    lines = (folder / "runs.jsonl").read_text().splitlines()
    return report.summary([json.loads(line) for line in lines if line.strip()])


def _calibrated(folder: Path) -> str:
    """The calibrated experiment's report as ``python -m benchmarks calibrated`` writes it,
    from its run records (the title line dropped: the page has its own)."""
    from benchmarks.cifar import calibrated_report

    text = calibrated_report.markdown(calibrated_report.analyse(folder))
    text = text.split("\n", 1)[1] if text.startswith("# ") else text
    shown = folder.relative_to(ROOT).as_posix()
    return text.replace("[preregistration.md](preregistration.md)", f"`{shown}/preregistration.md`")


def _curves(folder: Path) -> str:
    from benchmarks.cifar import curves

    return curves.markdown(_runs(folder, "ood"))


def _selection(folder: Path) -> str:
    """The alpha chosen on a validation split (``ood --select-alpha``), per backend."""
    lines = [
        "| backend | alpha | held-out accuracy % | held-out L_x | chosen |",
        "|---|---|---|---|---|",
    ]
    for path in sorted(folder.glob("*/validation/selection.json")):
        choice = json.loads(path.read_text())
        for c in choice["candidates"]:
            mark = "yes" if c["alpha"] == choice["alpha"] else ""
            lines.append(
                f"| {path.parent.parent.name} | {c['alpha']:g} | {c['accuracy']:.1f} | "
                f"{c['l_x']:.3f} | {mark} |"
            )
        lines.append(f"\nRule: {choice['rule']}.")
    if len(lines) == 2:
        raise ValueError(f"no selection.json under {folder}/*/validation")
    return "\n".join(lines) + "\n"


def _overhead(folder: Path) -> str:
    from benchmarks import overhead

    path = folder if folder.suffix == ".json" else folder / "cpu.json"
    return overhead.markdown(json.loads(path.read_text()))


RENDER: dict[str, Callable[[Path], str]] = {
    "demo": _demo,
    "ood": _ood,
    "ood-mean": _ood_mean,
    "curves": _curves,
    "selection": _selection,
    "outliers": _outliers,
    "trainsize": _trainsize,
    "sweep": _sweep,
    "overhead": _overhead,
    "stability": _stability,
    "tabular": _tabular,
    "calibrated": _calibrated,
}


def _demote(markdown: str, levels: int = 2) -> str:
    """Push the generated headings below the page's own."""
    return re.sub(r"^(#+) ", lambda m: "#" * (len(m.group(1)) + levels) + " ", markdown, flags=re.M)


def render(kind: str, folder: str) -> str:
    """The Markdown table of ``benchmarks/results/<folder>``, as its benchmark writes it."""
    return _demote(RENDER[kind](RESULTS / folder)).strip() + "\n"


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    _importable()
    return MARKER.sub(lambda m: render(m.group(1), m.group(2)), markdown)


ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj):<code>~?(.*?)</code>")
MATH_ROLE = re.compile(r":math:<code>(.*?)</code>", re.S)
MATH_CODE = re.compile(
    r"<p>\.\. math::</p>\s*<div class=\"highlight\"><pre><span></span>"
    r"<code>(.*?)</code></pre></div>",
    re.S,
)
MATH_BLOCK = re.compile(r"\.\. math::\s*(.*?)</p>", re.S)


def on_page_content(html: str, page: Any, config: Any, files: Files) -> str:
    """The docstrings are written in reStructuredText's inline roles; in the API reference
    show ``:func:`x``` as code and ``:math:`` as math, and ``Example::`` as ``Example:``; then
    render every formula as MathML."""
    html = ROLE.sub(r"<code>\1</code>", html)
    html = MATH_ROLE.sub(r'<span class="arithmatex">\(\1\)</span>', html)
    html = MATH_CODE.sub(r'<div class="arithmatex">\\[\1\\]</div>', html)
    html = MATH_BLOCK.sub(r'</p><div class="arithmatex">\[\1\]</div>', html)
    return mathml(html.replace("::</p>", ":</p>"), page.file.src_uri)


# pymdownx.arithmatex's generic output (and the API reference's, above): TeX, HTML-escaped.
TEX = re.compile(r'<(span|div) class="arithmatex">\\(?:\((.*?)\\\)|\[(.*?)\\\])</\1>', re.S)
TEXT_ESCAPE = re.compile(r"(<mtext>[^<]*)\\([_%&$#])")
LOG = logging.getLogger("mkdocs.hooks.math")


def mathml(html: str, where: str = "") -> str:
    """Every arithmatex formula in ``html`` as MathML (``display="block"`` for ``\\[...\\]``);
    a formula the converter cannot render is left as TeX with a warning (an error under
    ``--strict``)."""

    def render(m: re.Match[str]) -> str:
        tag, inline, block = m.groups()
        tex = unescape(re.sub(r"<[^>]+>", "", inline if block is None else block)).strip()
        try:
            out = tex_to_mathml(tex, display="inline" if block is None else "block")
        except Exception as error:  # the converter's own exceptions have no common base
            LOG.warning("%s: cannot render $%s$ as MathML: %s", where, tex, error)
            return m.group(0)
        while TEXT_ESCAPE.search(out):  # \_ in \text{...}
            out = TEXT_ESCAPE.sub(r"\1\2", out)
        if "\\" in re.sub(r"<[^>]+>", "", out):
            LOG.warning("%s: $%s$ has a command the MathML converter does not know", where, tex)
            return m.group(0)
        return f'<{tag} class="arithmatex">{out}</{tag}>'

    return TEX.sub(render, html)


def on_files(files: Files, config: Any) -> Files:
    """Serve ``benchmarks/results/**/*.png`` as ``figures/...``."""
    for path in sorted(RESULTS.rglob("*.png")):
        uri = "figures/" + path.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files
