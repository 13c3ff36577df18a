"""Training loop, batch-norm refresh and scoring of the generative classifier.

One step: augment and dequantise the batch on the training device, one forward pass, the
objective (:mod:`benchmarks.cifar.objectives`) plus ``klj_reg.penalty`` computed from the records of
that *same* pass, backward, gradient-norm clip, optimiser step. Under ``torch.distributed``
(``torchrun``) the classifier is wrapped in ``DistributedDataParallel``: every rank takes its
slice of the same global batch and the penalty is computed per rank like the loss, so the
averaged gradients are those of one process on the whole batch.
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

import klj_reg

from . import objectives
from .classifier import GenerativeClassifier


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. ``milestones`` are fractions of the epochs (SGD schedule)."""

    epochs: int = 450
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd": the authors' schedule; "adam": Adam + cosine
    lr: float = 0.07
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple[float, ...] = (150 / 450, 250 / 450, 350 / 450)
    warmup: float = 0.02  # Adam: linear warm-up, fraction of all steps
    lr_mu: float = 3.0  # learning-rate factors of the class means and the prior logits
    lr_phi: float = 1.0
    clip: float = 8.0
    augment: bool = True
    bn_refresh: int = 5000  # training images for the batch-norm refresh (0: none)


@dataclass
class Objective:
    """What to minimise: ``name`` (``"ib"``/``"cnll"``), IB ``beta``, KLJ ``alpha`` and form."""

    name: str = "ib"
    beta: float = 1.0
    alpha: float = 0.0
    form: str = "jacobian"

    def uses_prior(self) -> bool:
        """Whether the class prior receives a gradient (only through ``L_x`` in IB)."""
        return self.name == "ib" and not math.isinf(self.beta)


