"""One training run of the stability gallery, the methods it compares, and the alpha choice.

The loop is the one a user writes, with the usual guard::

    loss = nll(x) [+ klj_reg.penalty(model, x, alpha)]
    if not finite(loss): skip the step (counted); continue
    loss.backward(); [clip_grad_norm_(params, 1)]; optimizer.step()

**Failure** (defined once, here): a run fails at the first step where

- ``nonfinite-params``: a parameter is NaN or infinite after the optimiser step, or
- ``nonfinite-loss``: :data:`MAX_SKIPPED` consecutive steps had a non-finite loss, or
- ``nonfinite-nll``: at an evaluation, the held-out NLL is not finite (some held-out point
  has a non-finite log-density), or
- ``threshold``: at an evaluation, the held-out NLL (mean, nats/dim) exceeds the
  configuration's threshold (identity NLL + margin, :mod:`.configs`);

the run stops there and ``steps_to_failure`` is that step (1-based). Evaluations run every
``eval_every`` steps and after the last one. A run that does not fail *survives*; its final
held-out NLL is the last evaluation's and its best the lowest over evaluations.

A :class:`klj_reg.Monitor` (window 20, factor 10, every step) watches every run: penalised
runs feed it through ``klj_reg.penalty``, the others through ``monitor.step(x)`` after the
forward pass (no extra pass). Its flags (step, layer) are recorded with the run.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import klj_reg

from ..common.backends import BackendFlow
from ..common.records import parameter_count
from . import configs

DEFAULT_ALPHA = 1e-2  # klj_reg.penalty's default when the gallery was made (it has none now)
ALPHA_GRID = (1e-3, 1e-2, 1e-1, 1.0)
CLIP = 1.0  # max gradient norm of the clipping methods
WEIGHT_DECAY = 1e-2  # AdamW's (decoupled) weight decay: torch.optim.AdamW's default
LOW_LR = 0.1  # the low-lr method's factor on the configuration's learning rate
MAX_SKIPPED = 10  # consecutive non-finite losses that end a run
SELECTION_SEED = 0  # alpha selection: seed 0's training data, carved (the test split unread)
VALIDATION_FRACTION = 0.2
MONITOR = {"window": 20, "factor": 10.0, "every": 1}
WARNING_WINDOW = 50  # a flag at most this many steps before a failure counts as its warning

METHODS = ("plain", "klj", "klj-val", "clip", "wd", "low-lr", "clip+klj")
METHOD_TEXT = {
    "plain": "Adam, plain maximum likelihood",
    "klj": f"+ klj_reg.penalty, alpha = {DEFAULT_ALPHA:g} (the former default)",
    "klj-val": "+ klj_reg.penalty, alpha chosen on a validation split",
    "clip": f"gradient-norm clipping at {CLIP:g}",
    "wd": f"AdamW, weight decay {WEIGHT_DECAY:g}",
    "low-lr": f"learning rate x {LOW_LR:g}",
    "clip+klj": f"clipping at {CLIP:g} + penalty at alpha = {DEFAULT_ALPHA:g}",
}


@dataclass(frozen=True)
class Run:
    """One run: a configuration, a method's settings and a seed. ``split`` is ``"test"`` for
    the reported runs and ``"validation"`` for the alpha-selection runs, which never see the
    test split (:func:`held_out`)."""

    config: str
    method: str
    seed: int
    alpha: float = 0.0
    clip: float = 0.0
    weight_decay: float = 0.0
    lr_factor: float = 1.0
    quick: bool = False
    split: str = "test"


def method_run(config: str, method: str, seed: int, quick: bool, alpha_val: float = 0.0) -> Run:
    """The :class:`Run` of ``method`` (``alpha_val``: the validation-chosen alpha)."""
    settings: dict[str, dict[str, float]] = {
        "plain": {},
        "klj": {"alpha": DEFAULT_ALPHA},
        "klj-val": {"alpha": alpha_val},
        "clip": {"clip": CLIP},
        "wd": {"weight_decay": WEIGHT_DECAY},
        "low-lr": {"lr_factor": LOW_LR},
        "clip+klj": {"clip": CLIP, "alpha": DEFAULT_ALPHA},
    }
    if method == "klj-val" and not alpha_val > 0:
        raise ValueError("klj-val needs the validation-chosen alpha")
    return Run(config, method, seed, quick=quick, **settings[method])


# --- data splits ------------------------------------------------------------------------------


def validation_split(train: np.ndarray, seed: int) -> configs.Split:
    """The alpha-selection split, carved from the *training* data alone: a random
    :data:`VALIDATION_FRACTION` of its rows held out, the rest to train on."""
    order = np.random.default_rng([seed, 99]).permutation(len(train))
    cut = int(round(len(train) * (1 - VALIDATION_FRACTION)))
    return configs.Split(train[order[:cut]], train[order[cut:]])


def held_out(run: Run, cfg: configs.Config) -> configs.Split:
    """The run's training data and the split it is evaluated on: the test split for reported
    runs; for selection runs, a validation split of the training data (the test split is
    dropped before anything reads it)."""
    data = cfg.make_data(run.seed)
    if run.split == "test":
        return data
    if run.split != "validation":
        raise ValueError(f"split must be 'test' or 'validation', got {run.split!r}")
    train = data.train
    del data  # the test split goes here, unread
    return validation_split(train, run.seed)


# --- one run ----------------------------------------------------------------------------------


def nll_per_dim(flow: BackendFlow, x: Tensor) -> Tensor:
    """Per-sample NLL in nats per dimension under the standard normal base."""
    z, log_det = flow(x)
    dim = z.shape[1]
    return (0.5 * z.square().sum(1) + 0.5 * dim * math.log(2 * math.pi) - log_det) / dim


def identity_nll(x: np.ndarray) -> float:
    """Mean NLL (nats/dim) of ``x`` under ``N(0, I)``: the untrained (identity) flow's."""
    return float(np.mean(0.5 * np.square(x.astype(np.float64)) + 0.5 * math.log(2 * math.pi)))


