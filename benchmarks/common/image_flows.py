"""Image flows ``(B, 3, H, W) -> (B, 3HW)`` built with each framework's own layers.

Each builder returns a :class:`~benchmarks.common.backends.BackendFlow` whose forward is the call a
user of that framework makes (so klj-reg's capture sees it as in user code):

- ``freia``: the IB-INN architecture (Ardizzone et al. 2020) the paper used, scaled by
  ``size``: stages of ``AllInOneBlock`` conv couplings (soft orthogonal permutation, EXP
  global scale initialised to 0.75, clamp 0.7), a learned 2x2 downsampling coupling between
  stages, an orthonormal DCT to a flat vector and fully connected GLOW couplings. ``"paper"``
  is the full ~11M-parameter model: stages of [8, 24, 24] blocks, widths [16, 32, 64].
- ``nflows``: a RealNVP/Glow multi-scale flow: per level squeeze, then (ActNorm, 1x1 LU
  convolution, affine coupling with a ConvResidualNet) steps, then half the channels factored
  out (``MultiscaleCompositeTransform``).
- ``normflows``: a ``NormalizingFlow`` of ``Squeeze`` and ``GlowBlock`` (coupling, 1x1 LU
  convolution, ActNorm); data to latent through ``inverse_and_log_det``.
- ``zuko``: affine coupling (RealNVP) on the flattened image with random masks, since zuko has
  no convolutional layers.

Sizes (``tiny``, ``small``, ``medium``, ``paper``) keep the four backends at comparable
parameter counts (:func:`benchmarks.common.records.parameter_count`); ``paper`` exists for
FrEIA only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .backends import BackendFlow

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.247, 0.243, 0.261)
SIZES = ("tiny", "small", "medium", "paper")
Shape = tuple[int, int, int]

# Per size: FrEIA (blocks per stage, subnet widths, fc couplings, fc width), nflows/normflows
# (levels, steps per level, hidden channels), zuko (transforms, hidden width).
FREIA_SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(blocks=(1, 1, 1), widths=(4, 4, 8), n_fc=1, fc_width=8),
    "small": dict(blocks=(1, 2, 2), widths=(8, 16, 32), n_fc=1, fc_width=32),
    "medium": dict(blocks=(2, 4, 4), widths=(16, 32, 64), n_fc=1, fc_width=64),
    "paper": dict(blocks=(8, 24, 24), widths=(16, 32, 64), n_fc=1, fc_width=1024),
}
NFLOWS_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(levels=2, steps=1, hidden=8),
    "small": dict(levels=3, steps=3, hidden=48),
    "medium": dict(levels=3, steps=4, hidden=64),
}
NORMFLOWS_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(levels=2, steps=1, hidden=8),
    "small": dict(levels=2, steps=6, hidden=64),
    "medium": dict(levels=2, steps=8, hidden=112),
}
ZUKO_SIZES: dict[str, dict[str, int]] = {
    "tiny": dict(transforms=2, hidden=8),
    "small": dict(transforms=4, hidden=20),
    "medium": dict(transforms=6, hidden=32),
}


def build(
    backend: str, size: str = "small", shape: Shape = (3, 32, 32), seed: int = 0
) -> BackendFlow:
    """The image flow of ``backend`` at ``size``, initialised from ``seed``."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    builders: dict[str, Callable[[str, Shape], BackendFlow]] = {
        "freia": freia_flow,
        "nflows": nflows_flow,
        "normflows": normflows_flow,
        "zuko": zuko_flow,
    }
    if backend not in builders:
        raise ValueError(f"unknown backend {backend!r}")
    if size == "paper" and backend != "freia":
        raise ValueError("size 'paper' (the IB-INN architecture) exists for freia only")
    torch.manual_seed(seed)
    np.random.seed(seed)  # FrEIA draws its soft permutations from numpy
    return builders[backend](size, shape)


# --------------------------------------------------------------------------------- FrEIA


