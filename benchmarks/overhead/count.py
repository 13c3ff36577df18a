"""The capture's host work per step, counted instead of timed: Python bytecodes and frames.

``python -m benchmarks.overhead.count --zoo PATTERNS --out DIR`` builds each zoo model twice
(same seed), attaches klj-reg to one, runs a few training steps until every layer's
self-check is done, then counts with ``sys.settrace`` (opcode events) what one more step
executes in *every* Python frame:

- ``forward``: the attached forward minus the plain forward (hooks, torch's hook path,
  klj-reg's callbacks, the pass's bookkeeping);
- ``penalty``: ``klj_reg.penalty(model, x)`` on that pass;
- ``backward``: the backward of NLL + penalty minus the plain backward;

and, apart, the part of the forward spent in klj-reg's own frames per captured layer, and
what an unattached twin of the model pays while the capture holds its class patches (a
watched method wraps the class: every instance runs through the wrapper). The plain step is
counted before anything is attached, so that it pays none of that.

A count does not depend on the machine's load, so two commits can be compared on a machine
whose step times drift by tens of percent between runs (this one: a plain step of 2.1-3.6
ms minutes apart). It does not weigh what a bytecode or a frame costs, nor torch's
operators (``--ops`` adds the aten operators the capture adds, counted with a dispatch
mode): wall time stays the measure of record (``python -m benchmarks overhead``, and
``benchmarks.overhead.compare`` across commits); a count says where the time goes and
whether a change moved it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import klj_reg

from ..common.records import commit_text, run_metadata
from . import zoo as Z
from .settings import Settings
from .variants import nll


class _Counter:
    """Bytecodes and frames executed while :meth:`run` calls ``fn`` (all frames, or only
    klj-reg's with ``own``)."""

    def __init__(self, own: bool = False) -> None:
        self.own = own
        self.codes = 0
        self.frames = 0

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if self.own and "klj_reg" not in frame.f_code.co_filename:
            return None
        self.frames += 1
        frame.f_trace_opcodes = True
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.codes += 1
        return self._local

    def run(self, fn: Callable[[], Any]) -> tuple[int, int, Any]:
        self.codes = self.frames = 0
        sys.settrace(self._trace)
        try:
            out = fn()
        finally:
            sys.settrace(None)
        return self.codes, self.frames, out


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count(entry: Z.ZooModel, settings: Settings, ops: bool = False) -> dict[str, Any]:
    """The counts of one zoo model (see the module docstring)."""
    torch.manual_seed(0)
    plain = Z.build(entry, settings)
    x = Z.batch(entry, plain, settings)
    for _ in range(3):
        nll(plain, x).backward()
    # The plain step is counted before anything is attached: once a capture holds a class
    # patch (a watched method), every instance of that class runs through its wrapper.
    every, own = _Counter(), _Counter(own=True)
    f0, n0, loss0 = every.run(lambda: nll(plain, x))
    b0, bn0, _ = every.run(loss0.backward)

    torch.manual_seed(0)
    flow = Z.build(entry, settings)
    capture = klj_reg.attach(flow.model)

    def penalty() -> torch.Tensor:
        return klj_reg.penalty(flow.model, x, alpha=settings.alpha, normaliser="dim")

    for _ in range(3):
        (nll(flow, x) + penalty()).backward()
    for site in capture.sites.values():  # the steady state: every layer verified
        site.checks_left = site.sample_checks_left = 0
    (nll(flow, x) + penalty()).backward()
    layers = len(capture.sites)

    f1, n1, loss1 = every.run(lambda: nll(flow, x))
    p, pn, value = every.run(penalty)
    total = loss1 + value
    b1, bn1, _ = every.run(total.backward)
    # What the patches cost an unattached instance of the same classes (the plain model,
    # counted again while the capture holds them).
    t, tn, loss2 = every.run(lambda: nll(plain, x))
    loss2.backward()
    klj_reg.clear(flow.model)
    k, kn, _ = own.run(lambda: nll(flow, x))
    row: dict[str, Any] = {
        "name": entry.name,
        "backend": entry.backend,
        "family": entry.family,
        "layers": layers,
        "forward": {"bytecodes": f1 - f0, "frames": n1 - n0},
        "penalty": {"bytecodes": p, "frames": pn},
        "backward": {"bytecodes": b1 - b0, "frames": bn1 - bn0},
        "klj_reg_forward_per_layer": {"bytecodes": k / layers, "frames": kn / layers},
        "unattached_twin": {"bytecodes": t - f0, "frames": tn - n0},
    }
    row["step"] = {
        key: sum(row[phase][key] for phase in ("forward", "penalty", "backward"))
        for key in ("bytecodes", "frames")
    }
    if ops:
        row["aten_ops"] = _aten(flow, plain, x, penalty)
    klj_reg.detach(flow.model)  # its patches given back: the next model's plain runs without
    return row


def _aten(flow: Any, plain: Any, x: torch.Tensor, penalty: Callable[[], torch.Tensor]) -> int:
    """aten operators of one attached step minus one plain step."""
    counts = []
    for model, extra in ((plain, None), (flow, penalty)):
        with _Ops() as mode:
            loss = nll(model, x)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
        counts.append(mode.count)
    return counts[1] - counts[0]


def _markdown(rows: list[dict[str, Any]], meta: dict[str, Any], ops: bool) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"# Host work of the capture per step, counted (commit `{commit_text(meta['commit'])}`)",
        "",
        f"Python {sys.version.split()[0]}, {versions}.",
        "",
        "Bytecodes (frames) in every Python frame, batch 256, self-checks done: the forward "
        "attached minus plain (plain counted before anything is attached), the penalty, the "
        "backward attached minus plain; klj-reg's own forward work per captured layer; and "
        "what an unattached twin's forward pays while the capture's class patches are held. "
        "`python -m benchmarks.overhead.count`.",
        "",
        "| model | layers | forward | penalty | backward | step | klj-reg per layer |"
        " unattached twin |" + (" aten ops |" if ops else ""),
        "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if ops else ""),
    ]
    for r in rows:
        cells = [
            f"{r[k]['bytecodes']:,} ({r[k]['frames']})"
            for k in ("forward", "penalty", "backward", "step")
        ]
        own = r["klj_reg_forward_per_layer"]
        line = (
            f"| {r['name']} | {r['layers']} | "
            + " | ".join(cells)
            + f" | {own['bytecodes']:.0f} ({own['frames']:.1f}) |"
        )
        twin = r.get("unattached_twin")
        line += f" {twin['bytecodes']:,} ({twin['frames']}) |" if twin else " |"
        lines.append(line + (f" {r['aten_ops']} |" if ops else ""))
    return "\n".join(lines) + "\n"


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Markdown: per model and per family, the step's bytecodes, frames and aten operators
    in two count reports (``after - before``; negative: less work)."""

    def fmt(a: float, b: float) -> str:
        return f"{a:,.0f} -> {b:,.0f} ({b - a:+,.0f})"

    old = {r["name"]: r for r in before["results"]}
    rows = [(old[r["name"]], r) for r in after["results"] if r["name"] in old]
    ops = all("aten_ops" in r for pair in rows for r in pair)
    head = "| {} | bytecodes | frames |" + (" aten ops |" if ops else "")
    rule = "|---|---:|---:|" + ("---:|" if ops else "")

    def line(name: str, a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
        def total(rs: list[dict[str, Any]], key: str) -> float:
            return float(sum(r["step"][key] if key != "aten_ops" else r[key] for r in rs))

        keys = ["bytecodes", "frames"] + (["aten_ops"] if ops else [])
        return f"| {name} | " + " | ".join(fmt(total(a, k), total(b, k)) for k in keys) + " |"

    families: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
    for pair in rows:
        families.setdefault(f"{pair[1]['family']} ({pair[1]['backend']})", []).append(pair)
    out = [
        f"# Host work per step, counted: `{commit_text(before['commit'])}` -> "
        f"`{commit_text(after['commit'])}`",
        "",
        "Per step (forward + penalty + backward, attached minus plain, self-checks done), "
        "summed over the models of each family and backend.",
        "",
        head.format("family (backend)"),
        rule,
    ]
    out += [line(k, [a for a, _ in v], [b for _, b in v]) for k, v in sorted(families.items())]
    out += ["", head.format("model"), rule]
    out += [line(b["name"], [a], [b]) for a, b in rows]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="", help="comma-separated zoo patterns (all: empty)")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=pathlib.Path,
        metavar=("BEFORE", "AFTER"),
        help="compare two count.json reports (into --out/compare.md) instead of counting",
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--ops", action="store_true", help="also count aten operators")
    parser.add_argument("--out", type=pathlib.Path, help="write count.md and count.json here")
    args = parser.parse_args(argv)
    if args.compare is not None:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        text = compare(before, after)
        print(text)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "compare.md").write_text(text)
        return
    settings = Settings(device="cpu", batch=args.batch)
    models = Z.zoo()
    if args.zoo:
        models = Z.select(models, args.zoo.split(","))
    rows = [count(entry, settings, args.ops) for entry in models]
    meta = run_metadata("cpu", sorted({entry.backend for entry in models}))
    text = _markdown(rows, meta, args.ops)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "count.md").write_text(text)
        report = {**meta, "batch": args.batch, "results": rows}
        (args.out / "count.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