def evaluate(flow: BackendFlow, x: Tensor, chunk: int = 1000) -> tuple[float, float]:
    """(mean held-out NLL in nats/dim, fraction of held-out points with a non-finite one)."""
    flow.eval()
    with torch.no_grad():
        values = torch.cat([nll_per_dim(flow, x[i : i + chunk]) for i in range(0, len(x), chunk)])
    flow.train()
    finite = torch.isfinite(values)
    mean = float(values.double().mean()) if bool(finite.all()) else math.inf
    return mean, float(1 - finite.double().mean())


def _finite_params(params: list[Tensor]) -> bool:
    """Whether every parameter is finite (one reduction, one synchronisation)."""
    norms = torch._foreach_norm([p.detach() for p in params])
    return bool(torch.isfinite(torch.stack(norms)).all())


def train_one(run: Run) -> dict[str, Any]:
    """Train one flow and evaluate it; deterministic given ``run`` (single-threaded)."""
    torch.set_num_threads(1)
    cfg = configs.get(run.config, run.quick)
    data = held_out(run, cfg)
    train = torch.from_numpy(data.train)
    test = torch.from_numpy(data.held_out)
    threshold = identity_nll(data.held_out) + cfg.margin

    torch.manual_seed(run.seed)
    np.random.seed(run.seed)  # FrEIA draws its permutations from numpy's global generator
    flow = cfg.make_flow()
    klj_reg.attach(flow.model)
    monitor = klj_reg.Monitor(flow.model, warn=False, **MONITOR)
    params = [p for p in flow.parameters() if p.requires_grad]
    lr = cfg.lr * run.lr_factor
    opt: torch.optim.Optimizer
    if run.weight_decay:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=run.weight_decay, foreach=True)
    else:
        opt = torch.optim.Adam(params, lr=lr, foreach=True)
    batches = np.random.default_rng([run.seed, 2])
    n = len(train)
    batch = min(cfg.batch, n)
    order, at = batches.permutation(n), 0

    curve: list[dict[str, float]] = []
    failure: dict[str, Any] | None = None
    skipped = consecutive = 0
    losses: list[float] = []
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", klj_reg.NonFiniteScaleWarning)
        for step in range(1, cfg.steps + 1):
            if at + batch > n:  # epoch done: reshuffle, drop the remainder
                order, at = batches.permutation(n), 0
            x = train[order[at : at + batch]]
            at += batch
            loss = nll_per_dim(flow, x).mean()
            if run.alpha:
                # per dimension, like the NLL; it feeds the monitor
                loss = loss + klj_reg.penalty(flow.model, x, alpha=run.alpha, normaliser="dim")
            else:
                monitor.step(x)
            value = float(loss.detach())
            losses.append(value)
            if not math.isfinite(value):
                skipped += 1
                consecutive += 1
                if consecutive >= MAX_SKIPPED:
                    failure = {"step": step, "reason": "nonfinite-loss"}
                    break
                continue
            consecutive = 0
            opt.zero_grad()
            loss.backward()
            if run.clip:
                torch.nn.utils.clip_grad_norm_(params, run.clip)
            opt.step()
            if not _finite_params(params):
                failure = {"step": step, "reason": "nonfinite-params"}
                break
            if step % cfg.eval_every == 0 or step == cfg.steps:
                nll, bad = evaluate(flow, test)
                curve.append({"step": step, "nll": nll, "nonfinite_fraction": bad})
                if not math.isfinite(nll):
                    failure = {"step": step, "reason": "nonfinite-nll"}
                elif nll > threshold:
                    failure = {"step": step, "reason": "threshold"}
                if failure:
                    break
    seconds = time.perf_counter() - start
    monitor.close()
    flags = [f._asdict() for f in monitor.flags]
    nlls = [c["nll"] for c in curve]
    survived = failure is None
    return {
        **asdict(run),
        "settings": cfg.settings(),
        "lr": lr,
        "threshold": threshold,
        "identity_nll": threshold - cfg.margin,
        "n_train": len(train),
        "n_held_out": len(test),
        "parameters": parameter_count(flow),
        "failed": not survived,
        "failure": failure,
        "skipped_steps": skipped,
        "final_nll": nlls[-1] if survived and nlls else None,
        "best_nll": min(nlls) if survived and nlls else None,
        "curve": curve,
        "loss_every_10": losses[::10],
        "monitor": {**MONITOR, "flags": flags, "warning": warning(flags, failure)},
        "train_seconds": seconds,
    }


