r"""KLJ of a whole invertible map without an adapter, from its Jacobian.

For :math:`z = f(x)` with Jacobian :math:`J`, the paper's Eq. 8 with the whole network as one
layer gives, per sample,

.. math:: \mathrm{KLJ}(x) = \|J\|_F^2 - D - 2\log|\det J| \;\ge\; 0.

``exact`` builds :math:`J` (D backward passes, fine for small D); ``hutchinson`` uses
:math:`\|J\|_F^2 = \mathbb{E}_u \|J^\top u\|^2` for Rademacher :math:`u`, one vector-Jacobian
product per probe, unbiased. Both assume samples are processed independently (no batch
statistics in training mode) and run their own forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Flow = Callable[[Tensor], tuple[Tensor, Tensor]]


def exact_klj(flow: Flow, x: Tensor) -> Tensor:
    """Per-sample KLJ from the full Jacobian, shape ``(B,)``; differentiable."""
    x = x.detach().requires_grad_(True)
    z, log_det = flow(x)
    batch, dim = x.shape[0], x.shape[1:].numel()
    rows = []
    flat = z.reshape(batch, -1)
    for j in range(flat.shape[1]):  # one VJP per output dimension; D is small here
        (g,) = torch.autograd.grad(flat[:, j].sum(), x, create_graph=True, retain_graph=True)
        rows.append(g.reshape(batch, -1))
    jac = torch.stack(rows, dim=1)
    return jac.square().sum(dim=(1, 2)) - dim - 2.0 * log_det.reshape(batch)


def hutchinson_klj(flow: Flow, x: Tensor, n_samples: int = 1) -> Tensor:
    """Per-sample unbiased estimate of KLJ from ``n_samples`` Rademacher probes, ``(B,)``."""
    x = x.detach().requires_grad_(True)
    z, log_det = flow(x)
    batch, dim = x.shape[0], x.shape[1:].numel()
    total = torch.zeros(batch, dtype=z.dtype, device=z.device)
    for _ in range(n_samples):
        u = torch.empty_like(z).bernoulli_(0.5).mul_(2).sub_(1)
        (g,) = torch.autograd.grad(z, x, u, create_graph=True)
        total = total + g.reshape(batch, -1).square().sum(1)
    return total / n_samples - dim - 2.0 * log_det.reshape(batch)
