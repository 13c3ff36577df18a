"""Flows for flat D-dimensional data, one per backend, built from each framework's own layers.

``tabular_flow(backend, dim, layers, hidden, kind)`` returns a
:class:`benchmarks.common.backends.BackendFlow`. Every flow has ``layers`` layers, each

- ``kind="realnvp"``: a learnable elementwise affine map, an affine coupling layer (half of the
  features transformed, conditioned on the other half by an MLP ``dim/2 -> hidden -> hidden ->
  dim``) and a feature permutation (or alternating masks);
- ``kind="maf"``: a masked affine autoregressive layer (MADE ``dim -> hidden -> hidden ->
  2 dim``) and a permutation (FrEIA has no autoregressive layer).

Every flow starts as (close to) the identity: subnet output layers are zero, elementwise
affines are the identity (no data-dependent initialisation), so that runs differ only by the
framework's parameterisation. Per backend:

============  ==========================================================================
freia         ``SequenceINN`` of ``AllInOneBlock`` (coupling, global affine, permutation)
nflows        ``ActNorm``, ``AffineCouplingTransform``, ``RandomPermutation``;
              MAF: ``MaskedAffineAutoregressiveTransform``, ``RandomPermutation``
normflows     ``AffineConstFlow``, ``AffineCouplingBlock`` (exp scale), ``Permute``;
              MAF: ``MaskedAffineAutoregressive``, ``Permute``
zuko          ``ElementWiseTransform``, ``GeneralCouplingTransform`` (alternating masks);
              MAF: ``MaskedAutoregressiveTransform`` with alternating orders
============  ==========================================================================

nflows' coupling scale is ``sigmoid(u + 2) + 1e-3`` (at most 1.001, data to latent): without
the ``ActNorm`` it could not expand any direction.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .backends import BACKENDS, BackendFlow

KINDS = ("realnvp", "maf")


class MLP(nn.Sequential):
    """An ``nn.Sequential`` that ignores a ``context`` argument (nflows passes one)."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        return super().forward(x)


def mlp(c_in: int, c_out: int, hidden: int = 64) -> MLP:
    """``c_in -> hidden -> hidden -> c_out`` with ReLU; the output layer starts at zero."""
    net = MLP(
        nn.Linear(c_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, c_out),
    )  # fmt: skip
    zero_init(net[-1])
    return net


def zero_init(layer: nn.Module) -> None:
    """Every parameter of ``layer`` to zero (a flow's layer then starts at the identity)."""
    for p in layer.parameters():
        nn.init.zeros_(p)


def _freia(dim: int, layers: int, hidden: int, kind: str) -> BackendFlow:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    if kind == "maf":
        raise ValueError("FrEIA has no autoregressive (MAF) layer; use kind='realnvp'")
    inn = Ff.SequenceINN(dim)
    for _ in range(layers):
        inn.append(
            Fm.AllInOneBlock,
            subnet_constructor=lambda i, o: mlp(i, o, hidden),
            affine_clamping=2.0,
            permute_soft=False,
        )

    def forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
        return model(x)

    return BackendFlow("freia", inn, forward)


def _nflows(dim: int, layers: int, hidden: int, kind: str) -> BackendFlow:
    from nflows import distributions, flows, transforms
    from nflows.utils import create_alternating_binary_mask

    steps: list[Any] = []
    for i in range(layers):
        if kind == "maf":
            made = transforms.MaskedAffineAutoregressiveTransform(
                dim, hidden, num_blocks=1, use_residual_blocks=False
            )
            zero_init(made.autoregressive_net.final_layer)
            steps.append(made)
        else:
            norm = transforms.ActNorm(dim)
            norm.initialized.fill_(True)  # identity start, like the other backends
            steps.append(norm)
            steps.append(
                transforms.AffineCouplingTransform(
                    create_alternating_binary_mask(dim, even=i % 2 == 0),
                    lambda i, o: mlp(i, o, hidden),
                )
            )
        steps.append(transforms.RandomPermutation(dim))
    flow = flows.Flow(transforms.CompositeTransform(steps), distributions.StandardNormal([dim]))

    def forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        return model._transform(x)  # what Flow.log_prob calls

    return BackendFlow("nflows", flow, forward)


def _normflows(dim: int, layers: int, hidden: int, kind: str) -> BackendFlow:
    import normflows as nf

    steps: list[Any] = []
    for _ in range(layers):
        if kind == "maf":
            made = nf.flows.MaskedAffineAutoregressive(
                dim, hidden, num_blocks=1, use_residual_blocks=False
            )
            zero_init(made.autoregressive_net.final_layer)
            steps.append(made)
        else:
            steps.append(nf.flows.AffineConstFlow((dim,)))
            # Split's chunk(2) conditions on the first ceil(D/2) features (odd D too)
            half = dim - dim // 2
            steps.append(nf.flows.AffineCouplingBlock(mlp(half, 2 * (dim - half), hidden)))
        steps.append(nf.flows.Permute(dim, mode="shuffle"))
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), steps)

    def forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        return model.inverse_and_log_det(x)

    return BackendFlow("normflows", model, forward)


def _zuko(dim: int, layers: int, hidden: int, kind: str) -> BackendFlow:
    import zuko
    from zuko.flows.autoregressive import MaskedAutoregressiveTransform
    from zuko.flows.coupling import GeneralCouplingTransform
    from zuko.flows.gaussianization import ElementWiseTransform

    steps: list[Any] = []
    for i in range(layers):
        if kind == "maf":
            order = torch.arange(dim) if i % 2 == 0 else torch.arange(dim).flip(0)
            made = MaskedAutoregressiveTransform(dim, order=order, hidden_features=(hidden, hidden))
            zero_init(made.hyper[-1])
            steps.append(made)
        else:
            affine = ElementWiseTransform(dim)
            zero_init(affine)  # shift 0, log-scale 0
            steps.append(affine)
            coupling = GeneralCouplingTransform(
                dim, mask=torch.arange(dim) % 2 == i % 2, hidden_features=(hidden, hidden)
            )
            zero_init(coupling.hyper[-1])
            steps.append(coupling)
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
    )
    flow = zuko.flows.Flow(steps, base)

    def forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        return model().transform.call_and_ladj(x)

    return BackendFlow("zuko", flow, forward)


_BUILDERS = {"freia": _freia, "nflows": _nflows, "normflows": _normflows, "zuko": _zuko}


def tabular_flow(
    backend: str, dim: int, layers: int = 8, hidden: int = 64, kind: str = "realnvp"
) -> BackendFlow:
    """A ``layers``-layer flow on ``dim`` features built with ``backend``'s own layers.

    Parameters are initialised from torch's global generator: seed it for reproducible flows.
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if dim < 2 or layers < 1 or hidden < 1:
        raise ValueError(f"need dim >= 2, layers >= 1, hidden >= 1; got {dim}, {layers}, {hidden}")
    return _BUILDERS[backend](dim, layers, hidden, kind)