def warning(flags: list[dict[str, Any]], failure: dict[str, Any] | None) -> dict[str, Any]:
    """What the monitor said about a run. For a failed run: the flags at or before the
    failing step, the last of them (``layer``, ``lead``: steps from it to the failure, 0 =
    flagged at the failing step), and ``flagged``: whether that flag came at most
    :data:`WARNING_WINDOW` steps before the failure (an earlier flag, e.g. as the layers first
    leave the identity, is not a warning of this failure). For a surviving run: ``flagged``
    if it was flagged at all (a false alarm)."""
    if failure is None:
        return {
            "flagged": bool(flags), "flags": len(flags),
            "first_step": flags[0]["step"] if flags else None,
            "layer": flags[0]["layer"] if flags else None,
        }  # fmt: skip
    before = [f for f in flags if f["step"] <= failure["step"]]
    last = before[-1] if before else None
    lead = None if last is None else failure["step"] - last["step"]
    return {
        "flagged": lead is not None and lead <= WARNING_WINDOW, "flags": len(before),
        "first_step": before[0]["step"] if before else None,
        "layer": None if last is None else last["layer"], "lead": lead,
    }  # fmt: skip


# --- alpha chosen on a validation split -----------------------------------------------------------


def selection_runs(config: str, quick: bool) -> list[Run]:
    """One run per alpha of :data:`ALPHA_GRID`, the penalty as in the ``klj`` method, trained
    on 80 % of seed :data:`SELECTION_SEED`'s training split and evaluated on the other 20 %
    (:func:`validation_split`)."""
    return [
        Run(config, "select", SELECTION_SEED, alpha=a, quick=quick, split="validation")
        for a in ALPHA_GRID
    ]


def choose_alpha(results: list[dict[str, Any]]) -> float:
    """The alpha whose selection run ends with the lowest validation NLL (a failed run counts
    as +inf; ties go to the smaller alpha). Reads only selection runs' results. When every
    selection run failed, the tie rule gives the smallest alpha (the gallery's protocol since
    its first run), where :func:`klj_reg.pick_alpha` refuses to choose."""
    if any(r["split"] != "validation" for r in results):
        raise ValueError("choose_alpha reads validation runs only")
    scores = {
        r["alpha"]: r["final_nll"] if r["final_nll"] is not None else math.inf for r in results
    }
    if not any(math.isfinite(s) for s in scores.values()):
        return min(scores)
    return klj_reg.pick_alpha(scores)
