"""Structural performance guarantees of capture, counted rather than timed, per backend.

- no extra forward pass: ``loss_fn(x, c) + klj_reg.penalty(model, x)`` calls every submodule
  with parameters (every scale subnetwork) as often as the loss alone, and the backward none;
- nothing is retained: no records or stashed tensors after ``penalty()``, and a 1,000-step
  training loop keeps hooks, records and live tensors flat;
- capture adds no graph break under ``torch._dynamo``, and a compiled model with capture
  attached gives the eager penalty;
- under bf16 autocast the penalty is float32 and finite.

Models: a small FrEIA ``SequenceINN`` of ``AllInOneBlock`` and the ``training_model(context)``
of tests/adapters/test_nflows.py, test_normflows.py and test_zuko.py (each returns the model
and its usual training loss ``(x, c) -> Tensor``; splines, MAF, ActNorm, couplings). The long
loop and the compiler tests use the tiny flows of ``benchmarks.common.tabular`` (D = 4, two
layers of ActNorm-like scaling + affine coupling, or MAF), to keep the file fast.
"""

from __future__ import annotations

import dis
import gc
import importlib
import json
import math
import os
import re
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import klj_reg
from klj_reg import hooks
from klj_reg.records import Factor, LayerRecord

BACKENDS = ("freia", "nflows", "normflows", "zuko")
FREIA_DIM = 4
TINY_DIM = 4
Loss = Callable[[Tensor, "Tensor | None"], Tensor]


# ----------------------------------------------------------------------------- models


def _freia_model(context: bool) -> tuple[nn.Module, Loss, int, int]:
    ff = pytest.importorskip("FrEIA.framework")
    fm = pytest.importorskip("FrEIA.modules")
    if context:
        pytest.skip("the FrEIA model here is unconditional")

    def subnet(c_in: int, c_out: int) -> nn.Module:
        return nn.Sequential(nn.Linear(c_in, 16), nn.ReLU(), nn.Linear(16, c_out))

    inn = ff.SequenceINN(FREIA_DIM)
    for _ in range(2):
        inn.append(fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0)

    def loss(x: Tensor, c: Tensor | None) -> Tensor:
        z, log_det = inn(x)
        return (0.5 * z.square().sum(1) - log_det).mean()

    return inn, loss, FREIA_DIM, 0


def model_for(backend: str, context: bool = False) -> tuple[nn.Module, Loss, int, int]:
    """``(model, loss_fn, D, context features)`` for ``backend``, or skip with the reason."""
    if backend == "freia":
        return _freia_model(context)
    pytest.importorskip(backend)
    try:
        module = importlib.import_module(f"tests.adapters.test_{backend}")
    except ImportError as error:
        pytest.skip(f"tests/adapters/test_{backend}.py cannot be imported: {error}")
    make = getattr(module, "training_model", None)
    if make is None:
        pytest.skip(f"tests/adapters/test_{backend}.py defines no training_model(context) yet")
    model, loss = make(context)
    dim = next(getattr(module, n) for n in ("FEATURES", "DIM") if hasattr(module, n))
    features = next(
        (getattr(module, n) for n in ("CONTEXT_FEATURES", "CONTEXT_DIM") if hasattr(module, n)), 3
    )
    return model, loss, int(dim), int(features) if context else 0


def tiny(backend: str, kind: str = "realnvp") -> tuple[nn.Module, Loss, int, int]:
    """``benchmarks.common.tabular``'s flow of ``backend`` on D = 4 with two layers, hidden 8."""
    pytest.importorskip({"freia": "FrEIA"}.get(backend, backend))
    if backend == "freia" and kind == "maf":
        pytest.skip("FrEIA has no autoregressive layer")
    try:
        from benchmarks.common.tabular import tabular_flow
    except ImportError as error:
        pytest.skip(f"benchmarks/common/tabular.py cannot be imported: {error}")
    flow = tabular_flow(backend, TINY_DIM, layers=2, hidden=8, kind=kind)
    with torch.no_grad():  # away from the identity it starts at, so that the penalty is > 0
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))

    def loss(x: Tensor, c: Tensor | None) -> Tensor:
        z, log_det = flow(x)
        return (0.5 * z.square().sum(1) - log_det).mean()

    return flow.model, loss, TINY_DIM, 0


def inputs(dim: int, features: int, batch: int = 16) -> tuple[Tensor, Tensor | None]:
    x = torch.randn(batch, dim)
    return x, (torch.randn(batch, features) if features else None)


@contextmanager
def call_counts(model: nn.Module) -> Iterator[Counter[int]]:
    """Counts forward calls of every submodule (by id) while active."""
    counts: Counter[int] = Counter()

    def hook(module: nn.Module, args: Any) -> None:
        counts[id(module)] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def hook_count(model: nn.Module) -> int:
    """Module hooks and klj-reg method callbacks installed on ``model``."""
    total = 0
    for m in model.modules():
        total += len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        found = hooks.binding(m)
        if found is not None:
            total += sum(len(v) for v in (*found.before.values(), *found.after.values()))
            total += len(found.pre) + len(found.forward)
    return total