def _ibinn_init(module: nn.Module) -> None:
    """IB-INN initialisation: Kaiming convs, unit batch norms, Kaiming x 0.1 linears."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear):
        nn.init.kaiming_normal_(module.weight)
        with torch.no_grad():
            module.weight.mul_(0.1)


def conv_subnet(
    width: int, dropout: float = 0.0, relu_first: bool = False, stride: int = 1
) -> Callable[[int, int], nn.Module]:
    """conv3-BN-ReLU-conv3(stride)-BN-ReLU-(Dropout2d)-conv1, optionally ReLU first."""

    def make(c_in: int, c_out: int) -> nn.Module:
        layers: list[nn.Module] = [nn.ReLU()] if relu_first else []
        layers += [
            nn.Conv2d(c_in, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-4),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width, eps=1e-4),
            nn.ReLU(),
        ]
        if dropout:
            layers.append(nn.Dropout2d(dropout))
        layers.append(nn.Conv2d(width, c_out, 1))
        net = nn.Sequential(*layers)
        net.apply(_ibinn_init)
        return net

    return make


def fc_subnet(width: int, dropout: float = 0.5) -> Callable[[int, int], nn.Module]:
    """Linear-ReLU-Dropout-Linear."""

    def make(c_in: int, c_out: int) -> nn.Module:
        net = nn.Sequential(
            nn.Linear(c_in, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, c_out)
        )
        net.apply(_ibinn_init)
        return net

    return make


def _freia_classes() -> tuple[type, type]:
    """FrEIA layers of our own (defined lazily so that FrEIA stays optional)."""
    global _FREIA_CLASSES
    if _FREIA_CLASSES is not None:
        return _FREIA_CLASSES
    import FrEIA.modules as Fm

    import klj_reg
    from klj_reg.records import Factor
    from klj_reg.registry import register_neutral

    class DownsampleCoupling(Fm.InvertibleModule):
        r"""Learned 2x2 downsampling: two affine couplings across a squeeze, (C, H, W) ->
        (4C, H/2, W/2).

        With :math:`x = (x_1, x_2)` split on channels and :math:`S` the 2x2 squeeze:
        :math:`y_2 = S x_2 \odot e^{s_h(x_1)} + t_h(x_1)` (``strided`` subnet on the full
        resolution :math:`x_1`), then :math:`y_1 = S x_1 \odot e^{s_l(y_2)} + t_l(y_2)`
        (``low_res`` subnet), with :math:`s = c \tanh(0.2 a)`. Two triangular factors (up to
        the squeeze permutation), captured through ``klj_reg.register_adapter``.
        """

        def __init__(
            self,
            dims_in: list[tuple[int, ...]],
            dims_c: list[tuple[int, ...]] | None = None,
            strided: Callable[[int, int], nn.Module] | None = None,
            low_res: Callable[[int, int], nn.Module] | None = None,
            clamp: float = 0.7,
        ) -> None:
            super().__init__(dims_in, dims_c)
            if strided is None or low_res is None:
                raise ValueError("DownsampleCoupling needs the strided and low_res subnets")
            channels = dims_in[0][0]
            self.c1, self.c2 = channels // 2, channels - channels // 2
            self.clamp = clamp
            self.strided = strided(self.c1, 8 * self.c2)
            self.low_res = low_res(4 * self.c2, 8 * self.c1)
            self.last: tuple[Tensor, Tensor] | None = None

        def log_scale(self, a: Tensor) -> Tensor:
            half = a.shape[1] // 2
            return self.clamp * torch.tanh(0.2 * a[:, :half])

        def forward(
            self, x: Any, c: Any = None, rev: bool = False, jac: bool = True
        ) -> tuple[tuple[Tensor], Tensor]:
            h = x[0]
            if not rev:
                x1, x2 = h[:, : self.c1], h[:, self.c1 :]
                a_hi = self.strided(x1)
                s2 = self.log_scale(a_hi)
                y2 = squeeze(x2) * s2.exp() + a_hi[:, s2.shape[1] :]
                a_lo = self.low_res(y2)
                s1 = self.log_scale(a_lo)
                y1 = squeeze(x1) * s1.exp() + a_lo[:, s1.shape[1] :]
                self.last = (a_hi, a_lo)
                log_det = s2.flatten(1).sum(1) + s1.flatten(1).sum(1)
                return (torch.cat([y1, y2], 1),), log_det
            self.last = None
            y1, y2 = h[:, : 4 * self.c1], h[:, 4 * self.c1 :]
            a_lo = self.low_res(y2)
            s1 = self.log_scale(a_lo)
            x1s = (y1 - a_lo[:, s1.shape[1] :]) * (-s1).exp()
            x1 = unsqueeze(x1s)
            a_hi = self.strided(x1)
            s2 = self.log_scale(a_hi)
            x2 = unsqueeze((y2 - a_hi[:, s2.shape[1] :]) * (-s2).exp())
            log_det = -(s2.flatten(1).sum(1) + s1.flatten(1).sum(1))
            return (torch.cat([x1, x2], 1),), log_det

        def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
            c, h, w = input_dims[0]
            return [(4 * c, h // 2, w // 2)]

    class DCTPool(Fm.InvertibleModule):
        """Orthonormal 2-D DCT-II per channel, flattened with frequencies outermost:
        (C, N, N) -> (N*N*C,) ordered (u, v, c), so low frequencies come first. Orthogonal:
        log-det 0 and no KLJ term."""

        def __init__(
            self, dims_in: list[tuple[int, ...]], dims_c: list[tuple[int, ...]] | None = None
        ) -> None:
            super().__init__(dims_in, dims_c)
            c, n, m = dims_in[0]
            if n != m:
                raise ValueError(f"DCTPool needs square inputs, got {n}x{m}")
            self.register_buffer("basis", dct_matrix(n))

        def forward(
            self, x: Any, c: Any = None, rev: bool = False, jac: bool = True
        ) -> tuple[tuple[Tensor], Tensor]:
            h, w = x[0], self.basis.to(x[0].dtype)
            zero = h.new_zeros(h.shape[0])
            if not rev:
                out = w @ h @ w.t()  # (B, C, N, N)
                return (out.permute(0, 2, 3, 1).reshape(h.shape[0], -1),), zero
            c_, n, _ = self.dims_in[0]
            grid = h.reshape(h.shape[0], n, n, c_).permute(0, 3, 1, 2)
            return (w.t() @ grid @ w,), zero

        def output_dims(self, input_dims: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
            return [(math.prod(input_dims[0]),)]

    def downsample_scales(layer: Any, inputs: Any, output: Any) -> list[Factor] | None:
        if layer.last is None:
            return None
        return [Factor(source=a, log_abs=layer.log_scale, raw=_first_half) for a in layer.last]

    klj_reg.register_adapter(
        DownsampleCoupling,
        downsample_scales,
        log_det=lambda layer, inputs, output: output[1],
    )
    register_neutral(DCTPool)
    _FREIA_CLASSES = (DownsampleCoupling, DCTPool)
    return _FREIA_CLASSES


_FREIA_CLASSES: tuple[type, type] | None = None


def _first_half(a: Tensor) -> Tensor:
    return a[:, : a.shape[1] // 2]


def squeeze(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2), each channel's 2x2 patches as 4 channels."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4)
    return x.reshape(b, 4 * c, h // 2, w // 2)


def unsqueeze(x: Tensor) -> Tensor:
    """Inverse of :func:`squeeze`."""
    b, c4, h, w = x.shape
    x = x.reshape(b, c4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(b, c4 // 4, 2 * h, 2 * w)


def dct_matrix(n: int) -> Tensor:
    """The orthonormal DCT-II matrix ``C`` (``C @ C.T = I``), rows = frequencies."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None, :]
    basis = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    basis[0] /= math.sqrt(2.0)
    return basis.float()