@dataclass
class History:
    """Per-epoch means of the logged terms."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def make_optimizer(
    clf: GenerativeClassifier, cfg: TrainConfig, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler, bool]:
    """Optimiser, scheduler, and whether the scheduler steps per batch (else per epoch).

    Weight decay (the paper's R1) applies to the flow only; the class means and prior logits
    have their own learning-rate factors and (SGD) momenta 0 and 0.8, as IB-INN.
    """
    flow_params = [p for p in clf.flow.parameters() if p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": flow_params}]
    extra = {"mu": (clf.mu, cfg.lr_mu, 0.0), "phi": (clf.phi, cfg.lr_phi, 0.8)}
    for param, factor, momentum in extra.values():
        if param.requires_grad:
            group: dict[str, Any] = {"params": [param], "lr": cfg.lr * factor, "weight_decay": 0.0}
            if cfg.optimizer == "sgd":
                group["momentum"] = momentum
            groups.append(group)
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            groups, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.milestones})
        sched: Any = torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=0.1)
        return opt, sched, False
    if cfg.optimizer == "adam":
        opt = torch.optim.Adam(groups, cfg.lr, weight_decay=cfg.weight_decay)
        total = max(1, cfg.epochs * steps_per_epoch)
        warm = max(1, round(cfg.warmup * total))

        def lr_factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor), True
    raise ValueError(f"optimizer must be 'sgd' or 'adam', got {cfg.optimizer!r}")


def prepare_batch(
    x_uint8: Tensor, augment: nn.Module | None, generator: torch.Generator | None
) -> Tensor:
    """uint8 images on the device -> augmented, dequantised floats in [0, 1]."""
    from .augment import dequantise, to_float

    x = to_float(x_uint8)
    if augment is not None:
        x = augment(x, generator=generator)
    return dequantise(x, generator=generator)


def step_terms(
    model: nn.Module,
    flow_model: nn.Module,
    x: Tensor,
    y: Tensor,
    objective: Objective,
    dim: int,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward pass; returns ``loss + penalty`` and the terms (detached) to log.

    The penalty reads the records of this very forward pass (no second pass).
    """
    out = model(x)
    terms = objectives.objective(
        objective.name, out.zz, out.log_det, out.log_prior, y, dim, objective.beta
    )
    total = terms.loss
    logged = {"loss": terms.loss, "l_x": terms.l_x, "l_y": terms.l_y, "l_cnll": terms.l_cnll}
    logged["accuracy"] = 100.0 * (out.zz.argmin(1) == y).float().mean()
    if objective.alpha > 0:
        # the objectives are per dimension: so is the penalty ("layers" is the authors' own
        # weighting of the released-code term next to their per-dimension L_x)
        normaliser = "dim" if objective.form == "jacobian" else "layers"
        pen = klj_reg.penalty(
            flow_model, out.flow_input, alpha=objective.alpha, form=objective.form,
            normaliser=normaliser,
        )  # fmt: skip
        total = total + pen
        logged["penalty"] = pen
    return total, {k: v.detach() for k, v in logged.items()}


def update(
    loss: Tensor,
    opt: torch.optim.Optimizer,
    params: list[nn.Parameter],
    clip: float,
    sched: torch.optim.lr_scheduler.LRScheduler | None = None,
) -> None:
    """One optimisation step on ``loss``: backward, gradient-norm clipping at ``clip``, the
    optimiser's step and, if given, the scheduler's (one that steps per batch)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    if sched is not None:
        sched.step()


def _save(
    path: pathlib.Path,
    epochs_done: int,
    clf: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    order_gen: torch.Generator,
    noise_gen: torch.Generator,
    history: History,
) -> None:
    """Write a resumable checkpoint: to a temporary file, then renamed over ``path``."""
    state = {
        "epochs_done": epochs_done,
        "model": clf.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "order_gen": order_gen.get_state(),
        "noise_gen": noise_gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "history": {"epochs": history.epochs, "seconds": history.seconds},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _resume(
    path: pathlib.Path,
    clf: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    order_gen: torch.Generator,
    noise_gen: torch.Generator,
    history: History,
) -> int:
    """Load a checkpoint written by :func:`_save` into the live objects; the epochs done."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    clf.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    order_gen.set_state(state["order_gen"])
    noise_gen.set_state(state["noise_gen"])
    torch.set_rng_state(state["torch_rng"])
    history.epochs = list(state["history"]["epochs"])
    history.seconds = float(state["history"]["seconds"])
    return int(state["epochs_done"])


def _batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def fit(
    clf: GenerativeClassifier,
    x_train: Tensor,
    y_train: Tensor,
    cfg: TrainConfig,
    objective: Objective,
    *,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    after_epoch: Callable[[], dict[str, float]] | None = None,
    checkpoint: pathlib.Path | None = None,
) -> History:
    """Train ``clf`` in place on uint8 images ``x_train`` (already on the training device).

    Under torch.distributed, wraps ``clf`` in DistributedDataParallel and splits each global
    batch of ``cfg.batch_size`` images across ranks. ``after_epoch`` (e.g. a test-set
    evaluation for learning curves) adds its values to each epoch's history.

    ``checkpoint``: after every epoch, the classifier, optimiser, scheduler, random streams
    and history are saved there (atomically); if the file exists when ``fit`` starts, training
    resumes after its last epoch, so a killed run loses at most one epoch and continues the
    same batch order and noise. The caller deletes the file once the run's record is written.
    """
    from .augment import Augment

    rank, size = world()
    device = x_train.device
    if cfg.batch_size % size:
        raise ValueError(f"batch size {cfg.batch_size} is not divisible by {size} processes")
    per_rank = cfg.batch_size // size
    n = x_train.shape[0]
    steps = n // cfg.batch_size
    if steps < 1:
        raise ValueError(f"{n} training images are fewer than one batch of {cfg.batch_size}")

    clf.phi.requires_grad_(objective.uses_prior())
    flow_model = clf.flow.model
    if objective.alpha > 0:
        klj_reg.attach(flow_model)
    augment = Augment.for_side(x_train.shape[-1]).to(device) if cfg.augment else None
    order_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed * 1009 + rank + 1)

    # Data-dependent initialisation (ActNorm in nflows/normflows) before DDP broadcasts rank 0.
    clf.train()
    with torch.no_grad():
        init = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: cfg.batch_size]
        clf(prepare_batch(x_train[init.to(device)], augment, noise_gen))
    klj_reg.clear(flow_model)

    model: nn.Module = clf
    if size > 1:
        if device.type == "cuda":
            clf = nn.SyncBatchNorm.convert_sync_batchnorm(clf)
        model = nn.parallel.DistributedDataParallel(
            clf, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt, sched, per_step = make_optimizer(clf, cfg, steps)
    params = [p for p in clf.parameters() if p.requires_grad]
    history = History()
    first = 0
    if checkpoint is not None and checkpoint.is_file():
        first = _resume(checkpoint, clf, opt, sched, order_gen, noise_gen, history)
    start = time.perf_counter() - history.seconds
    bar = tqdm(total=cfg.epochs * steps, desc=desc, disable=not progress or rank != 0, leave=False)
    bar.update(first * steps)
    for epoch in range(first, cfg.epochs):
        clf.train()
        perm = torch.randperm(n, generator=order_gen).to(device)
        sums: dict[str, Tensor] = {}
        for i in range(steps):
            idx = perm[i * cfg.batch_size + rank * per_rank :][:per_rank]
            x = prepare_batch(x_train[idx], augment, noise_gen)
            loss, logged = step_terms(model, flow_model, x, y_train[idx], objective, clf.dim)
            update(loss, opt, params, cfg.clip, sched if per_step else None)
            for k, v in logged.items():
                sums[k] = sums[k] + v if k in sums else v.clone()
            bar.update()
        if not per_step:
            sched.step()
        keys = sorted(sums)
        totals = torch.stack([sums[k] for k in keys]) / steps
        if size > 1:  # log the means over all ranks
            dist.all_reduce(totals)
            totals /= size
        means = dict(zip(keys, totals.tolist(), strict=True))  # one sync per epoch
        if not all(math.isfinite(v) for v in means.values()):
            bar.close()
            raise FloatingPointError(f"training diverged in epoch {epoch + 1}: {means}")
        if after_epoch is not None:
            means.update(after_epoch())
        means["lr"] = opt.param_groups[0]["lr"]
        means["seconds"] = time.perf_counter() - start
        history.epochs.append(means)
        bar.set_postfix(loss=f"{means['loss']:.3f}")
        if checkpoint is not None and rank == 0:
            history.seconds = means["seconds"]
            _save(checkpoint, epoch + 1, clf, opt, sched, order_gen, noise_gen, history)
    bar.close()
    history.seconds = time.perf_counter() - start
    klj_reg.clear(flow_model)
    return history


def refresh_batch_norm(
    clf: GenerativeClassifier,
    x_train: Tensor,
    n_images: int,
    batch_size: int,
    *,
    augment: bool = True,
    seed: int = 0,
) -> int:
    """Recompute batch-norm statistics as plain averages over ``n_images`` (augmented)
    training images with fixed weights (IB-INN did 5 passes over the training set); dropout
    stays off. Returns the number of batch-norm layers reset."""
    from .augment import Augment

    norms = _batch_norms(clf)
    if not norms or n_images <= 0:
        clf.eval()
        return 0
    device = x_train.device
    aug = Augment.for_side(x_train.shape[-1]).to(device) if augment else None
    gen = torch.Generator(device=device).manual_seed(seed + 7)
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
    clf.eval()
    for m in norms:
        m.train()
    order = torch.randperm(x_train.shape[0], generator=torch.Generator().manual_seed(seed + 7))
    order = order.repeat(math.ceil(n_images / x_train.shape[0]))[:n_images].to(device)
    with torch.no_grad():
        for start in range(0, n_images, batch_size):
            idx = order[start : start + batch_size]
            if idx.numel() > 1:
                clf(prepare_batch(x_train[idx], aug, gen))
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum = momentum
    clf.eval()
    klj_reg.clear(clf.flow.model)
    return len(norms)


@torch.no_grad()
def score(
    clf: GenerativeClassifier,
    x: Tensor,
    batch_size: int = 500,
    *,
    klj: bool = False,
) -> dict[str, Tensor]:
    """Per-sample ``l_x`` and ``logits`` of float images ``x`` in [0, 1] (eval mode), and,
    with ``klj``, the per-sample KLJ divergence per dimension (``alpha = 1``, Jacobian form)."""
    clf.eval()
    device = clf.mu.device
    out: dict[str, list[Tensor]] = {"l_x": [], "logits": [], "klj": []}
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(device, torch.float32)
        o = clf(xb)
        l_x = objectives.l_x(o.zz, o.log_det, o.log_prior, clf.dim)
        out["l_x"].append(l_x.cpu())
        out["logits"].append((-0.5 * o.zz).cpu())
        if klj:
            pen = klj_reg.penalty(
                clf.flow.model, o.flow_input, alpha=1.0, reduction="none", normaliser="dim"
            )
            out["klj"].append(pen.float().cpu())
    klj_reg.clear(clf.flow.model)
    return {k: torch.cat(v) for k, v in out.items() if v}
