"""``--models zoo``: every captured layer family of every framework, at small, tabular and
image sizes, built as the frameworks' own examples build them.

A zoo model is named ``family/framework/size``. Families (:data:`FAMILIES`):

==================  ==========================================================================
affine-coupling     FrEIA ``AllInOneBlock`` (its quick start), nflows ``AffineCouplingTransform``
                    and ``RandomPermutation``, normflows ``AffineCouplingBlock`` and ``Permute``,
                    zuko ``GeneralCouplingTransform`` (alternating masks)
maf                 nflows ``MaskedAffineAutoregressiveTransform``, normflows
                    ``MaskedAffineAutoregressive`` (each with a permutation), zuko ``MAF``
rqs-coupling        nflows ``PiecewiseRationalQuadraticCouplingTransform``, normflows
                    ``CoupledRationalQuadraticSpline``, zuko ``GeneralCouplingTransform`` with
                    ``MonotonicRQSTransform`` (8 bins each)
rqs-autoregressive  nflows ``MaskedPiecewiseRationalQuadraticAutoregressiveTransform``,
                    normflows ``AutoregressiveRationalQuadraticSpline``, zuko ``NSF``
actnorm-lu          FrEIA ``ActNorm`` and ``PermuteRandom``, nflows ``ActNorm`` and
                    ``LULinear``, normflows ``ActNorm`` and ``LULinearPermute`` (zuko captures
                    no LU layer): factors shared by the batch only
glow                the default run's Glow-like image flows (3x32x32; FrEIA's IB-INN-style
                    ``AllInOneBlock`` stages, nflows' and normflows' ActNorm / 1x1 LU
                    convolution / affine coupling, zuko's couplings on the flat image)
==================  ==========================================================================

Sizes (:data:`SIZES`): ``small`` D = 4, ``tabular`` D = 64 (each ``layers`` layers, MLPs
``hidden x 2``); ``image`` only for ``glow``. ``--quick`` shrinks every model (D = 4, 2 layers,
hidden 8; the tiny image flows).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..common.backends import BackendFlow
from ..common.tabular import mlp, tabular_flow, zero_init
from .models import image
from .settings import Settings

FAMILIES = ("affine-coupling", "maf", "rqs-coupling", "rqs-autoregressive", "actnorm-lu", "glow")
SIZES = {"small": 4, "tabular": 64}
"""Data dimension of each tabular size."""
SIZE_SHAPE = {"small": (8, 64), "tabular": (8, 128)}
"""(layers, hidden) of each tabular size."""
BINS = 8
TAIL = 3.0


@dataclass(frozen=True)
class ZooModel:
    """One zoo entry: ``build(dim, layers, hidden)`` (or ``build(settings)`` for images)."""

    family: str
    backend: str
    size: str
    build: Callable[..., BackendFlow]

    @property
    def name(self) -> str:
        return f"{self.family}/{self.backend}/{self.size}"


def _nflows_flow(steps: list[Any], dim: int) -> BackendFlow:
    from nflows import distributions, flows, transforms

    flow = flows.Flow(transforms.CompositeTransform(steps), distributions.StandardNormal([dim]))
    return BackendFlow("nflows", flow, _nflows_forward)


def _nflows_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model._transform(x)  # what Flow.log_prob calls


def _normflows_flow(steps: list[Any], dim: int) -> BackendFlow:
    import normflows as nf

    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(dim, trainable=False), steps)
    return BackendFlow("normflows", model, _normflows_forward)


def _normflows_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model.inverse_and_log_det(x)


def _zuko_flow(flow: Any) -> BackendFlow:
    return BackendFlow("zuko", flow, lambda model, x: model().transform.call_and_ladj(x))


def _zuko_base(dim: int) -> Any:
    import zuko

    return zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(dim), torch.ones(dim), buffer=True
    )


# ------------------------------------------------------------------------ affine coupling


def _coupling_freia(dim: int, layers: int, hidden: int) -> BackendFlow:
    return tabular_flow("freia", dim, layers=layers, hidden=hidden)


def _coupling_nflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    from nflows import transforms
    from nflows.utils import create_alternating_binary_mask

    steps: list[Any] = []
    for i in range(layers):
        mask = create_alternating_binary_mask(dim, even=i % 2 == 0)
        steps.append(transforms.AffineCouplingTransform(mask, lambda i, o: mlp(i, o, hidden)))
        steps.append(transforms.RandomPermutation(dim))
    return _nflows_flow(steps, dim)


def _coupling_normflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    import normflows as nf

    steps: list[Any] = []
    for _ in range(layers):
        net = mlp(dim // 2, 2 * (dim - dim // 2), hidden)
        steps += [nf.flows.AffineCouplingBlock(net), nf.flows.Permute(dim, mode="shuffle")]
    return _normflows_flow(steps, dim)


def _coupling_zuko(dim: int, layers: int, hidden: int) -> BackendFlow:
    import zuko
    from zuko.flows.coupling import GeneralCouplingTransform

    steps = []
    for i in range(layers):
        coupling = GeneralCouplingTransform(
            dim, mask=torch.arange(dim) % 2 == i % 2, hidden_features=(hidden, hidden)
        )
        zero_init(coupling.hyper[-1])
        steps.append(coupling)
    return _zuko_flow(zuko.flows.Flow(steps, _zuko_base(dim)))


# ------------------------------------------------------------------------------------ MAF


def _maf(backend: str) -> Callable[[int, int, int], BackendFlow]:
    def build(dim: int, layers: int, hidden: int) -> BackendFlow:
        return tabular_flow(backend, dim, layers=layers, hidden=hidden, kind="maf")

    return build


def _maf_zuko(dim: int, layers: int, hidden: int) -> BackendFlow:
    import zuko

    return _zuko_flow(zuko.flows.MAF(dim, transforms=layers, hidden_features=(hidden, hidden)))


# ------------------------------------------------------------------- rational-quadratic


def _rqs_coupling_nflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    from nflows import transforms
    from nflows.utils import create_alternating_binary_mask

    steps: list[Any] = [
        transforms.PiecewiseRationalQuadraticCouplingTransform(
            create_alternating_binary_mask(dim, even=i % 2 == 0),
            lambda i, o: mlp(i, o, hidden),
            num_bins=BINS,
            tails="linear",
            tail_bound=TAIL,
        )
        for i in range(layers)
    ]
    return _nflows_flow(steps, dim)


def _rqs_coupling_normflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    import normflows as nf

    steps = [
        nf.flows.CoupledRationalQuadraticSpline(
            dim, 2, hidden, num_bins=BINS, tail_bound=TAIL, reverse_mask=i % 2 == 1
        )
        for i in range(layers)
    ]
    return _normflows_flow(steps, dim)


def _rqs_coupling_zuko(dim: int, layers: int, hidden: int) -> BackendFlow:
    import zuko
    from zuko.flows.coupling import GeneralCouplingTransform
    from zuko.transforms import MonotonicRQSTransform

    steps = [
        GeneralCouplingTransform(
            dim,
            mask=torch.arange(dim) % 2 == i % 2,
            univariate=MonotonicRQSTransform,
            shapes=[(BINS,), (BINS,), (BINS - 1,)],
            hidden_features=(hidden, hidden),
        )
        for i in range(layers)
    ]
    return _zuko_flow(zuko.flows.Flow(steps, _zuko_base(dim)))


def _rqs_ar_nflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    from nflows import transforms

    steps: list[Any] = []
    for _ in range(layers):
        steps.append(
            transforms.MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
                dim, hidden, num_bins=BINS, tails="linear", tail_bound=TAIL
            )
        )
        steps.append(transforms.RandomPermutation(dim))
    return _nflows_flow(steps, dim)


def _rqs_ar_normflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    import normflows as nf

    steps = [
        nf.flows.AutoregressiveRationalQuadraticSpline(
            dim, 2, hidden, num_bins=BINS, tail_bound=TAIL, permute_mask=True
        )
        for _ in range(layers)
    ]
    return _normflows_flow(steps, dim)


def _rqs_ar_zuko(dim: int, layers: int, hidden: int) -> BackendFlow:
    import zuko

    return _zuko_flow(
        zuko.flows.NSF(dim, transforms=layers, bins=BINS, hidden_features=(hidden, hidden))
    )


# --------------------------------------------------------------------------- ActNorm / LU


def _actnorm_freia(dim: int, layers: int, hidden: int) -> BackendFlow:
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    inn = Ff.SequenceINN(dim)
    for i in range(layers):
        inn.append(Fm.ActNorm)
        inn.append(Fm.PermuteRandom, seed=i)
    return BackendFlow("freia", inn, lambda model, x: model(x))


def _actnorm_lu_nflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    from nflows import transforms

    steps: list[Any] = []
    for _ in range(layers):
        norm = transforms.ActNorm(dim)
        norm.initialized.fill_(True)
        steps += [norm, transforms.LULinear(dim, identity_init=True)]
    return _nflows_flow(steps, dim)


def _actnorm_lu_normflows(dim: int, layers: int, hidden: int) -> BackendFlow:
    import normflows as nf

    steps: list[Any] = []
    for _ in range(layers):
        steps += [nf.flows.ActNorm((dim,)), nf.flows.LULinearPermute(dim)]
    return _normflows_flow(steps, dim)


def _glow(backend: str) -> Callable[[Settings], BackendFlow]:
    def build(settings: Settings) -> BackendFlow:
        return image(backend, settings)

    return build


TABULAR_BUILDERS: dict[str, dict[str, Callable[[int, int, int], BackendFlow]]] = {
    "affine-coupling": {
        "freia": _coupling_freia,
        "nflows": _coupling_nflows,
        "normflows": _coupling_normflows,
        "zuko": _coupling_zuko,
    },
    "maf": {"nflows": _maf("nflows"), "normflows": _maf("normflows"), "zuko": _maf_zuko},
    "rqs-coupling": {
        "nflows": _rqs_coupling_nflows,
        "normflows": _rqs_coupling_normflows,
        "zuko": _rqs_coupling_zuko,
    },
    "rqs-autoregressive": {
        "nflows": _rqs_ar_nflows,
        "normflows": _rqs_ar_normflows,
        "zuko": _rqs_ar_zuko,
    },
    "actnorm-lu": {
        "freia": _actnorm_freia,
        "nflows": _actnorm_lu_nflows,
        "normflows": _actnorm_lu_normflows,
    },
}


def zoo(backends: list[str] | None = None) -> list[ZooModel]:
    """Every zoo model (of ``backends``, default all): small sizes first, then tabular, then
    the image flows."""
    models = [
        ZooModel(family, backend, size, build)
        for size in SIZES
        for family, builders in TABULAR_BUILDERS.items()
        for backend, build in builders.items()
    ]
    models += [
        ZooModel("glow", b, "image", _glow(b)) for b in ("freia", "nflows", "normflows", "zuko")
    ]
    return [m for m in models if backends is None or m.backend in backends]


def select(models: list[ZooModel], patterns: list[str]) -> list[ZooModel]:
    """The models whose name contains any of ``patterns`` (all where there are none)."""
    return [m for m in models if not patterns or any(p in m.name for p in patterns)]


def build(entry: ZooModel, settings: Settings) -> BackendFlow:
    """The flow of ``entry`` at its size (``--quick``: D = 4, 2 layers, hidden 8), moved away
    from the identity it starts at so that every factor's penalty is non-zero."""
    if entry.size == "image":
        flow = entry.build(settings)
    else:
        layers, hidden = SIZE_SHAPE[entry.size]
        dim = SIZES[entry.size]
        if settings.quick:
            dim, layers, hidden = 4, 2, 8
        flow = entry.build(dim, layers, hidden)
    with torch.no_grad():
        for p in flow.parameters():
            if p.requires_grad and p.dtype.is_floating_point:
                p.add_(0.05 * torch.randn_like(p))
    return flow


def batch(entry: ZooModel, flow: BackendFlow, settings: Settings) -> Tensor:
    """A fixed synthetic batch of ``settings.batch`` samples (``image_batch`` images)."""
    g = torch.Generator().manual_seed(settings.seed)
    if entry.size == "image":
        from .settings import IMAGE_SHAPE

        x = (torch.rand(settings.image_batch, *IMAGE_SHAPE, generator=g) - 0.5) * 4
        return x.flatten(1) if entry.backend == "zuko" else x
    dim = 4 if settings.quick else SIZES[entry.size]
    scales = torch.rand(dim, generator=g) * 2 + 0.5
    return torch.randn(settings.batch, dim, generator=g) * scales
