r"""``python -m benchmarks mapping``: the paper's alpha in klj-reg's units, measured.

The paper's runs (the authors' released code) add :math:`\alpha_p\,\mathrm{KLJ}_{rc} /
n_{\text{layers}}` to a per-dimension NLL :math:`L_x`; klj-reg adds :math:`\alpha\,
\mathrm{KLJ}_{jac}` to a per-sample NLL :math:`D L_x`. In per-sample units the authors' term
is :math:`\alpha_p (D / n_{\text{layers}}) \mathrm{KLJ}_{rc}`. The two are different functions
of the parameters (:math:`\mathrm{KLJ}_{rc}` squares the raw subnet outputs before the soft
clamp, :math:`\mathrm{KLJ}_{jac}` is :math:`d^2 - 1 - 2\log|d|` on the true Jacobian
diagonal), so no alpha makes them equal; what this command matches is the size of their
parameter gradients, measured from one forward pass (batch means per sample):

.. math::

    r = \frac{\lVert \nabla_\theta\, (D / n_{\text{layers}})\, \mathrm{KLJ}_{rc} \rVert}
             {\lVert \nabla_\theta\, \mathrm{KLJ}_{jac} \rVert},

so that ``alpha = alpha_p * r`` gives klj-reg's term the gradient size of the authors' at
``alpha_p``. Also recorded: ``r_form`` (the same ratio without :math:`D / n_{\text{layers}}`:
the forms alone), the cosine between the two gradients (how far they push the same way), both
gradients' sizes against the per-sample NLL's, a breakdown by parameter group (coupling
subnets, global scales, downsampling couplings, the fully connected coupling), and how many
coupling scales sit in the saturated part of the soft clamp :math:`0.7 \tanh(0.1 a)`.

Measured on the FrEIA IB-INN generative classifier of the CIFAR-10 benchmarks
(:func:`benchmarks.common.image_flows.freia_ibinn`: AllInOneBlock conv couplings, clamp 0.7,
EXP global scales from 0.75; ``paper`` is the authors' 11.3M-parameter architecture, ``small``
the one the ``cpu`` and ``converged`` presets train) at initialisation and along the first
steps of a plain IB (:math:`\gamma = 1`, no KLJ) run with the ``cpu`` preset's optimisation
(Adam lr 1e-3 with that preset's warm-up and cosine schedule, weight decay 1e-4, gradient
clip 8, batch 64, the IB-INN augmentation, a class-balanced 10,000 training images), on one
fixed batch of training images (dequantised, not augmented) in training mode (batch
statistics; one fixed dropout draw; the measurement's batch-norm statistics are thrown away).

``--quick`` runs a tiny FrEIA stack on random images for a few steps (seconds, no data).
Without CIFAR-10 the full command prints why and exits 0.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import klj_reg
from klj_reg.divergence import mean_divergence
from klj_reg.records import LayerRecord

from ..common import image_flows
from ..common.records import parameter_count, run_metadata
from . import data, objectives, presets, train
from .classifier import GenerativeClassifier

PAPER_ALPHAS = (0.001, 0.01)
"""The paper's alphas: Table 1's caption (0.001) and its text and Table 2 (0.01)."""
AUTHORS_NODES = 61
"""The number of graph nodes the authors' code divides by for the 11M IB-INN."""
DEFAULT_MODELS = "paper@32,small@32,small@16"
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "mapping"
TERMS = ("jacobian", "released-code")


# ------------------------------------------------------------------------------ the measurement