def freia_ibinn(
    shape: Shape = (3, 32, 32),
    blocks: tuple[int, ...] = (8, 24, 24),
    widths: tuple[int, ...] = (16, 32, 64),
    dropouts: tuple[float, ...] = (0.0, 0.0, 0.25),
    n_fc: int = 1,
    fc_width: int = 1024,
    fc_dropout: float = 0.5,
    clamp: float = 0.7,
    act_norm: float = 0.75,
) -> nn.Module:
    """The IB-INN flow as a FrEIA ``SequenceINN`` (defaults: the paper's architecture)."""
    import FrEIA.framework as Ff
    import FrEIA.modules as Fm

    downsample, dct = _freia_classes()
    inn = Ff.SequenceINN(*shape)
    block_args = dict(
        affine_clamping=clamp,
        global_affine_type="EXP",
        global_affine_init=act_norm,
        permute_soft=True,
    )
    for stage, (n_blocks, width, drop) in enumerate(zip(blocks, widths, dropouts, strict=True)):
        for k in range(n_blocks):
            first = stage == 0 and k == 0
            subnet = conv_subnet(width, drop, relu_first=not first)
            inn.append(Fm.AllInOneBlock, subnet_constructor=subnet, **block_args)
        if stage < len(blocks) - 1:
            inn.append(
                downsample,
                strided=conv_subnet(2 * width, stride=2),
                low_res=conv_subnet(2 * width, drop),
                clamp=clamp,
            )
    inn.append(dct)
    for k in range(n_fc):
        inn.append(Fm.PermuteRandom, seed=k)
        inn.append(
            Fm.GLOWCouplingBlock, subnet_constructor=fc_subnet(fc_width, fc_dropout), clamp=2.0
        )
    return inn


