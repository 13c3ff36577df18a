r"""Choosing ``alpha`` on held-out data: a short sweep on the user's own model and data.

``alpha`` weighs the penalty against a per-sample NLL (see :func:`klj_reg.penalty`), so its
best value depends on the data, the flow and the training budget. The recipe this module
makes one call: train once per candidate ``alpha`` (same initialisation, same data), score
each run on a validation split (its mean NLL), keep the lowest:

.. math:: \hat\alpha = \operatorname{arg\,min}_{\alpha \in \mathcal{A}}
    \mathrm{NLL}_{\text{val}}(\theta_\alpha),

with non-finite scores (a run that blew up) counted as :math:`+\infty` and ties going to the
smaller ``alpha`` (the weaker change to plain maximum likelihood).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

ALPHAS: tuple[float, ...] = (0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
"""The default candidates: 0 (plain training) and five decades."""


class AlphaChoice(NamedTuple):
    """What :func:`choose_alpha` found: the chosen ``alpha`` and every candidate's score
    (validation NLL; ``inf`` for a run that failed or blew up)."""

    alpha: float
    scores: dict[float, float]


def _score(value: float) -> float:
    value = float(value)
    return value if math.isfinite(value) else math.inf


def pick_alpha(scores: Mapping[float, float]) -> float:
    """The ``alpha`` with the lowest score; non-finite scores count as ``+inf``; ties go to
    the smaller ``alpha``. Raises ``ValueError`` when there is no score, or when every
    score is non-finite (no candidate trained)."""
    if not scores:
        raise ValueError("pick_alpha needs at least one (alpha, score) pair")
    clean = {float(a): _score(s) for a, s in scores.items()}
    best = min(sorted(clean), key=lambda a: clean[a])
    if not math.isfinite(clean[best]):
        raise ValueError(
            f"every candidate's score is non-finite ({sorted(clean)}): no alpha trained; "
            "lower the learning rate or check the data before choosing alpha"
        )
    return best


def choose_alpha(
    score: Callable[[float], float],
    alphas: Iterable[float] = ALPHAS,
    *,
    catch: tuple[type[BaseException], ...] = (FloatingPointError, ValueError),
) -> AlphaChoice:
    """Run ``score(alpha)`` for every candidate and pick the best with :func:`pick_alpha`.

    Args:
        score: Trains a model with the given ``alpha`` (from the same initialisation for
            every candidate) and returns its validation NLL (lower is better; any unit, the
            same for every candidate). A run that raises one of ``catch`` scores ``+inf``.
        alphas: The candidates (default :data:`ALPHAS`: 0 and 1e-3 ... 10). Each must be a
            finite number >= 0; duplicates are run once.
        catch: Exceptions that mark a candidate as failed instead of ending the sweep.

    Returns:
        :class:`AlphaChoice` with the chosen ``alpha`` and all scores.

    Example::

        def score(alpha):
            torch.manual_seed(0)
            flow = make_flow()
            train(flow, train_set, alpha)           # penalty(flow, x, alpha=alpha) in the loss
            with torch.no_grad():
                return -flow.log_prob(val_set).mean().item()

        best = klj_reg.choose_alpha(score).alpha
    """
    candidates = sorted({float(a) for a in alphas})
    if not candidates:
        raise ValueError("choose_alpha needs at least one candidate alpha")
    for a in candidates:
        if not (math.isfinite(a) and a >= 0):
            raise ValueError(f"every alpha must be finite and >= 0, got {a}")
    scores: dict[float, float] = {}
    for a in candidates:
        try:
            scores[a] = _score(score(a))
        except catch:
            scores[a] = math.inf
    return AlphaChoice(pick_alpha(scores), scores)
