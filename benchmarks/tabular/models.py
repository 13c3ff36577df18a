"""The eight flows, two per backend, as :class:`benchmarks.common.backends.BackendFlow`.

=================  ========================================================================
freia-allinone     ``tabular_flow("freia")``: ``AllInOneBlock`` (affine coupling, global
                   affine, hard permutation), clamp 2
freia-glow         ``GLOWCouplingBlock`` (clamp 2) + ``PermuteRandom`` per layer
nflows-realnvp     ``tabular_flow("nflows")``: ``ActNorm``, ``AffineCouplingTransform``,
                   ``RandomPermutation``
nflows-maf         ``tabular_flow("nflows", kind="maf")``: MADE affine layers, permutations
normflows-realnvp  ``tabular_flow("normflows")``: ``AffineConstFlow``, ``AffineCouplingBlock``,
                   ``Permute``
normflows-maf      ``nf.flows.Reverse(MaskedAffineAutoregressive)`` + ``Permute``: normflows'
                   MADE layer turned so that data to latent is its one-pass direction
zuko-realnvp       ``tabular_flow("zuko")``: ``ElementWiseTransform``, ``GeneralCouplingTransform``
zuko-nsf           ``zuko.flows.NSF(features=D, transforms=layers, hidden_features=(hidden,
                   hidden))``: rational-quadratic spline autoregressive layers, zuko's init
=================  ========================================================================

``normflows-maf-loop`` (not in the default grid) is ``tabular_flow("normflows", kind="maf")``:
normflows' ``MaskedAffineAutoregressive`` as it comes, whose data-to-latent direction
(``inverse``, what ``forward_kld`` runs) is the D-pass loop, so it is autoregressive in the
latent (IAF-like) and costs D MADE passes per layer: ~180 ms of CPU a step at D = 64 (86 at
D = 30) against ~5 for the turned one; it would take more than half the grid's time.
``normflows-maf`` uses the same layer class turned around with ``nf.flows.Reverse``, which
makes it a MAF like nflows' and zuko's.

Subnet output layers start at zero (the flow at the identity) except in zuko's NSF, built with
zuko's defaults. Parameters (and FrEIA's permutations, which come from numpy's global
generator) are drawn from the global generators: :func:`build` seeds both first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..common.backends import BackendFlow
from ..common.tabular import mlp, tabular_flow, zero_init


def _freia_glow(dim: int, layers: int, hidden: int) -> BackendFlow:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(dim)
    for _ in range(layers):
        inn.append(
            Fm.GLOWCouplingBlock, subnet_constructor=lambda i, o: mlp(i, o, hidden), clamp=2.0
        )
        inn.append(Fm.PermuteRandom, seed=int(np.random.randint(2**31)))

    def forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        return model(x)

    return BackendFlow("freia", inn, forward)


def _zuko_nsf(dim: int, layers: int, hidden: int) -> BackendFlow:
    import zuko

    flow = zuko.flows.NSF(features=dim, transforms=layers, hidden_features=(hidden, hidden))

    def forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        return model().transform.call_and_ladj(x)

    return BackendFlow("zuko", flow, forward)


def _normflows_maf(dim: int, layers: int, hidden: int) -> BackendFlow:
    import normflows as nf

    steps: list[Any] = []
    for _ in range(layers):
        made = nf.flows.MaskedAffineAutoregressive(
            dim, hidden, num_blocks=1, use_residual_blocks=False
        )
        zero_init(made.autoregressive_net.final_layer)
        steps.append(nf.flows.Reverse(made))
        steps.append(nf.flows.Permute(dim, mode="shuffle"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), steps)

    def forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        return model.inverse_and_log_det(x)

    return BackendFlow("normflows", model, forward)


def _tabular(backend: str, kind: str) -> Callable[[int, int, int], BackendFlow]:
    def make(dim: int, layers: int, hidden: int) -> BackendFlow:
        return tabular_flow(backend, dim, layers, hidden, kind)

    return make


MODELS: dict[str, tuple[str, Callable[[int, int, int], BackendFlow]]] = {
    "freia-allinone": ("freia", _tabular("freia", "realnvp")),
    "freia-glow": ("freia", _freia_glow),
    "nflows-realnvp": ("nflows", _tabular("nflows", "realnvp")),
    "nflows-maf": ("nflows", _tabular("nflows", "maf")),
    "normflows-realnvp": ("normflows", _tabular("normflows", "realnvp")),
    "normflows-maf": ("normflows", _normflows_maf),
    "normflows-maf-loop": ("normflows", _tabular("normflows", "maf")),
    "zuko-realnvp": ("zuko", _tabular("zuko", "realnvp")),
    "zuko-nsf": ("zuko", _zuko_nsf),
}
DEFAULT_MODELS = tuple(name for name in MODELS if name != "normflows-maf-loop")


def build(model: str, dim: int, layers: int, hidden: int, seed: int) -> BackendFlow:
    """Model ``model`` on ``dim`` features, its parameters drawn after seeding torch and numpy
    with ``seed`` (the same flow for every alpha of a cell)."""
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    return MODELS[model][1](dim, layers, hidden)


def nll(flow: BackendFlow, x: Tensor) -> Tensor:
    """Per-sample negative log-likelihood in nats under the standard normal base (every
    model's base distribution): ``0.5 |z|^2 + D/2 log(2 pi) - log|det J|``."""
    z, log_det = flow(x)
    dim = z.shape[1]
    return 0.5 * z.square().sum(1) + 0.5 * dim * float(np.log(2 * np.pi)) - log_det
