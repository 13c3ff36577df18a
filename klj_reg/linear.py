r"""Closed forms for the linear flow :math:`z = U^\top x + b` (paper Theorems 1 and 3).

With :math:`N` samples :math:`x_i \in \mathbb{R}^d`, :math:`\bar x` their mean,
:math:`T = \frac1N \sum_i (x_i - \bar x)(x_i - \bar x)^\top` the biased sample covariance and
:math:`M = U U^\top`, the summed negative log-likelihood under :math:`z \sim \mathcal N(0, I)`
(without the constant :math:`\frac{Nd}{2}\log 2\pi`) is the paper's Eq. 3,

.. math:: \mathcal L(U, b) = \sum_i \tfrac12 \|U^\top x_i + b\|^2 - N \log|\det U|.

Every objective below has :math:`b = -U^\top \bar x` at its optimum (the paper writes
:math:`b = U^\top \bar x`; with its own :math:`z = U^\top x + b` the sign is minus), after which
:math:`\mathcal L = \frac N2 \operatorname{tr}(TM) - \frac N2 \log\det M`. Only :math:`M` is
identified: any :math:`U` with :math:`UU^\top = M` (e.g. :math:`U Q` for orthogonal
:math:`Q`) is optimal. The fitted density of :math:`x` is :math:`\mathcal N(\bar x, M^{-1})`.

- no regulariser (Theorem 1): :math:`\mathcal L`, solved by :math:`M^{-1} = T` (needs full rank);
- KL (Theorem 3): :math:`\mathcal L + \frac\alpha2 \mathrm{KL}(M, G^{-1})`, solved by
  :math:`M^{-1} = \frac{NT + \alpha G}{N + \alpha}`;
- L2 on :math:`U`: :math:`\mathcal L + \frac\alpha2 \|U\|_F^2`, solved by
  :math:`M^{-1} = T + \frac\alpha N I`,

with :math:`\mathrm{KL}(M, G^{-1}) = \operatorname{tr}(MG) - \log\det(MG)` (equal to
:math:`2\,\mathrm{KL}(\mathcal N(0, G) \,\|\, \mathcal N(0, M^{-1})) + d`).

The deep-flow penalty on a linear flow: the Jacobian of :math:`x \mapsto U^\top x + b` is
:math:`U^\top`, so :math:`\mathrm{KLJ} = \|U\|_F^2 - d - 2\log|\det U| = \mathrm{KL}(M, I) - d`.
Hence ``mean_i NLL_i + a * KLJ`` (``klj_reg.penalty(..., alpha=a, normaliser="none")``) is
:math:`\frac1N(\mathcal L + N a\,\mathrm{KL}(M, I)) + \text{const}`, Theorem 3 with
:math:`G = I` and :math:`\alpha = 2Na` (:func:`theorem3_alpha`). With the library's default
``normaliser="dim"`` the weight is :math:`a / d`, so :math:`\alpha = 2Na/d`.

The KL solution is a convex combination of :math:`T` and the prior :math:`G`: it exists for
any :math:`N` (also :math:`N \le d`, where :math:`T` is singular and Eq. 3 is unbounded below)
and tends to :math:`G` as :math:`\alpha \to \infty`. The L2 solution adds :math:`\frac\alpha N`
to every variance: as :math:`\alpha` grows the density flattens out (the paper's "collapse").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _samples(x: Tensor) -> Tensor:
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(f"x must have shape (N, d) with N >= 1, got {tuple(x.shape)}")
    return x


def sample_covariance(x: Tensor) -> Tensor:
    r""":math:`T = \frac1N \sum_i (x_i - \bar x)(x_i - \bar x)^\top` (biased), shape ``(d, d)``."""
    x = _samples(x)
    centred = x - x.mean(0)
    return centred.T @ centred / x.shape[0]


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha}")


def mle_covariance(x: Tensor) -> Tensor:
    r"""Theorem 1: :math:`M^{-1} = T`. Raises if :math:`T` is singular (e.g. :math:`N \le d`):
    then Eq. 3 is unbounded below and has no minimiser."""
    cov = sample_covariance(x)
    rank = int(torch.linalg.matrix_rank(cov))
    if rank < cov.shape[0]:
        raise ValueError(
            f"the sample covariance has rank {rank} < d = {cov.shape[0]} (N = {x.shape[0]}): "
            "the linear flow's likelihood is unbounded and has no maximiser; use "
            "klj_covariance (Theorem 3) instead."
        )
    return cov


def klj_covariance(x: Tensor, alpha: float, G: Tensor | None = None) -> Tensor:
    r"""Theorem 3: :math:`M^{-1} = (NT + \alpha G) / (N + \alpha)`, minimiser of
    :math:`\mathcal L + \frac\alpha2 [\operatorname{tr}(MG) - \log\det(MG)]`.
    ``G`` (symmetric positive definite, default :math:`I`) is the prior covariance."""
    _check_alpha(alpha)
    cov = sample_covariance(x)
    n = x.shape[0]
    prior = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device) if G is None else G
    return (n * cov + alpha * prior) / (n + alpha)


def l2_covariance(x: Tensor, alpha: float) -> Tensor:
    r"""L2 on :math:`U`: :math:`M^{-1} = T + \frac\alpha N I`, minimiser of
    :math:`\mathcal L + \frac\alpha2\|U\|_F^2`.

    Setting the gradient :math:`NTU - NU^{-\top} + \alpha U` to zero gives
    :math:`(NT + \alpha I)\,UU^\top = N I`. (The paper's :math:`T + \alpha I` is the same
    with the objective divided by :math:`N`: :math:`\frac1N\mathcal L + \frac\alpha2\|U\|_F^2`.)
    """
    _check_alpha(alpha)
    cov = sample_covariance(x)
    eye = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    return cov + (alpha / x.shape[0]) * eye


def mle_precision(x: Tensor) -> Tensor:
    """:math:`M = UU^\\top` of Theorem 1, the inverse of :func:`mle_covariance`."""
    return torch.linalg.inv(mle_covariance(x))


def klj_precision(x: Tensor, alpha: float, G: Tensor | None = None) -> Tensor:
    """:math:`M = UU^\\top` of Theorem 3, the inverse of :func:`klj_covariance`."""
    return torch.linalg.inv(klj_covariance(x, alpha, G))


def l2_precision(x: Tensor, alpha: float) -> Tensor:
    """:math:`M = UU^\\top` under L2 on :math:`U`, the inverse of :func:`l2_covariance`."""
    return torch.linalg.inv(l2_covariance(x, alpha))


def linear_flow(precision: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    r"""One optimal :math:`(U, b)` for :math:`M`: :math:`U` the lower Cholesky factor
    (:math:`UU^\top = M`), :math:`b = -U^\top \bar x`."""
    u = torch.linalg.cholesky(precision)
    return u, -u.T @ mean


def theorem3_alpha(weight: float, n: int, dim: int | None = None) -> float:
    r"""The Theorem-3 :math:`\alpha` of ``mean_i NLL_i + weight * KLJ``: :math:`2N\cdot`weight,
    or :math:`2N\cdot`weight/``dim`` if the penalty is divided by ``dim`` (the default)."""
    return 2.0 * n * weight / (1 if dim is None else dim)


def objective(
    u: Tensor,
    b: Tensor,
    x: Tensor,
    alpha: float = 0.0,
    reg: str = "kl",
    G: Tensor | None = None,
) -> Tensor:
    r"""The exact objective each closed form minimises (differentiable):
    :math:`\mathcal L(U, b) + \frac\alpha2 R(U)`, with :math:`R = \mathrm{KL}(UU^\top, G^{-1})`
    for ``reg="kl"`` and :math:`\|U\|_F^2` for ``reg="l2"``."""
    z = x @ u + b
    _, logabsdet = torch.linalg.slogdet(u)
    value = 0.5 * z.square().sum() - x.shape[0] * logabsdet
    if alpha == 0:
        return value
    if reg == "l2":
        return value + 0.5 * alpha * u.square().sum()
    if reg != "kl":
        raise ValueError(f"reg must be 'kl' or 'l2', got {reg!r}")
    m = u @ u.T
    mg = m if G is None else m @ G
    return value + 0.5 * alpha * (torch.trace(mg) - torch.linalg.slogdet(mg)[1])


def gaussian_log_density(x: Tensor, mean: Tensor, covariance: Tensor) -> Tensor:
    r"""The fitted density, :math:`\log \mathcal N(x; \bar x, M^{-1})`, per row of ``x``
    (by Eq. 1 the same as :math:`\log\mathcal N(U^\top x + b; 0, I) + \log|\det U|`)."""
    dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=covariance)
    return dist.log_prob(x)


def density_1d(t: Tensor, mean: float, variance: float) -> Tensor:
    r"""1-D fitted density :math:`\mathcal N(t; \mu, \sigma^2)` on a grid (paper Fig. 2)."""
    return torch.exp(-0.5 * (t - mean) ** 2 / variance) / math.sqrt(2 * math.pi * variance)