def _freia_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return model(x)


def freia_flow(size: str, shape: Shape) -> BackendFlow:
    return BackendFlow("freia", freia_ibinn(shape, **FREIA_SIZES[size]), _freia_forward)


# -------------------------------------------------------------------------------- nflows


def nflows_flow(size: str, shape: Shape) -> BackendFlow:
    from nflows import transforms as T
    from nflows.nn.nets import ConvResidualNet

    cfg = NFLOWS_SIZES[size]
    hidden = cfg["hidden"]

    def net(c_in: int, c_out: int) -> nn.Module:
        return ConvResidualNet(c_in, c_out, hidden_channels=hidden, num_blocks=1)

    multiscale = T.MultiscaleCompositeTransform(cfg["levels"], split_dim=1)
    c, h, w = shape
    for _ in range(cfg["levels"]):
        c, h, w = 4 * c, h // 2, w // 2
        steps: list[nn.Module] = [T.SqueezeTransform()]
        for k in range(cfg["steps"]):
            mask = (torch.arange(c) + k) % 2
            steps += [T.ActNorm(c), T.OneByOneConvolution(c), T.AffineCouplingTransform(mask, net)]
        next_shape = multiscale.add_transform(T.CompositeTransform(steps), (c, h, w))
        if next_shape is not None:
            c, h, w = next_shape
    return BackendFlow("nflows", multiscale, _nflows_forward)


def _nflows_forward(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    return model(x)


# ----------------------------------------------------------------------------- normflows


def normflows_flow(size: str, shape: Shape) -> BackendFlow:
    import normflows as nf

    cfg = NORMFLOWS_SIZES[size]
    c = shape[0]
    data_to_latent: list[nn.Module] = []
    for _ in range(cfg["levels"]):
        c *= 4
        data_to_latent.append(nf.flows.Squeeze())
        data_to_latent += [nf.flows.GlowBlock(c, cfg["hidden"]) for _ in range(cfg["steps"])]
    h, w = shape[1] >> cfg["levels"], shape[2] >> cfg["levels"]
    base = nf.distributions.DiagGaussian((c, h, w), trainable=False)
    # normflows lists flows latent -> data; training runs them backwards via ``inverse``.
    model = nf.NormalizingFlow(base, data_to_latent[::-1])
    return BackendFlow("normflows", model, _normflows_forward)


def _normflows_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model.inverse_and_log_det(x)


# ---------------------------------------------------------------------------------- zuko


def zuko_flow(size: str, shape: Shape) -> BackendFlow:
    import zuko

    cfg = ZUKO_SIZES[size]
    features = math.prod(shape)
    transforms = []
    for i in range(cfg["transforms"]):
        mask = torch.randperm(features) % 2 == i % 2
        transforms.append(
            zuko.flows.GeneralCouplingTransform(
                features, mask=mask, hidden_features=(cfg["hidden"], cfg["hidden"])
            )
        )
    base = zuko.flows.UnconditionalDistribution(
        zuko.distributions.DiagNormal,
        torch.zeros(features),
        torch.ones(features),
        buffer=True,
    )
    return BackendFlow("zuko", zuko.flows.Flow(transforms, base), _zuko_forward)


def _zuko_forward(model: Any, x: Tensor) -> tuple[Tensor, Tensor]:
    return model().transform.call_and_ladj(x.flatten(1))
