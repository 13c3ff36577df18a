"""One training step per variant (plain, hooks, floor, capture, ...) and the reverse-KL step."""

from __future__ import annotations

import copy
import math
from typing import Any, Protocol

import torch
from torch import Tensor

import klj_reg
from klj_reg import hooks
from klj_reg.kit import MAX_CHECKS

from ..common.backends import BackendFlow
from .clock import PhaseClock, no_mark
from .settings import REVERSE_VARIANTS, Settings


def nll(flow: Any, x: Tensor) -> Tensor:
    """Negative log-likelihood per dimension under a standard normal base."""
    z, log_det = flow(x)
    dim = z.shape[1]
    return (0.5 * z.square().sum(1) - log_det).mean() / dim + 0.5 * math.log(2 * math.pi)


def captured_log_abs_d(flow: BackendFlow, x: Tensor) -> tuple[Tensor, Tensor]:
    r"""The captured :math:`\log|d|` of one pass of a copy of ``flow`` on ``x``, detached:
    every per-sample factor's entries as ``(B, n)``, and the entries of the factors shared by
    the batch (ActNorm, LU diagonals, global scales) as ``(1, m)`` (``m`` may be 0)."""
    twin = copy.deepcopy(flow)
    capture = klj_reg.attach(twin.model)
    with torch.no_grad():
        twin(x)
    rows, shared = [], []
    batch = x.shape[0]
    for record in capture.take():
        for f in record.factors:
            t = f.log_abs_d()
            if f.batch == batch and f.selected().stride(0) != 0:
                rows.append(t.reshape(batch, -1))
            else:
                if t.dim() > 0 and t.shape[0] == batch and t.stride(0) == 0:
                    t = t[:1]
                shared.append(t.reshape(1, -1))
    klj_reg.detach(twin.model)
    empty = x.new_zeros(batch, 0), x.new_zeros(1, 0)
    per_sample = torch.cat(rows, dim=1) if rows else empty[0]
    return per_sample.detach(), (torch.cat(shared, dim=1) if shared else empty[1]).detach()


class Step(Protocol):
    """One training step; marks its phase boundaries on the clock it is given, if any."""

    def __call__(self, clock: PhaseClock | None = None) -> None: ...


def hooked_names(model: torch.nn.Module) -> list[str]:
    """The modules of ``model`` that klj-reg hooks when attached (found on a copy)."""
    twin = copy.deepcopy(model)
    klj_reg.attach(twin)
    names = [name for name, m in twin.named_modules() if hooks.binding(m) is not None]
    klj_reg.detach(twin)
    return names


def _nothing(module: torch.nn.Module, args: Any, kwargs: Any, output: Any) -> None:
    """A forward hook that does nothing: what torch's hooked call path costs by itself."""


def make_step(variant: str, flow: BackendFlow, x: Tensor, settings: Settings) -> Step:
    """One training step of ``variant`` on ``flow`` (which it owns) with its own Adam.

    ``compiled`` and ``compiled+capture`` run the flow's forward through ``torch.compile``
    (the latter attached first, as the docs ask); their compilation happens in the warm-up."""
    model = flow.model
    forward: Any = flow
    if variant.startswith("compiled"):
        if variant == "compiled+capture":
            klj_reg.attach(model)
        forward = torch.compile(lambda t: flow(t))
    if variant == "dispatch":
        modules = dict(model.named_modules())
        for name in hooked_names(model):
            modules[name].register_forward_hook(_nothing, with_kwargs=True)
    floor = (
        tuple(t.requires_grad_() for t in captured_log_abs_d(flow, x))
        if variant == "floor"
        else None
    )
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    capture = (
        klj_reg.attach(model)
        if variant in ("hooks", "capture", "capture+check", "fused", "second-pass")
        else None
    )
    capture_penalty = ("capture", "capture+check", "compiled+capture")
    alpha = settings.alpha

    def penalty() -> Tensor:
        with torch.profiler.record_function("klj_penalty"):
            if variant in capture_penalty:
                return klj_reg.penalty(model, x, alpha=alpha, normaliser="dim")
            if variant == "fused":
                return klj_reg.penalty(model, x, alpha=alpha, normaliser="dim", fused=True)
            if variant == "floor":
                assert floor is not None
                per_sample, shared = floor
                per_sample.grad = shared.grad = None
                scale = alpha / x[0].numel()
                total = klj_reg.klj_sum(per_sample) * (scale / x.shape[0])
                if shared.numel():  # the batch mean of a shared term is itself
                    total = total + klj_reg.klj_sum(shared) * scale
                return total
            if variant == "second-pass":
                klj_reg.clear(model)  # discard the user's pass: the penalty runs its own
                return klj_reg.penalty(model, x, alpha=alpha, normaliser="dim")
            return klj_reg.penalty(model, x, alpha=alpha, normaliser="dim", estimator=variant)

    def step(clock: PhaseClock | None = None) -> None:
        if variant == "capture+check":
            assert capture is not None
            for site in capture.sites.values():
                site.checks_left = MAX_CHECKS
        mark = clock.mark if clock is not None else no_mark
        mark()
        optimiser.zero_grad(set_to_none=True)
        with torch.profiler.record_function("nll"):
            loss = nll(forward, x)
        mark()
        if variant == "hooks":
            klj_reg.clear(model)
        elif variant not in ("plain", "plain-again", "dispatch", "compiled"):
            loss = loss + penalty()
        mark()
        backward_and_step(loss, optimiser, mark)

    return step