def live(kinds: tuple[type, ...]) -> int:
    """Objects of ``kinds`` alive (tracked by the garbage collector) after a collection."""
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance on deprecated module-level proxies
        return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_extra_forward_pass(backend: str, context: bool) -> None:
    model, loss_fn, dim, features = model_for(backend, context)
    x, c = inputs(dim, features)
    with call_counts(model) as plain:
        loss_fn(x, c)
    capture = klj_reg.attach(model)
    subnets = [net for site in capture.sites.values() for net in site.subnets]
    assert subnets, "no scale subnetwork was marked by the adapters"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "penalty ran its own pass"
        with call_counts(model) as penalised:
            loss = loss_fn(x, c) + klj_reg.penalty(model, x, alpha=1e-2)
    # Every module with parameters (subnetworks and their layers) runs as often as in the
    # loss alone; parameter-free helpers (e.g. FrEIA's Softplus for the global scale) may
    # be reused by the penalty to turn stored tensors into log|d|.
    weighted = {id(m) for m in model.modules() if any(True for _ in m.parameters())}
    assert {k: v for k, v in penalised.items() if k in weighted} == {
        k: v for k, v in plain.items() if k in weighted
    }
    for net in subnets:
        assert penalised[id(net)] == plain[id(net)] >= 1
    if backend == "freia":  # coupling subnets run exactly once per step
        assert all(penalised[id(net)] == 1 for net in subnets)
    with call_counts(model) as backward:
        loss.backward()
    assert not backward


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_extra_pass_on_the_sampling_pass(backend: str) -> None:
    """Reverse KL: ``penalty(model)`` after the framework's own sampling pass (attached with
    ``direction="sample"``) runs no module again, forward or in backward."""
    pytest.importorskip({"freia": "FrEIA"}.get(backend, backend))
    try:
        from benchmarks.common.tabular import tabular_flow
        from benchmarks.overhead import banana_log_prob, sample_and_log_q
    except ImportError as error:
        pytest.skip(f"benchmarks cannot be imported: {error}")
    flow = tabular_flow(backend, TINY_DIM, layers=2, hidden=8)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.5 * torch.randn_like(p))
    model = flow.model

    def loss() -> Tensor:
        x, log_q = sample_and_log_q(flow, 16, TINY_DIM)
        return (log_q - banana_log_prob(x)).mean()

    with call_counts(model) as plain:
        loss()
    capture = klj_reg.attach(model, direction="sample")
    subnets = [net for site in capture.sites.values() for net in site.subnets]
    assert subnets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with call_counts(model) as penalised:
            total = loss() + klj_reg.penalty(model, alpha=1e-2)
    weighted = {id(m) for m in model.modules() if any(True for _ in m.parameters())}
    assert {k: v for k, v in penalised.items() if k in weighted} == {
        k: v for k, v in plain.items() if k in weighted
    }
    for net in subnets:
        assert penalised[id(net)] == plain[id(net)] >= 1
    with call_counts(model) as backward:
        total.backward()
    assert not backward
    klj_reg.detach(model)


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_releases_records(backend: str) -> None:
    model, loss_fn, dim, features = model_for(backend)
    x, c = inputs(dim, features)
    capture = klj_reg.attach(model)
    loss_fn(x, c)
    assert capture.records
    klj_reg.penalty(model, x, alpha=1e-2)
    assert not capture.records
    assert all(not site.state for site in capture.sites.values())


