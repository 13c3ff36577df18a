r"""Generative classifier: a flow and one learned Gaussian per class (IB-INN).

Images in :math:`[0, 1]` are first normalised by the CIFAR-10 mean and standard deviation, a
fixed affine map whose log-determinant :math:`-HW\sum_c \log\sigma_c` is added to the flow's, so
that :math:`L_x` is the density of the :math:`[0, 1]` images themselves. The latent
:math:`z = f(x)` has density :math:`\sum_c \pi_c \mathcal{N}(z; \mu_c, I)` with learned means
(initialised 5 apart, as IB-INN: :math:`\mu_{c,c+10k} = 5/\sqrt{2D/C}`) and learned
:math:`\pi = \mathrm{softmax}(\phi)`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..common.backends import BackendFlow
from ..common.image_flows import CIFAR_MEAN, CIFAR_STD
from . import objectives


class Output(NamedTuple):
    """One forward pass: latent, total log-det (normalisation included), class distances,
    and the normalised images the flow ran on (``flow_input``: the batch to give
    ``klj_reg.penalty``, whose records belong to the flow's pass on that very tensor)."""

    z: Tensor
    log_det: Tensor
    zz: Tensor
    log_prior: Tensor
    flow_input: Tensor


def initial_means(n_classes: int, dim: int, separation: float = 5.0) -> Tensor:
    r"""IB-INN's means: class :math:`c` gets :math:`s/\sqrt{2 \lfloor D/C \rfloor}` at
    dimensions :math:`c, c + C, c + 2C, \dots`, so that :math:`\|\mu_c - \mu_{c'}\| = s`."""
    blocks = dim // n_classes
    scale = separation / math.sqrt(2 * blocks)
    mu = torch.zeros(n_classes, dim)
    mu[:, : blocks * n_classes] = scale * torch.eye(n_classes).repeat(1, blocks)
    return mu


class GenerativeClassifier(nn.Module):
    """``forward(x in [0,1]) -> Output``; :attr:`flow` is the backend's image flow."""

    def __init__(
        self,
        flow: BackendFlow,
        n_classes: int = 10,
        shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = CIFAR_MEAN,
        std: tuple[float, ...] = CIFAR_STD,
        separation: float = 5.0,
    ) -> None:
        super().__init__()
        self.flow = flow
        self.n_classes = n_classes
        self.dim = math.prod(shape)
        self.mu = nn.Parameter(initial_means(n_classes, self.dim, separation))
        self.phi = nn.Parameter(torch.zeros(n_classes))
        self.mean: Tensor
        self.inv_std: Tensor
        self.register_buffer("mean", torch.tensor(mean).reshape(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std).reshape(1, -1, 1, 1))
        pixels = shape[1] * shape[2]
        self.normalise_log_det = pixels * float(torch.log(1.0 / torch.tensor(std)).sum())

    def forward(self, x: Tensor) -> Output:
        u = (x - self.mean) * self.inv_std
        z, log_det = self.flow(u)
        log_det = log_det + self.normalise_log_det
        zz = objectives.class_distances(z, self.mu)
        return Output(z, log_det, zz, torch.log_softmax(self.phi, 0), u)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample ``L_x`` (the OoD score) and logits ``-zz/2``."""
        out = self(x)
        return objectives.l_x(out.zz, out.log_det, out.log_prior, self.dim), -0.5 * out.zz
