"""The benchmark's default models: the tabular flow and the Glow-like image flows."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from ..common.backends import BackendFlow
from .settings import IMAGE_SHAPE, Settings


def tabular(backend: str, settings: Settings) -> BackendFlow:
    """The tabular flow of ``benchmarks.common.tabular`` (RealNVP-style, ``layers`` layers)."""
    from ..common.tabular import tabular_flow

    return tabular_flow(backend, settings.dim, layers=settings.layers, hidden=settings.hidden)


def _freia_image() -> BackendFlow:
    """IB-INN-style FrEIA flow (AllInOneBlock conv stages, learned downsampling, DCT, one
    fully connected GLOW coupling), ~2.5M parameters."""
    from ..common.image_flows import freia_ibinn

    inn = freia_ibinn(IMAGE_SHAPE, blocks=(2, 4, 4), widths=(32, 64, 128), fc_width=256)
    return BackendFlow("freia", inn, lambda model, x: model(x))


def _nflows_image() -> BackendFlow:
    """Glow with nflows' layers: 3 levels of squeeze, 4 x (ActNorm, 1x1 LU convolution,
    affine coupling with a ConvResidualNet), half the channels factored out per level."""
    from nflows import transforms as T
    from nflows.nn.nets import ConvResidualNet

    def net(c_in: int, c_out: int) -> nn.Module:
        return ConvResidualNet(c_in, c_out, hidden_channels=128, num_blocks=1)

    levels, steps = 3, 4
    multiscale = T.MultiscaleCompositeTransform(levels, split_dim=1)
    c, h, w = IMAGE_SHAPE
    for _ in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        layers: list[nn.Module] = [T.SqueezeTransform()]
        for k in range(steps):
            mask = (torch.arange(c) + k) % 2
            layers += [T.ActNorm(c), T.OneByOneConvolution(c), T.AffineCouplingTransform(mask, net)]
        next_shape = multiscale.add_transform(T.CompositeTransform(layers), (c, h, w))
        if next_shape is not None:
            c, h, w = next_shape
    return BackendFlow("nflows", multiscale, lambda model, x: model(x))


def _normflows_image() -> BackendFlow:
    """Glow with normflows' layers: 3 levels of ``Squeeze`` and 4 ``GlowBlock``s (affine
    coupling, 1x1 LU convolution, ActNorm) in a ``NormalizingFlow``, data to latent through
    ``inverse_and_log_det``."""
    import normflows as nf

    levels, steps, hidden = 3, 4, 128
    c = IMAGE_SHAPE[0]
    data_to_latent: list[nn.Module] = []
    for _ in range(levels):
        c *= 4
        data_to_latent.append(nf.flows.Squeeze())
        data_to_latent += [nf.flows.GlowBlock(c, hidden) for _ in range(steps)]
    size = IMAGE_SHAPE[1] >> levels
    base = nf.distributions.DiagGaussian((c, size, size), trainable=False)
    model = nf.NormalizingFlow(base, data_to_latent[::-1])  # normflows lists latent -> data
    return BackendFlow("normflows", model, _inverse_and_log_det)


def _inverse_and_log_det(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model.inverse_and_log_det(x)


def _zuko_image() -> BackendFlow:
    """zuko has no convolutional layers: 6 affine couplings (MLP 2 x 128) on the flattened
    image with random masks."""
    import zuko

    features = math.prod(IMAGE_SHAPE)
    transforms = [
        zuko.flows.GeneralCouplingTransform(
            features, mask=torch.randperm(features) % 2 == i % 2, hidden_features=(128, 128)
        )
        for i in range(6)
    ]
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal, torch.zeros(features), torch.ones(features), buffer=True
    )
    flow = zuko.flows.Flow(transforms, base)
    return BackendFlow("zuko", flow, lambda model, x: model().transform.call_and_ladj(x))


IMAGE_BUILDERS: dict[str, Callable[[], BackendFlow]] = {
    "freia": _freia_image,
    "nflows": _nflows_image,
    "normflows": _normflows_image,
    "zuko": _zuko_image,
}


def image(backend: str, settings: Settings) -> BackendFlow:
    """The Glow-like image flow of ``backend`` (``--quick``: ``image_flows``' tiny one)."""
    if settings.quick:
        from ..common.image_flows import build

        return build(backend, "tiny", IMAGE_SHAPE, seed=settings.seed)
    return IMAGE_BUILDERS[backend]()


def batch_of(model_kind: str, backend: str, settings: Settings, device: torch.device) -> Tensor:
    """A fixed synthetic batch: Gaussian features with unequal scales, or images in [-2, 2]
    (flattened for zuko, whose flows take flat vectors: the penalty's own pass needs the
    model's input)."""
    g = torch.Generator().manual_seed(settings.seed)
    if model_kind == "tabular":
        scales = torch.rand(settings.dim, generator=g) * 2 + 0.5
        x = torch.randn(settings.batch, settings.dim, generator=g) * scales
    else:
        x = (torch.rand(settings.image_batch, *IMAGE_SHAPE, generator=g) - 0.5) * 4
        if backend == "zuko":
            x = x.flatten(1)
    return x.to(device)