@pytest.mark.parametrize("context", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_capture_makes_no_reference_cycles(backend: str, context: bool) -> None:
    """A captured training step leaves no more cyclic garbage than the plain step: what the
    pass made (zuko's per-call transforms, the tensors they hold) is freed when the pass
    drops it, not when Python's cyclic collector runs."""
    model, loss_fn, dim, features = model_for(backend, context)
    x, c = inputs(dim, features)
    plain = cyclic_garbage(model, loss_fn, x, c, attach=False)
    assert cyclic_garbage(model, loss_fn, x, c, attach=True) <= plain


def cyclic_garbage(model: nn.Module, loss_fn: Loss, x: Tensor, c: Any, attach: bool) -> int:
    """Objects Python's cyclic collector frees after one step (captured with ``attach``)."""
    if attach:
        klj_reg.attach(model)
    loss_fn(x, c).backward()  # warm-up: adapters' one-time probes and caches
    klj_reg.clear(model)
    gc.collect()
    gc.disable()
    try:
        loss = loss_fn(x, c)
        if attach:
            loss = loss + klj_reg.penalty(model, x, alpha=1e-2)
        loss.backward()
        del loss
        return gc.collect()
    finally:
        gc.enable()


@pytest.mark.parametrize(
    "backend, kind",
    [(b, "realnvp") for b in BACKENDS] + [("normflows", "maf")],  # MAF: D passes per inverse
)
@pytest.mark.slow
def test_training_loop_does_not_grow(backend: str, kind: str) -> None:
    model, loss_fn, dim, features = tiny(backend, kind)
    x, c = inputs(dim, features, batch=8)
    capture = klj_reg.attach(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)
    snapshots = {}
    for step in range(1, 1001):
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(x, c) + klj_reg.penalty(model, x, alpha=1e-2)
        loss.backward()
        optimiser.step()
        assert not capture.records
        if step in (100, 1000):
            del loss
            snapshots[step] = (
                hook_count(model),
                len(capture.handles),
                len(capture.sites),
                sum(len(site.state) for site in capture.sites.values()),
                live((Factor, LayerRecord)),
                live((Tensor,)),
            )
    assert snapshots[100] == snapshots[1000]
    assert snapshots[1000][3:5] == (0, 0)  # no stashed subnet output, no record alive
    assert math.isfinite(float(loss_fn(x, c).detach()))


def _explain(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[int, Counter[str]]:
    """Graphs dynamo makes of ``fn(x)`` and its break reasons, with where each happened."""
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(fn)(x)
    reasons: Counter[str] = Counter()
    for reason in explanation.break_reasons:
        frame = reason.user_stack[-1] if reason.user_stack else None
        where = f"{frame.filename}:{frame.lineno}" if frame is not None else "?"
        reasons[f"{reason.reason.splitlines()[0]} at {where}"] += 1
    return int(explanation.graph_count), reasons


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.slow
def test_capture_adds_no_graph_break(backend: str) -> None:
    """Capture's hooks add no break of their own. Where the framework's own forward breaks
    (e.g. nflows' ActNorm branches on a tensor), the broken layers' ``Module.__call__`` runs
    in an eager frame and dynamo compiles their capture hooks as frames of their own (graphs
    without operators, or a reshape): at most one more graph per captured layer, and none
    where the framework's forward is one graph."""
    model, loss_fn, dim, features = tiny(backend)
    x, c = inputs(dim, features, batch=8)

    def forward(x: Tensor) -> Tensor:
        return loss_fn(x, c)

    graphs_before, reasons_before = _explain(forward, x)
    capture = klj_reg.attach(model)
    graphs_after, reasons_after = _explain(forward, x)
    torch._dynamo.reset()
    assert reasons_after == reasons_before
    if not reasons_before:
        assert graphs_after == graphs_before == 1
    else:
        assert graphs_after - graphs_before <= len(capture.sites)


@pytest.mark.parametrize(
    "backend, compiler", [("freia", "inductor"), ("nflows", "aot_eager"),
                          ("normflows", "aot_eager"), ("zuko", "aot_eager")],
)  # fmt: skip
@pytest.mark.slow
def test_compiled_model_gives_the_eager_penalty(backend: str, compiler: str) -> None:
    model, loss_fn, dim, features = tiny(backend)
    x, c = inputs(dim, features, batch=8)
    klj_reg.attach(model)  # before torch.compile, as documented
    loss_fn(x, c)
    eager = klj_reg.penalty(model, x, alpha=1e-2)
    torch._dynamo.reset()
    compiled: Loss
    target: Any
    if backend == "freia":  # the module itself: its forward is the framework's call
        compiled_model = torch.compile(model, backend=compiler)

        def compiled_loss(x: Tensor, c: Tensor | None) -> Tensor:
            z, log_det = compiled_model(x)
            return (0.5 * z.square().sum(1) - log_det).mean()

        compiled, target = compiled_loss, compiled_model
    else:  # the training loss that calls the framework (log_prob / forward_kld)
        compiled, target = torch.compile(loss_fn, backend=compiler), model
    try:
        loss = compiled(x, c)
        value = klj_reg.penalty(target, x, alpha=1e-2)
        (loss + value).backward()
    finally:
        torch._dynamo.reset()
    assert eager > 1e-4
    torch.testing.assert_close(value, eager, rtol=1e-5, atol=1e-6)
    assert any(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_is_float32_under_bf16_autocast(backend: str) -> None:
    model, loss_fn, dim, features = model_for(backend)
    x, c = inputs(dim, features)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss_fn(x, c)
    except Exception as error:  # the framework itself, before klj-reg is involved
        pytest.skip(f"{backend} fails under bf16 autocast without klj-reg: {error}")
    klj_reg.attach(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(x, c)
        value = klj_reg.penalty(model, x, alpha=1e-2)
    assert value.dtype == torch.float32
    assert torch.isfinite(value)
    (loss + value).backward()


class ComputeOps(TorchDispatchMode):
    """Counts aten operators that compute (not views) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not func.is_view:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_operators_do_not_grow_with_the_number_of_layers(backend: str) -> None:
    """Every layer's factors join their group's one expression through views: once the
    self-checks are done, the penalty of a 6-layer flow computes with as many operators as
    that of a 2-layer one (shared activations, signs and clamps folded in)."""
    pytest.importorskip({"freia": "FrEIA"}.get(backend, backend))
    from benchmarks.common.tabular import tabular_flow

    counts = []
    for layers in (2, 6):
        flow = tabular_flow(backend, 8, layers=layers, hidden=8)
        with torch.no_grad():
            for p in flow.parameters():
                p.add_(0.3 * torch.randn_like(p))
        capture = klj_reg.attach(flow.model)
        x = torch.randn(16, 8)
        flow(x)
        klj_reg.penalty(flow.model, x, alpha=1e-2)
        for site in capture.sites.values():
            site.checks_left = 0
        flow(x)
        with ComputeOps() as ops:
            value = klj_reg.penalty(flow.model, x, alpha=1e-2)
        assert value.item() > 0
        counts.append(ops.count)
    assert counts[0] == counts[1], f"{backend}: {counts[0]} operators (2 layers), {counts[1]} (6)"


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_penalty_compiles_once(backend: str) -> None:
    """``fused=True`` keeps one compiled function per model structure over many steps, even
    where an adapter builds new closures on every call (nflows), and gives the eager value."""
    model, loss_fn, dim, features = tiny(backend)
    x, c = inputs(dim, features, batch=8)
    klj_reg.attach(model)
    for _ in range(4):
        loss_fn(x, c)
        fused = klj_reg.penalty(model, x, fused=True, alpha=1e-2)
    loss_fn(x, c)
    eager = klj_reg.penalty(model, x, alpha=1e-2)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    assert len(klj_reg.attach(model).compiled) == 1  # attach returns the existing capture


@pytest.mark.slow
def test_fused_penalty_compiles_every_model_structure_of_a_process() -> None:
    """Each model structure's compiled divergence has a code object of its own: past dynamo's
    recompile limit (8; 2 here) a shared one would run new structures eagerly, silently."""
    pytest.importorskip("FrEIA")
    from torch._dynamo.utils import counters

    from benchmarks.common.tabular import tabular_flow

    name = (
        "recompile_limit"
        if hasattr(torch._dynamo.config, "recompile_limit")
        else "cache_size_limit"
    )
    torch._dynamo.reset()
    with torch._dynamo.config.patch({name: 2}):
        for dim in (4, 5, 6, 7):
            flow = tabular_flow("freia", dim, layers=2, hidden=8)
            klj_reg.attach(flow.model)
            x = torch.randn(8, dim)
            flow(x)
            before = counters["stats"]["unique_graphs"]
            klj_reg.penalty(flow.model, x, fused=True, alpha=1e-2).backward()
            assert counters["stats"]["unique_graphs"] == before + 1, f"D = {dim} ran eagerly"
    torch._dynamo.reset()


def test_fused_penalty_compiles_once_beside_per_call_maps() -> None:
    """normflows' spline layers beside affine ones (their factors are the spline's own
    log-derivatives, or on sampling passes maps holding one call's state): ``fused=True``
    compiles once instead of a new function every step; the value is the eager one."""
    nf = pytest.importorskip("normflows")
    torch.manual_seed(0)
    flows = [
        nf.flows.AutoregressiveRationalQuadraticSpline(4, 1, 8),
        nf.flows.MaskedAffineAutoregressive(4, 8),
        nf.flows.CoupledRationalQuadraticSpline(4, 1, 8, reverse_mask=True),
    ]
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(4), flows)
    capture = klj_reg.attach(model)
    for _ in range(4):
        x = torch.randn(16, 4)
        model.forward_kld(x)
        fused = klj_reg.penalty(model, x, fused=True, alpha=1e-2)
        model.forward_kld(x)
        eager = klj_reg.penalty(model, x, alpha=1e-2)
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-7)
    assert len(capture.compiled) == 1


@pytest.mark.slow
def test_overhead_benchmark_runs(tmp_path: Any) -> None:
    """``python -m benchmarks overhead --quick`` measures every requested variant and writes
    its JSON and Markdown; a second pass shows up as the model's operators run twice, the
    floor as the penalty's arithmetic alone, hooks as the capture's forward without a
    penalty, plain-again as plain."""
    pytest.importorskip("FrEIA")
    overhead = pytest.importorskip("benchmarks.overhead")
    variants = "plain,plain-again,hooks,floor,capture,second-pass"
    argv = ["--quick", "--device", "cpu", "--backend", "freia", "--models", "tabular"]
    assert overhead.main([*argv, "--variants", variants, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    assert (tmp_path / "cpu-quick.md").read_text().startswith("# KLJ penalty overhead")
    (result,) = report["results"]
    entries = result["variants"]
    assert set(entries) == set(variants.split(","))
    for entry in entries.values():
        assert "error" not in entry and "profile_error" not in entry
        assert len(entry["times_ms"]) == report["settings"]["tabular_reps"]
        assert math.isfinite(entry["ratio"]) and entry["ratio"] > 0
    forward = entries["plain"]["ops"]["forward"]
    assert entries["second-pass"]["ops"]["penalty"] > forward  # the model ran again
    assert entries["capture"]["ops"]["penalty"] < entries["second-pass"]["ops"]["penalty"]
    assert entries["plain-again"]["ops"] == entries["plain"]["ops"]
    floor = entries["floor"]["ops"]
    assert floor["forward"] == forward  # no hooks, no second pass
    assert 0 < floor["penalty"] < entries["capture"]["ops"]["penalty"]
    hooks = entries["hooks"]["ops"]
    assert hooks["forward"] == entries["capture"]["ops"]["forward"]  # the capture's own pass
    assert "penalty" not in hooks and hooks["backward"] == entries["plain"]["ops"]["backward"]
    for entry in entries.values():
        assert list(entry["phases_ms"]) == list(overhead.PHASES)
        assert all(ms >= 0 for ms in entry["phases_ms"].values())
    phase_row = r"\| freia \| " + r" \| ".join([r"[\d.]+ / [\d.]+ / [\d.]+ / [\d.]+"] * 6)
    assert re.search(phase_row, (tmp_path / "cpu-quick.md").read_text())


@pytest.mark.slow
def test_overhead_reverse_kl_variant_runs_no_extra_pass(tmp_path: Any) -> None:
    """``--models reverse-kl``: the penalty read from the sampling pass adds its arithmetic
    only; the second pass on the samples runs the model again."""
    pytest.importorskip("zuko")
    overhead = pytest.importorskip("benchmarks.overhead")
    argv = ["--quick", "--device", "cpu", "--backend", "zuko", "--models", "reverse-kl"]
    variants = "plain,capture,second-pass"
    assert overhead.main([*argv, "--variants", variants, "--out", str(tmp_path)]) == 0
    (result,) = json.loads((tmp_path / "cpu-quick.json").read_text())["results"]
    entries = result["variants"]
    assert result["model"] == "reverse-kl" and set(entries) == set(variants.split(","))
    for entry in entries.values():
        assert "error" not in entry and "profile_error" not in entry
    capture, second = entries["capture"]["ops"], entries["second-pass"]["ops"]
    assert 0 < capture["penalty"] < second["penalty"]  # second: the model ran again
    assert capture["backward"] < second["backward"]
    assert "## reverse-kl" in (tmp_path / "cpu-quick.md").read_text()


def test_overhead_phases_split_each_timed_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """The phase clock's spans of a step are its marks' differences, inside the step's own
    time; a step that does not mark each phase boundary once is an error, not a table. The
    host clock is replaced by a counter (each reading one second later), so the expected
    spans are exact."""
    overhead = pytest.importorskip("benchmarks.overhead")
    ticks = iter(range(10**6))
    monkeypatch.setattr(overhead.time, "perf_counter", lambda: float(next(ticks)))

    def step(clock: Any = None) -> None:
        for _ in range(len(overhead.PHASES) + 1):
            clock.mark()

    times, phases = overhead.time_steps({"a": step, "b": step}, 3, torch.device("cpu"), 0)
    for name in ("a", "b"):
        # start, five marks, end: four one-second phases in a six-second step
        assert times[name] == [6.0] * 3
        assert phases[name] == [[1.0] * len(overhead.PHASES)] * 3

    def short(clock: Any = None) -> None:
        clock.mark()

    with pytest.raises(RuntimeError, match="marks"):
        overhead.time_steps({"short": short}, 1, torch.device("cpu"), 0)


@pytest.mark.slow
def test_prepared_gpu_check_runs_without_a_gpu(tmp_path: Any) -> None:
    """``benchmarks/gpu_check.sh`` (the one script a session lent a GPU runs) works end to end
    with ``KLJ_DEVICE=cpu``: environment report, then the overhead table under ``$OUT``."""
    pytest.importorskip("FrEIA")
    root = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path),
        KLJ_DEVICE="cpu",
        KLJ_OVERHEAD_ARGS="--quick --backend freia --models tabular --variants plain,capture",
    )
    run = subprocess.run(
        ["bash", str(root / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "FrEIA" in (tmp_path / "env.txt").read_text()
    report = json.loads((tmp_path / "cpu-quick.json").read_text())
    (result,) = report["results"]
    assert set(result["variants"]) == {"plain", "capture"}
    assert "capture" in (tmp_path / "overhead.log").read_text()


# ------------------------------------------------------------------------ the model zoo


def _zoo() -> Any:
    try:
        from benchmarks.overhead import zoo
    except ImportError as error:
        pytest.skip(f"benchmarks cannot be imported: {error}")
    return zoo


def _zoo_names() -> list[str]:
    """Every zoo model of the small and image sizes (the tabular ones are the same layers
    at D = 64): one per layer family and framework."""
    try:
        from benchmarks.overhead import zoo
    except ImportError:
        return []
    return [m.name for m in zoo.zoo() if m.size != "tabular"]


ZOO_NAMES = _zoo_names()


def zoo_model(name: str, layers: int | None = None) -> tuple[nn.Module, Loss, Tensor]:
    """The zoo model ``name`` at ``--quick`` size (D = 4, 2 layers, hidden 8; tiny image
    flows), or with ``layers`` layers, its NLL loss and a batch of 16."""
    zoo = _zoo()
    from benchmarks.overhead import Settings, nll

    (entry,) = [m for m in zoo.zoo() if m.name == name]
    pytest.importorskip({"freia": "FrEIA"}.get(entry.backend, entry.backend))
    torch.manual_seed(0)
    settings = Settings(device="cpu", quick=True, batch=16, image_batch=2)
    if layers is None:
        flow = zoo.build(entry, settings)
    else:
        flow = entry.build(8, layers, 8)
        with torch.no_grad():
            for p in flow.parameters():
                if p.dtype.is_floating_point:
                    p.add_(0.3 * torch.randn_like(p))
    x = zoo.batch(entry, flow, settings)
    if layers is not None:
        x = torch.randn(16, 8)

    def loss(x: Tensor, c: Tensor | None) -> Tensor:
        return nll(flow, x)

    return flow.model, loss, x


@pytest.mark.parametrize("name", ZOO_NAMES)
def test_zoo_no_extra_forward_pass(name: str) -> None:
    """Every zoo family: the penalty runs no module with parameters again, forward or in
    backward, and reads every captured layer's scales from the user's pass."""
    model, loss_fn, x = zoo_model(name)
    with call_counts(model) as plain:
        loss_fn(x, None)
    capture = klj_reg.attach(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. "penalty ran its own pass"
        warnings.filterwarnings("ignore", message=".*softmax.*")  # nflows' spline init note
        with call_counts(model) as penalised:
            loss = loss_fn(x, None) + klj_reg.penalty(model, x, alpha=1e-2)
    assert capture.sites, "no layer was captured"
    weighted = {id(m) for m in model.modules() if any(True for _ in m.parameters())}
    assert {k: v for k, v in penalised.items() if k in weighted} == {
        k: v for k, v in plain.items() if k in weighted
    }
    with call_counts(model) as backward:
        loss.backward()
    assert not backward
    assert not capture.records


@pytest.mark.parametrize("name", ZOO_NAMES)
@pytest.mark.slow
def test_zoo_capture_makes_no_reference_cycles(name: str) -> None:
    """Every zoo family: a captured step leaves no more cyclic garbage than the plain one."""
    model, loss_fn, x = zoo_model(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = cyclic_garbage(model, loss_fn, x, None, attach=False)
        assert cyclic_garbage(model, loss_fn, x, None, attach=True) <= plain


@pytest.mark.parametrize("name", [n for n in ZOO_NAMES if not n.startswith("glow/")])
def test_zoo_penalty_operators_do_not_grow_with_the_number_of_layers(name: str) -> None:
    """Every tabular zoo family: after the self-checks, the penalty of a 6-layer flow runs as
    many operators as that of a 2-layer one."""
    counts = []
    for layers in (2, 6):
        model, loss_fn, x = zoo_model(name, layers=layers)
        capture = klj_reg.attach(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss_fn(x, None)
            klj_reg.penalty(model, x, alpha=1e-2)
            for site in capture.sites.values():
                site.checks_left = 0
            loss_fn(x, None)
            with ComputeOps() as ops:
                value = klj_reg.penalty(model, x, alpha=1e-2)
        assert value.item() > 0
        counts.append(ops.count)
    assert counts[0] == counts[1], f"{name}: {counts[0]} operators (2 layers), {counts[1]} (6)"


@pytest.mark.slow
def test_overhead_zoo_runs_quick(tmp_path: Any) -> None:
    """``--models zoo --quick`` on one small model per family (and a tiny Glow): every
    reference variant and the capture are measured on the thread CPU clock, (capture -
    floor) is reported with its interquartile range, the load is recorded, and the floor
    runs the model's own forward only."""
    pytest.importorskip("FrEIA")
    pytest.importorskip("zuko")
    pytest.importorskip("nflows")
    overhead = pytest.importorskip("benchmarks.overhead")
    picks = [
        "affine-coupling/zuko/small",
        "maf/zuko/small",
        "rqs-coupling/zuko/small",
        "rqs-autoregressive/nflows/small",
        "actnorm-lu/freia/small",
        "glow/freia/image",
    ]
    argv = ["--quick", "--device", "cpu", "--models", "zoo", "--zoo", ",".join(picks)]
    threads = torch.get_num_threads()
    try:
        assert overhead.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "cpu-zoo-quick.json").read_text())
    assert report["settings"]["clock"] == "cpu" and len(report["load_before"]) == 3
    results = {r["name"]: r for r in report["results"]}
    assert set(results) == set(picks)
    for r in results.values():
        assert set(r["variants"]) == set(overhead.ZOO_VARIANTS)
        for entry in r["variants"].values():
            assert "error" not in entry and "profile_error" not in entry
        found = r["capture_minus_floor"]
        assert found["q25"] <= found["median"] <= found["q75"]
        assert list(found["phases"]) == list(overhead.PHASES)
        v = r["variants"]
        assert v["floor"]["ops"]["forward"] == v["plain"]["ops"]["forward"]
        assert v["dispatch"]["ops"]["forward"] == v["plain"]["ops"]["forward"]
        assert v["hooks"]["ops"]["forward"] == v["capture"]["ops"]["forward"]
        # The capture adds at most one operator to the forward: the pass's detached input.
        assert v["hooks"]["ops"]["forward"] <= v["plain"]["ops"]["forward"] + 1
        assert 1 <= r["captured_layers"] <= r["factors"]
    text = (tmp_path / "cpu-zoo-quick.md").read_text()
    assert "µs per captured layer" in text
    assert text.startswith("# KLJ capture overhead over the arithmetic floor")
    assert "thread_time" in text and "| actnorm-lu/freia/small |" in text


@pytest.mark.slow
def test_overhead_zoo_compiled_column(tmp_path: Any) -> None:
    """``--variants ...,compiled,compiled+capture`` times the flow's forward through
    ``torch.compile`` without klj-reg and attached before compiling; the zoo table shows both
    and their ratio (the capture's cost with the model compiled)."""
    pytest.importorskip("zuko")
    overhead = pytest.importorskip("benchmarks.overhead")
    argv = ["--quick", "--device", "cpu", "--models", "zoo", "--zoo", "affine-coupling/zuko/small",
            "--variants", "plain,floor,capture,compiled,compiled+capture"]  # fmt: skip
    threads = torch.get_num_threads()
    try:
        assert overhead.main([*argv, "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    report = json.loads((tmp_path / "cpu-zoo-quick.json").read_text())
    (r,) = report["results"]
    for name in ("compiled", "compiled+capture"):
        assert "error" not in r["variants"][name] and r["variants"][name]["ratio"] > 0
    table = (tmp_path / "cpu-zoo-quick.md").read_text()
    assert "| compiled | compiled + capture | their ratio |" in table
    ratio = r["variants"]["compiled+capture"]["ratio"] / r["variants"]["compiled"]["ratio"]
    assert f"{ratio:.3f} |" in table


def test_zoo_comparison_reads_paired_differences_and_repeat_noise(tmp_path: Any) -> None:
    """benchmarks.overhead.compare on made-up reports with a known answer: per-model
    differences of the run means, sign counts per backend, and each version's repeat noise."""
    compare = pytest.importorskip("benchmarks.overhead.compare")

    def report(commit: str, values: dict[str, float]) -> dict[str, Any]:
        return {
            "commit": {"commit": commit, "dirty": False},
            "results": [
                {
                    "name": name,
                    "family": name.split("/")[0],
                    "backend": name.split("/")[1],
                    "capture_minus_floor": {"median": v},
                }
                for name, v in values.items()
            ],
        }

    names = ["maf/zuko/small", "maf/nflows/small", "glow/zuko/image"]
    before = [
        report("a" * 40, dict(zip(names, v, strict=True)))
        for v in ([0.10, 0.05, 0.02], [0.12, 0.05, 0.04])
    ]
    after = [
        report("b" * 40, dict(zip(names, v, strict=True)))
        for v in ([0.07, 0.06, 0.03], [0.07, 0.08, 0.03])
    ]
    paths = {}
    for label, runs in (("before", before), ("after", after)):
        paths[label] = []
        for i, r in enumerate(runs):
            path = tmp_path / f"{label}{i}.json"
            path.write_text(json.dumps(r))
            paths[label].append(str(path))
    compare.main(
        [
            "--before",
            ",".join(paths["before"]),
            "--after",
            ",".join(paths["after"]),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    diffs = {m["name"]: m["difference"] for m in result["models"]}
    assert diffs == pytest.approx(
        {"maf/zuko/small": -0.04, "maf/nflows/small": 0.02, "glow/zuko/image": 0.0}
    )
    assert result["by_backend"]["zuko"] == {
        "models": 2,
        "median_difference": pytest.approx(-0.02),
        "fell": 1,
        "rose": 0,
    }
    assert result["overall"]["fell"] == 1 and result["overall"]["rose"] == 1
    assert result["noise"]["before"] == pytest.approx(0.02)  # |0.10-0.12|, 0, |0.02-0.04|
    assert result["noise"]["after"] == pytest.approx(0.0)
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| backend zuko | 2 | -0.0200 | 1 / 0 |" in text
    assert "Before: aaaaaaa, aaaaaaa; after: bbbbbbb, bbbbbbb." in text


def _straight(a: int = 1, b: int = 2) -> int:
    c = a + b
    d = c * 2
    return d - a


def test_host_work_counter_counts_every_executed_bytecode() -> None:
    """benchmarks.overhead.count's counter against dis: a function without branches
    executes each of its instructions once, in one frame; klj-reg's own frames grow by at
    least each captured layer's callback and reader once the model is attached."""
    count = pytest.importorskip("benchmarks.overhead.count")
    counter = count._Counter()
    codes, frames, out = counter.run(_straight)
    assert out == 5
    # (RESUME, where a frame starts, is reported as the frame's call event, not an opcode)
    executed = [i for i in dis.get_instructions(_straight) if i.opname != "RESUME"]
    assert (codes, frames) == (len(executed), 1)
    model, loss_fn, dim, features = tiny("freia")
    x, c = inputs(dim, features, batch=4)
    own = count._Counter(own=True)
    # Unattached: at most the class wrappers that other live captures hold (no callback).
    plain_codes, plain_frames, _ = own.run(lambda: loss_fn(x, c))
    capture = klj_reg.attach(model)
    codes, frames, _ = own.run(lambda: loss_fn(x, c))
    assert codes > plain_codes and frames - plain_frames >= 2 * len(capture.sites)


def test_host_work_count_runs_on_a_zoo_model(tmp_path: Any) -> None:
    """``python -m benchmarks.overhead.count``: the phases add up to the step, klj-reg's own
    forward work is part of the forward's, and the report is written."""
    count = pytest.importorskip("benchmarks.overhead.count")
    held = dict(hooks._patched)
    args = ["--zoo", "actnorm-lu/freia/small", "--batch", "8", "--ops", "--out", str(tmp_path)]
    count.main(args)
    # Every model's patches are given back (the next model's plain step runs unwrapped;
    # captures of collected models from earlier tests may be given back too).
    assert hooks._patched.keys() <= held.keys()
    report = json.loads((tmp_path / "count.json").read_text())
    (row,) = report["results"]
    assert row["name"] == "actnorm-lu/freia/small" and row["layers"] > 0
    for key in ("bytecodes", "frames"):
        phases = [row[p][key] for p in ("forward", "penalty", "backward")]
        assert row["step"][key] == sum(phases) and min(phases[:2]) > 0
        assert 0 < row["klj_reg_forward_per_layer"][key] * row["layers"] <= row["forward"][key]
        # The layers' class forward is watched: an unattached twin runs through the wrapper.
        assert row["unattached_twin"][key] > 0
    assert "| actnorm-lu/freia/small |" in (tmp_path / "count.md").read_text()


def test_host_work_comparison_sums_families(tmp_path: Any) -> None:
    """``count --compare``: per family the sums of its models' step counts, after minus
    before, on made-up reports with a known answer."""
    count = pytest.importorskip("benchmarks.overhead.count")

    def row(name: str, codes: int, frames: int, ops: int) -> dict[str, Any]:
        family, backend, _ = name.split("/")
        step = {"bytecodes": codes, "frames": frames}
        return {"name": name, "family": family, "backend": backend, "step": step, "aten_ops": ops}

    def report(commit: str, rows: list[dict[str, Any]]) -> Path:
        path = tmp_path / f"{commit}.json"
        path.write_text(json.dumps({"commit": {"commit": commit, "dirty": False}, "results": rows}))
        return path

    before = report(
        "a" * 40, [row("maf/zuko/small", 100, 10, 5), row("maf/zuko/tabular", 50, 5, 5)]
    )
    after = report("b" * 40, [row("maf/zuko/small", 90, 12, 6), row("maf/zuko/tabular", 70, 5, 6)])
    count.main(["--compare", str(before), str(after), "--out", str(tmp_path / "out")])
    text = (tmp_path / "out" / "compare.md").read_text()
    assert "| maf (zuko) | 150 -> 160 (+10) | 15 -> 17 (+2) | 10 -> 12 (+2) |" in text
    assert "| maf/zuko/small | 100 -> 90 (-10) | 10 -> 12 (+2) | 5 -> 6 (+1) |" in text