def parameter_groups(model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """``(name, group, parameter)`` for every trainable parameter of a flow; the group is the
    block's class name (``AllInOneBlock``: its subnet), ``global scale`` for AllInOneBlock's
    global scales (a parameter shared by every pixel)."""
    out = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner: nn.Module = model
        for part in name.split(".")[:-1]:
            owner = getattr(owner, part)
            if not isinstance(owner, (nn.ModuleList, nn.Sequential, nn.ModuleDict)):
                break
        group = "global scale" if name.endswith("global_scale") else type(owner).__name__
        out.append((name, group, p))
    return out


def term_gradients(
    records: Sequence[LayerRecord],
    params: Sequence[Tensor],
    extra: dict[str, Tensor] | None = None,
) -> tuple[dict[str, float], dict[str, list[Tensor]]]:
    """The batch means per sample of ``KLJ_jac`` and ``KLJ_rc`` (``mean_divergence`` of the
    captured records, the numbers ``klj_reg.penalty`` weights) and of any ``extra`` scalar
    terms, with their gradients with respect to ``params`` (zeros where a parameter does not
    enter a term). Returns ``(values, gradients)`` keyed ``"jacobian"``, ``"released-code"``
    and ``extra``'s keys."""
    terms = {form: mean_divergence(records, form) for form in TERMS}
    terms.update(extra or {})
    values: dict[str, float] = {}
    grads: dict[str, list[Tensor]] = {}
    names = list(terms)
    for i, name in enumerate(names):
        term = terms[name]
        found = torch.autograd.grad(
            term, list(params), retain_graph=i < len(names) - 1, allow_unused=True
        )
        grads[name] = [
            torch.zeros_like(p) if g is None else g for g, p in zip(found, params, strict=True)
        ]
        values[name] = float(term.detach())
    return values, grads


def _norm(gs: Iterable[Tensor]) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in gs))


def _dot(a: Iterable[Tensor], b: Iterable[Tensor]) -> float:
    return sum(float((x.double() * y.double()).sum()) for x, y in zip(a, b, strict=True))


def compare(
    grads: dict[str, list[Tensor]],
    groups: Sequence[str],
    dim: int,
    n_layers: int,
) -> dict[str, Any]:
    """Sizes and direction of the two terms' gradients (``grads`` from
    :func:`term_gradients`, ``groups`` one label per parameter): ``r_form`` =
    ``|grad KLJ_rc| / |grad KLJ_jac|``, ``r`` = ``(dim / n_layers) * r_form``, their cosine,
    both against ``grads["nll"]`` where given, and per group the two norms and ``r``."""
    jac, rc = grads["jacobian"], grads["released-code"]
    factor = dim / n_layers
    n_jac, n_rc = _norm(jac), _norm(rc)
    r_form = n_rc / n_jac if n_jac > 0 else math.inf
    out: dict[str, Any] = {
        "grad_norm_jacobian": n_jac,
        "grad_norm_released_code": n_rc,
        "r_form": r_form,
        "r": factor * r_form,
        "cosine": _dot(jac, rc) / (n_jac * n_rc) if n_jac > 0 and n_rc > 0 else math.nan,
    }
    if "nll" in grads:
        n_nll = _norm(grads["nll"])
        out["grad_norm_nll"] = n_nll
        out["jacobian_over_nll"] = n_jac / n_nll
        out["released_code_weighted_over_nll"] = factor * n_rc / n_nll
    by_group: dict[str, dict[str, float]] = {}
    for label in dict.fromkeys(groups):
        pick = [i for i, g in enumerate(groups) if g == label]
        gj, gr = _norm(jac[i] for i in pick), _norm(rc[i] for i in pick)
        by_group[label] = {
            "grad_norm_jacobian": gj,
            "grad_norm_released_code": gr,
            "r": factor * gr / gj if gj > 0 else math.inf,
            "share_jacobian": (gj / n_jac) ** 2 if n_jac > 0 else math.nan,
            "share_released_code": (gr / n_rc) ** 2 if n_rc > 0 else math.nan,
        }
    out["groups"] = by_group
    return out


