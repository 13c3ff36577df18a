r"""The generative classifier's objectives (IB-INN, Ardizzone et al. 2020, as the paper used).

With class means :math:`\mu_c`, unit covariance, class prior :math:`\pi = \mathrm{softmax}(\phi)`
and :math:`zz_c = \|z - \mu_c\|^2`, per sample (all per dimension :math:`D`, no
:math:`2\pi` constant, as the authors' code):

.. math::

    L_x &= \big(-\operatorname{logsumexp}_c(-zz_c/2 + \log\pi_c) - \log|\det J|\big) / D \\
    L_y &= \textstyle\sum_c \tilde y_c \big(\log\mathrm{softmax}(-zz/2 + \log\pi)_c - \log\pi_c\big)
    \qquad (\tilde y: \text{labels smoothed by } 0.02;\ \log\pi \text{ detached}) \\
    L_{cNLL} &= (zz_y/2 - \log|\det J|) / D

:math:`L_y` is the IB-INN estimate of :math:`I(Z, Y)` (minus the cross-entropy plus a constant),
so it is *maximised*:

- IB(:math:`\beta`): :math:`\beta_x L_x - \beta_y L_y` with :math:`\beta_x = 2/(1+\beta)`,
  :math:`\beta_y = 2\beta/(1+\beta)`; :math:`\beta = 1` is the paper's :math:`\gamma = 1`,
  :math:`\beta \to \infty` (:math:`\beta_x = 0, \beta_y = 2`) pure cross-entropy;
- cNLL: :math:`2 L_{cNLL}`.

The KLJ penalty is added by the training loop, from the same forward pass.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

LABEL_SMOOTHING = 0.02
OBJECTIVES = ("ib", "cnll")


def class_distances(z: Tensor, mu: Tensor) -> Tensor:
    r""":math:`zz_{bc} = \|z_b - \mu_c\|^2`, shape ``(B, C)``, from ``z (B, D)``, ``mu (C, D)``."""
    return (z.square().sum(1, keepdim=True) - 2.0 * z @ mu.t() + mu.square().sum(1)).clamp_min(0)


def l_x(zz: Tensor, log_det: Tensor, log_prior: Tensor, dim: int) -> Tensor:
    """Per-sample marginal NLL per dimension, ``(B,)``: the OoD score."""
    return (-torch.logsumexp(-0.5 * zz + log_prior, dim=1) - log_det) / dim


def smooth_labels(y: Tensor, n_classes: int, smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """One-hot ``(B, C)`` with ``smoothing`` spread uniformly: ``(1-s) onehot + s / C``."""
    onehot = F.one_hot(y, n_classes).to(torch.get_default_dtype())
    return onehot * (1.0 - smoothing) + smoothing / n_classes


def l_y(zz: Tensor, log_prior: Tensor, y: Tensor, smoothing: float = LABEL_SMOOTHING) -> Tensor:
    """Per-sample :math:`I(Z,Y)` estimate ``(B,)`` (to maximise), prior detached."""
    log_prior = log_prior.detach()
    target = smooth_labels(y, zz.shape[1], smoothing).to(zz.dtype)
    return ((torch.log_softmax(-0.5 * zz + log_prior, dim=1) - log_prior) * target).sum(1)


def l_cnll(zz: Tensor, log_det: Tensor, y: Tensor, dim: int) -> Tensor:
    """Per-sample class-conditional NLL per dimension, ``(B,)`` (hard labels)."""
    return (0.5 * zz.gather(1, y[:, None])[:, 0] - log_det) / dim


def ib_weights(beta: float) -> tuple[float, float]:
    r""":math:`(\beta_x, \beta_y) = (2/(1+\beta),\ 2\beta/(1+\beta))`; ``inf`` gives ``(0, 2)``."""
    if beta < 0 or math.isnan(beta):
        raise ValueError(f"IB beta must be >= 0, got {beta}")
    if math.isinf(beta):
        return 0.0, 2.0
    return 2.0 / (1.0 + beta), 2.0 * beta / (1.0 + beta)


class Losses(NamedTuple):
    """Batch means of the terms, and the objective to minimise (before the penalty)."""

    loss: Tensor
    l_x: Tensor
    l_y: Tensor
    l_cnll: Tensor


def objective(
    name: str,
    zz: Tensor,
    log_det: Tensor,
    log_prior: Tensor,
    y: Tensor,
    dim: int,
    beta: float = 1.0,
    smoothing: float = LABEL_SMOOTHING,
) -> Losses:
    """``"ib"``: :math:`\\beta_x L_x - \\beta_y L_y`; ``"cnll"``: :math:`2 L_{cNLL}` (means)."""
    lx = l_x(zz, log_det, log_prior, dim).mean()
    ly = l_y(zz, log_prior, y, smoothing).mean()
    lc = l_cnll(zz, log_det, y, dim).mean()
    if name == "ib":
        beta_x, beta_y = ib_weights(beta)
        loss = beta_x * lx - beta_y * ly if beta_x else -beta_y * ly
    elif name == "cnll":
        loss = 2.0 * lc
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {name!r}")
    return Losses(loss, lx, ly, lc)