def backward_and_step(loss: Tensor, optimiser: torch.optim.Optimizer, mark: Any) -> None:
    """The step's backward and optimiser phases, each closed by ``mark()``."""
    loss.backward()
    mark()
    with torch.profiler.record_function("optimiser"):
        optimiser.step()
    mark()


def banana_log_prob(x: Tensor) -> Tensor:
    """Unnormalised log-density of the reverse-KL target: a banana in the first two
    coordinates, a unit Gaussian in the others."""
    bend = x[:, 1] - 0.5 * x[:, 0].square()
    return -0.5 * (x[:, 0].square() / 4 + bend.square() / 0.25 + x[:, 2:].square().sum(1))


def sample_and_log_q(flow: BackendFlow, n: int, dim: int) -> tuple[Tensor, Tensor]:
    """``n`` samples of ``flow`` and their log-density, through the framework's own sampling
    API (the latent-to-data pass)."""
    model: Any = flow.model
    if flow.backend == "zuko":
        x, log_q = model().rsample_and_log_prob((n,))
        return x, log_q
    if flow.backend == "nflows":
        x, log_q = model.sample_and_log_prob(n)
        return x, log_q
    if flow.backend == "normflows":
        x, log_q = model.sample(n)
        return x, log_q
    like = next(model.parameters())
    z = torch.randn(n, dim, dtype=like.dtype, device=like.device)
    x, log_det = model(z, rev=True, jac=True)
    log_base = -0.5 * z.square().sum(1) - 0.5 * dim * math.log(2 * math.pi)
    return x, log_base - log_det


def make_reverse_step(variant: str, flow: BackendFlow, settings: Settings) -> Step:
    """One reverse-KL training step of ``variant`` on ``flow`` with its own Adam."""
    if variant not in REVERSE_VARIANTS:
        raise ValueError(f"{variant!r} has no reverse-KL step ({', '.join(REVERSE_VARIANTS)})")
    model = flow.model
    optimiser = torch.optim.Adam(flow.parameters(), lr=settings.lr)
    if variant in ("hooks", "capture"):
        klj_reg.attach(model, direction="sample")
    elif variant == "second-pass":
        klj_reg.attach(model)
    dim, alpha = settings.dim, settings.alpha

    def step(clock: PhaseClock | None = None) -> None:
        mark = clock.mark if clock is not None else no_mark
        mark()
        optimiser.zero_grad(set_to_none=True)
        with torch.profiler.record_function("nll"):
            x, log_q = sample_and_log_q(flow, settings.batch, dim)
            loss = (log_q - banana_log_prob(x)).mean() / dim
        mark()
        if variant == "hooks":
            klj_reg.clear(model)
        elif variant in ("capture", "second-pass"):
            with torch.profiler.record_function("klj_penalty"):
                loss = loss + klj_reg.penalty(
                    model, x if variant == "second-pass" else None, alpha=alpha, normaliser="dim"
                )
        mark()
        backward_and_step(loss, optimiser, mark)

    return step