def saturation(records: Sequence[LayerRecord]) -> dict[str, float]:
    """The AllInOneBlock couplings' tanh arguments ``0.1 a`` (factors clamped by
    ``torch.tanh``): the fraction beyond 1 and 2 in size (``tanh'`` below 0.42 and 0.07), the
    RMS of every raw pre-activation ``a`` the released-code form squares, and the mean
    ``log g`` of the global scales (factors with a ``repeat`` over pixels)."""
    beyond1 = beyond2 = count = 0
    raw_sq = raw_n = 0.0
    logs: list[float] = []
    with torch.no_grad():
        for record in records:
            for factor in record.factors:
                if factor.activation is torch.tanh:
                    arg = factor.selected().abs()
                    beyond1 += int((arg > 1).sum())
                    beyond2 += int((arg > 2).sum())
                    count += arg.numel()
                raw = factor.pre_activation()
                if raw is not None:
                    raw_sq += float(raw.double().square().sum())
                    raw_n += raw.numel()
                elif factor.repeat > 1:
                    logs.append(float(factor.log_abs_d().double().mean()))
    return {
        "tanh_arg_beyond_1": beyond1 / count if count else math.nan,
        "tanh_arg_beyond_2": beyond2 / count if count else math.nan,
        "raw_rms": math.sqrt(raw_sq / raw_n) if raw_n else math.nan,
        "global_log_scale_mean": statistics.fmean(logs) if logs else math.nan,
    }


def measure(clf: GenerativeClassifier, x: Tensor, seed: int) -> dict[str, Any]:
    """One measurement on the batch ``x`` in training mode: the terms, their gradients with
    respect to the flow's parameters compared (:func:`compare`), and :func:`saturation`.
    Dropout draws from ``seed``; batch-norm running statistics are restored afterwards."""
    flow_model = clf.flow.model
    named = parameter_groups(flow_model)
    params = [p for _, _, p in named]
    norms = [m for m in clf.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    was_training = clf.training
    clf.train()
    capture = klj_reg.attach(flow_model)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = clf(x)
        records = capture.take()
    finally:
        klj_reg.detach(flow_model)
        clf.train(was_training)
    l_x = objectives.l_x(out.zz, out.log_det, out.log_prior, clf.dim)
    values, grads = term_gradients(records, params, {"nll": l_x.mean() * clf.dim})
    for m, state in zip(norms, saved, strict=True):  # after backward, which reads them
        m.load_state_dict(state)
    result = compare(grads, [g for _, g, _ in named], clf.dim, len(records))
    result.update(
        {
            "klj_jacobian": values["jacobian"],
            "klj_released_code": values["released-code"],
            "l_x": values["nll"] / clf.dim,
            "n_layers": len(records),
            "dim": clf.dim,
            **saturation(records),
        }
    )
    return result


# ---------------------------------------------------------------------------- the training run


def parse_models(spec: str) -> list[tuple[str, str, int]]:
    """``"paper@32,normflows:small@16"`` -> ``[("freia", "paper", 32), ("normflows",
    "small", 16)]``: ``[BACKEND:]SIZE@SIDE``, the backend FrEIA unless named."""
    out = []
    for item in spec.split(","):
        backend, _, model = item.strip().rpartition(":")
        size, _, side = model.partition("@")
        if size not in image_flows.SIZES or not side.isdigit():
            raise SystemExit(
                f"--models: {item!r} is not [BACKEND:]SIZE@SIDE (SIZE in {image_flows.SIZES})"
            )
        out.append((backend or "freia", size, int(side)))
    return out


def model_label(backend: str, size: str, side: int) -> str:
    """``small@16`` for FrEIA (the mapping's first models), ``normflows:small@16`` else."""
    return f"{size}@{side}" if backend == "freia" else f"{backend}:{size}@{side}"


def _label(m: dict[str, Any]) -> str:
    return str(m.get("label") or f"{m['size']}@{m['side']}")


def checkpoints(steps: int, every: int) -> list[int]:
    """Steps after which to measure: 0 (initialisation), every ``every``, and the last."""
    return sorted({0, steps, *range(every, steps + 1, every)}) if every > 0 else [0, steps]


def run_model(
    backend: str,
    size: str,
    side: int,
    x_train: Tensor,
    y_train: Tensor,
    *,
    steps: int,
    every: int,
    measure_batch: int,
    seed: int,
    cfg: train.TrainConfig,
    schedule_steps: int,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the classifier, measure at init, train plain IB (gamma = 1) for ``steps``
    steps measuring at :func:`checkpoints`; ``schedule_steps``: steps per epoch the optimiser's
    schedule is laid out for (the preset's run this one is the beginning of)."""
    shape = (3, side, side)
    clf = GenerativeClassifier(image_flows.build(backend, size, shape, seed=seed), shape=shape)
    order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed + 1))
    gen = torch.Generator().manual_seed(seed + 2)
    x_measure = train.prepare_batch(x_train[order[:measure_batch]], None, gen)
    objective = train.Objective("ib", beta=1.0)
    clf.phi.requires_grad_(objective.uses_prior())
    opt, sched, per_step = train.make_optimizer(clf, cfg, schedule_steps)
    params = [p for p in clf.parameters() if p.requires_grad]
    from .augment import Augment

    augment = Augment.for_side(side) if cfg.augment else None
    batch_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator().manual_seed(seed * 1009 + 1)
    points = checkpoints(steps, every)
    rows: list[dict[str, Any]] = []
    start, cpu = time.perf_counter(), time.process_time()
    perm = torch.randperm(x_train.shape[0], generator=batch_gen)
    train_terms: dict[str, float] = {}
    for step in range(steps + 1):
        if step in points:
            row = {"step": step, "lr": opt.param_groups[0]["lr"], **measure(clf, x_measure, seed)}
            row["train"] = dict(train_terms)
            rows.append(row)
            log(
                f"  {size}@{side} step {step:4d}: r = {row['r']:8.2f}  r_form = "
                f"{row['r_form']:.3f}  cos = {row['cosine']:+.3f}  |tanh arg| > 1: "
                f"{100 * row['tanh_arg_beyond_1']:.1f} %  L_x = {row['l_x']:.3f}"
            )
        if step == steps:
            break
        begin = (step * cfg.batch_size) % x_train.shape[0]
        if begin + cfg.batch_size > x_train.shape[0]:
            perm = torch.randperm(x_train.shape[0], generator=batch_gen)
            begin = 0
        idx = perm[begin : begin + cfg.batch_size]
        x = train.prepare_batch(x_train[idx], augment, noise_gen)
        clf.train()
        loss, logged = train.step_terms(clf, clf.flow.model, x, y_train[idx], objective, clf.dim)
        train.update(loss, opt, params, cfg.clip, sched if per_step else None)
        train_terms = {k: float(v) for k, v in logged.items()}
        if not all(math.isfinite(v) for v in train_terms.values()):
            raise FloatingPointError(f"{size}@{side} diverged at step {step + 1}: {train_terms}")
    return {
        "backend": backend,
        "label": model_label(backend, size, side),
        "size": size,
        "side": side,
        "parameters": parameter_count(clf.flow),
        "n_layers": rows[0]["n_layers"],
        "dim": clf.dim,
        "seconds": time.perf_counter() - start,
        "cpu_seconds": time.process_time() - cpu,
        "measurements": rows,
        "summary": summarise(rows, size),
    }


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarise(rows: Sequence[dict[str, Any]], size: str) -> dict[str, Any]:
    """r at init, after training, and its median and range over every measurement; the
    project-form alphas equivalent to the paper's (``alpha_p * r``)."""
    r = [row["r"] for row in rows]
    out: dict[str, Any] = {
        "r_init": r[0],
        "r_last": r[-1],
        "r": _spread(r),
        "r_form": _spread([row["r_form"] for row in rows]),
        "cosine": _spread([row["cosine"] for row in rows]),
        "equivalent_alpha": {
            f"{a:g}": {k: a * v for k, v in _spread(r).items()} for a in PAPER_ALPHAS
        },
    }
    if "jacobian_over_nll" in rows[0]:
        out["jacobian_over_nll"] = _spread([row["jacobian_over_nll"] for row in rows])
        out["released_code_weighted_over_nll"] = _spread(
            [row["released_code_weighted_over_nll"] for row in rows]
        )
    if size == "paper":
        # the authors divide by their graph's 61 nodes, not by the captured layers
        n = rows[0]["n_layers"]
        out["r_authors_nodes"] = {k: v * n / AUTHORS_NODES for k, v in _spread(r).items()}
    return out


# ------------------------------------------------------------------------------------- output


def markdown(result: dict[str, Any]) -> str:
    """The measurements as tables, one per model, with the summary first."""
    s = result["settings"]
    lines = [
        "# The paper's alpha in klj-reg's units (measured)",
        "",
        "`r = |grad (D/n_layers) KLJ_rc| / |grad KLJ_jac|` over the flow's parameters (batch "
        "means per sample, one forward pass): the authors' released-code term as they weight "
        'it, in per-sample units, against klj-reg\'s `form="jacobian"` term. The project-form '
        "alpha equivalent to a paper alpha `a_p` is `a_p * r` (same gradient size; the cosine "
        "says how far the two gradients point the same way).",
        "",
        f"- {s['what']}",
        f"- data: {s['data']}",
        f"- seed {s['seed']}, measurement batch {s['measure_batch']}, training batch "
        f"{s['batch_size']}, torch threads {s['threads']}",
        "",
        "| model | D | layers | D/layers | r at init | r after training | r median (range) | "
        "r_form median | cosine median | alpha for 0.001 | alpha for 0.01 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in result["models"]:
        su = m["summary"]
        eq = su["equivalent_alpha"]
        lines.append(
            f"| {_label(m)} ({m['parameters'] / 1e6:.2f}M) | {m['dim']} | "
            f"{m['n_layers']} | {m['dim'] / m['n_layers']:.1f} | {su['r_init']:.1f} | "
            f"{su['r_last']:.1f} | {su['r']['median']:.1f} ({su['r']['min']:.1f}–"
            f"{su['r']['max']:.1f}) | {su['r_form']['median']:.3f} | "
            f"{su['cosine']['median']:+.2f} | {eq['0.001']['median']:.3g} | "
            f"{eq['0.01']['median']:.3g} |"
        )
    for m in result["models"]:
        lines += [
            "",
            f"## {_label(m)}: {m['parameters']:,} flow parameters, "
            f"{m['n_layers']} captured layers, {m['cpu_seconds']:.0f} s CPU",
            "",
            "| step | lr | L_x | KLJ_jac | KLJ_rc | r_form | r | cosine | "
            "|g_jac|/|g_nll| | (D/n)|g_rc|/|g_nll| | tanh arg > 1 | raw a rms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in m["measurements"]:
            lines.append(
                f"| {row['step']} | {row['lr']:.2g} | {row['l_x']:.3f} | "
                f"{row['klj_jacobian']:.4g} | {row['klj_released_code']:.4g} | "
                f"{row['r_form']:.3f} | {row['r']:.1f} | {row['cosine']:+.3f} | "
                f"{row['jacobian_over_nll']:.3g} | {row['released_code_weighted_over_nll']:.3g} | "
                f"{100 * row['tanh_arg_beyond_1']:.2f} % | {row['raw_rms']:.2f} |"
            )
        first, last = m["measurements"][0], m["measurements"][-1]
        lines += ["", "By parameter group (init -> last): r, and the group's share of each "
                  "gradient's squared norm (jacobian / released-code):", ""]  # fmt: skip
        lines += ["| group | r | share jac | share rc |", "|---|---|---|---|"]
        for label, g0 in first["groups"].items():
            g1 = last["groups"][label]
            lines.append(
                f"| {label} | {g0['r']:.1f} -> {g1['r']:.1f} | "
                f"{g0['share_jacobian']:.2f} -> {g1['share_jacobian']:.2f} | "
                f"{g0['share_released_code']:.2f} -> {g1['share_released_code']:.2f} |"
            )
        if "r_authors_nodes" in m["summary"]:
            ra = m["summary"]["r_authors_nodes"]
            lines += [
                "",
                f"Dividing by the authors' {AUTHORS_NODES} graph nodes instead of the "
                f"{m['n_layers']} captured layers: r median {ra['median']:.1f} "
                f"({ra['min']:.1f}–{ra['max']:.1f}).",
            ]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks mapping",
        description="The paper's alpha in klj-reg's units: gradient sizes of the authors' "
        "released-code KLJ term (as they weight it) and klj-reg's jacobian form, on FrEIA "
        "IB-INN classifiers at init and along a short plain IB run on CIFAR-10.",
    )
    p.add_argument("--models", default=DEFAULT_MODELS, help="SIZE@SIDE,... (freia sizes)")
    p.add_argument("--steps", type=int, default=200, help="training steps per model")
    p.add_argument("--every", type=int, default=20, help="measure every this many steps")
    p.add_argument("--measure-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-root", default=None, help="default: $KLJ_DATA or ../shared/data")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default=None, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tests: a tiny FrEIA stack on random 8x8 images, 3 steps, no data (seconds)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    preset = presets.get("cpu")
    cfg = preset.train
    if args.quick:
        models = [("freia", "tiny", 8)]
        steps, every, measure_batch = 3, 1, 8
        cfg = train.TrainConfig(
            optimizer="adam", epochs=1, lr=1e-3, batch_size=8, clip=8.0, augment=False
        )
        g = torch.Generator().manual_seed(args.seed)
        x_all = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=g)
        y_all = torch.randint(0, 10, (64,), generator=g)
        source = "random uint8 images (quick mode)"
        schedule_steps = steps
        out = pathlib.Path(args.out) if args.out else pathlib.Path(tempfile.mkdtemp("-mapping"))
    else:
        models = parse_models(args.models)
        steps, every, measure_batch = args.steps, args.every, args.measure_batch
        try:
            images = data.load_cifar10(
                "train",
                pathlib.Path(args.data_root) if args.data_root else None,
                cache_dir=pathlib.Path(args.cache_dir) if args.cache_dir else None,
            )
        except FileNotFoundError as err:
            print(f"mapping: skipped, no CIFAR-10: {err}")
            return 0
        assert preset.train_limit is not None
        images = data.subset(images, preset.train_limit / images.x.shape[0], seed=args.seed)
        x_all, y_all, source = images.x, images.y, images.source
        schedule_steps = x_all.shape[0] // cfg.batch_size
        out = pathlib.Path(args.out) if args.out else DEFAULT_OUT
    results = []
    for backend, size, side in models:
        x_train = data.downsample(x_all, side) if side != x_all.shape[-1] else x_all
        print(f"mapping: {backend} {size} at {side}x{side}, {steps} steps")
        results.append(
            run_model(
                backend,
                size,
                side,
                x_train,
                y_all,
                steps=steps,
                every=every,
                measure_batch=measure_batch,
                seed=args.seed,
                cfg=cfg,
                schedule_steps=schedule_steps,
            )
        )
    what = (
        "tiny FrEIA stack, random data (quick mode: numbers are meaningless)"
        if args.quick
        else f"IB-INN classifiers ({', '.join(model_label(*m) for m in models)}); "
        f"plain IB (gamma = 1) for {steps} steps "
        f"with the cpu preset's optimisation (Adam lr {cfg.lr:g}, warm-up and cosine laid out "
        f"for {preset.train.epochs} epochs of {schedule_steps} steps, weight decay "
        f"{cfg.weight_decay:g}, clip {cfg.clip:g}), measured every {every} steps"
    )
    result = {
        "command": "mapping",
        "settings": {
            "what": what,
            "quick": args.quick,
            "data": source,
            "models": [model_label(*m) for m in models],
            "steps": steps,
            "every": every,
            "measure_batch": measure_batch,
            "batch_size": cfg.batch_size,
            "seed": args.seed,
            "threads": torch.get_num_threads(),
            "optimizer": {
                "name": cfg.optimizer,
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "clip": cfg.clip,
                "warmup": cfg.warmup,
                "schedule_steps_per_epoch": schedule_steps,
                "schedule_epochs": cfg.epochs,
                "augment": cfg.augment,
            },
            "paper_alphas": list(PAPER_ALPHAS),
            "authors_nodes": AUTHORS_NODES,
        },
        "models": results,
        **run_metadata("cpu", sorted({b for b, _, _ in models})),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "mapping.json").write_text(json.dumps(_json_safe(result), indent=1) + "\n")
    text = markdown(result)
    (out / "mapping.md").write_text(text)
    print(text)
    print(f"mapping: wrote {out / 'mapping.json'} and mapping.md")
    return 0
