"""IB-INN's CIFAR-10 training augmentation, batched in torch on the batch's device.

IB-INN (the authors' released code) used torchvision on PIL images, one image at a time:
``RandomHorizontalFlip, ColorJitter(0.1, 0.1, 0.05), Pad(8, "edge"), RandomRotation(12),
CenterCrop(36), RandomCrop(32), ToTensor`` and then ``+ U(0, 1) / 256``. :class:`Augment` draws
the same random parameters per image but transforms the whole batch at once: the flip and the
colour jitter by ``torch.where`` over the batch, and pad + rotation + both crops as one
``grid_sample`` (edge padding = the sampler's "border" mode).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

GREY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """U(0, 1) float32 on ``device``, drawn from ``generator`` (on its own device) if given."""
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, generator=generator, device=generator.device).to(device)


def _randint(
    high: int, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """Integers uniform in [0, high) on ``device``."""
    if generator is None:
        return torch.randint(0, high, shape, device=device)
    return torch.randint(0, high, shape, generator=generator, device=generator.device).to(device)


def grey(x: torch.Tensor) -> torch.Tensor:
    """Luma ``0.2989 R + 0.587 G + 0.114 B`` of (B, 3, H, W) -> (B, 1, H, W)."""
    w = torch.tensor(GREY_WEIGHTS, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend``: ``(f x + (1 - f) other)`` clamped to [0, 1]."""
    f = factor.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp(0, 1)


class Augment(nn.Module):
    """Random flip, colour jitter, edge pad, rotation, centre crop and random crop, per image.

    Args:
        flip: horizontal flip with probability 1/2.
        jitter: (brightness, contrast, saturation) strengths j; each factor is drawn from
            ``U[max(0, 1 - j), 1 + j]`` and applied as torchvision defines it (brightness:
            ``f x``; contrast: blend with the image's mean luma; saturation: blend with the
            pixel's luma; each clamped to [0, 1]), in a random order per image. No hue.
        pad: edge (replicate) padding on each side.
        degrees: rotation angle drawn from ``U[-degrees, degrees]`` about the padded image's
            centre; points outside the padded image are filled with 0 (as torchvision; never
            visible with the defaults: a 48-pixel square rotated by 12 degrees still covers the
            central 36).
        centre: side of the centre crop (torchvision's rounding of the offset).
        crop: side of the random crop taken from the centre crop.
        colour_jitter: False disables the jitter.
        interpolation: "nearest" (torchvision's RandomRotation default) or "bilinear".
    """

    def __init__(
        self,
        flip: bool = True,
        jitter: tuple[float, float, float] = (0.1, 0.1, 0.05),
        pad: int = 8,
        degrees: float = 12.0,
        centre: int = 36,
        crop: int = 32,
        colour_jitter: bool = True,
        interpolation: str = "nearest",
    ) -> None:
        super().__init__()
        if crop > centre:
            raise ValueError(f"crop ({crop}) must not exceed the centre crop ({centre})")
        if interpolation not in ("nearest", "bilinear"):
            raise ValueError(f"interpolation must be 'nearest' or 'bilinear', not {interpolation}")
        self.flip = flip
        self.jitter = tuple(float(j) for j in jitter)
        self.pad = pad
        self.degrees = float(degrees)
        self.centre = centre
        self.crop = crop
        self.colour_jitter = colour_jitter and any(j > 0 for j in self.jitter)
        self.interpolation = interpolation

    @classmethod
    def for_side(cls, side: int) -> Augment:
        """The same augmentation scaled to ``side``-pixel images: pad ``side / 4``, centre crop
        ``9 side / 8``, random crop ``side`` (the defaults at 32)."""
        return cls(pad=side // 4, centre=side * 9 // 8, crop=side)

    def extra_repr(self) -> str:
        return (
            f"flip={self.flip}, jitter={self.jitter if self.colour_jitter else None}, "
            f"pad={self.pad}, degrees={self.degrees}, centre={self.centre}, crop={self.crop}"
        )

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a float batch (B, C, H, W) in [0, 1] -> (B, C, crop, crop) in [0, 1]."""
        if not x.is_floating_point() or x.dim() != 4:
            raise TypeError(f"Augment expects a float (B, C, H, W) batch, got {x.dtype} {x.shape}")
        if self.flip:
            flipped = _uniform((x.shape[0],), generator, x.device) < 0.5
            x = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
        if self.colour_jitter:
            x = self._colour(x, generator)
        return self._geometry(x, generator)

    def _colour(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b = x.shape[0]
        j = torch.tensor(self.jitter, dtype=x.dtype, device=x.device)
        lo = (1 - j).clamp(min=0)
        factors = lo + (1 + j - lo) * _uniform((b, 3), generator, x.device).to(x.dtype)
        order = torch.argsort(_uniform((b, 3), generator, x.device), dim=1)
        return colour_jitter(x, factors, order)

    def _geometry(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b = x.shape[0]
        shift = _randint(self.centre - self.crop + 1, (b, 2), generator, x.device)
        angle = (2 * _uniform((b,), generator, x.device) - 1) * self.degrees
        return pad_rotate_crop(
            x, angle, shift, self.pad, self.centre, self.crop, self.interpolation, self.degrees == 0
        )


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter (no hue) with given factors, per image.

    Args:
        x: (B, 3, H, W) in [0, 1].
        factors: (B, 3) brightness, contrast and saturation factors.
        order: (B, 3) a permutation of (0, 1, 2) per image: the order the three are applied in.
    """
    for step in range(3):
        op = order[:, step].view(-1, 1, 1, 1)
        luma = grey(x)
        bright = _blend(x, torch.zeros_like(x), factors[:, 0])
        contrast = _blend(x, luma.mean((1, 2, 3), keepdim=True), factors[:, 1])
        saturate = _blend(x, luma, factors[:, 2])
        x = torch.where(op == 0, bright, torch.where(op == 1, contrast, saturate))
    return x


def pad_rotate_crop(
    x: torch.Tensor,
    angle: torch.Tensor,
    shift: torch.Tensor,
    pad: int,
    centre: int,
    crop: int,
    interpolation: str = "nearest",
    exact: bool = False,
) -> torch.Tensor:
    """Edge-pad, rotate, centre-crop, then crop at an offset, per image, in one sampling pass.

    Args:
        x: (B, C, H, W).
        angle: (B,) degrees, counter-clockwise (torchvision's convention), about the padded
            image's centre; points outside the padded image become 0.
        shift: (B, 2) integer (row, column) offsets of the final crop inside the centre crop,
            each in [0, centre - crop].
        exact: all angles are 0; gather pixels by index instead of sampling (bit-exact).
    Returns:
        (B, C, crop, crop).
    """
    b, _, h, w = x.shape
    hp, wp = h + 2 * pad, w + 2 * pad
    if not crop <= centre <= min(hp, wp):
        raise ValueError(f"need crop ({crop}) <= centre ({centre}) <= padded size {hp}x{wp}")
    # torchvision's CenterCrop offset, then the crop offset; in unpadded image coordinates
    top = int(round((hp - centre) / 2.0)) - pad
    left = int(round((wp - centre) / 2.0)) - pad
    grid = torch.arange(crop, device=x.device)
    rows = grid + top + shift[:, :1].to(x.device)  # (B, crop): output row -> source row
    cols = grid + left + shift[:, 1:].to(x.device)
    if exact:  # edge padding = clamped indices
        r = rows.clamp(0, h - 1)[:, :, None]
        c = cols.clamp(0, w - 1)[:, None, :]
        batch = torch.arange(b, device=x.device).view(-1, 1, 1)
        return x[batch, :, r, c].permute(0, 3, 1, 2).contiguous()
    # Inverse map of a counter-clockwise rotation (y axis down) about the padded centre,
    # which sits at the unpadded image's centre ((w - 1) / 2, (h - 1) / 2).
    theta = (angle.to(x.device, x.dtype) * (math.pi / 180)).view(-1, 1, 1)
    cos, sin = torch.cos(theta), torch.sin(theta)
    yo = (rows.to(x.dtype) - (h - 1) / 2)[:, :, None]
    xo = (cols.to(x.dtype) - (w - 1) / 2)[:, None, :]
    px = cos * xo - sin * yo + (w - 1) / 2
    py = sin * xo + cos * yo + (h - 1) / 2
    inside = (px >= -pad - 0.5) & (px < w + pad - 0.5) & (py >= -pad - 0.5) & (py < h + pad - 0.5)
    sample = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    out = F.grid_sample(x, sample, mode=interpolation, padding_mode="border", align_corners=False)
    return out * inside.unsqueeze(1).to(x.dtype)


def dequantise(
    x: torch.Tensor | np.ndarray, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Uniform dequantisation ``(k + U(0, 1)) / 256`` of pixel levels ``k`` in 0..255.

    ``x``: uint8 levels, or floats in [0, 1], which are first rounded to the 1/255 grid
    (``k = round(255 x)``; torchvision's PIL transforms in IB-INN likewise returned uint8, so
    jittered values were requantised). Each result lies in [k/256, (k+1)/256). IB-INN's code
    added ``U / 256`` to ``k / 255`` instead (values up to 1 + 1/256); the two differ by the
    factor 255/256. Returns float32 for uint8 input, else ``x``'s dtype.
    """
    x = torch.as_tensor(x)
    k = x.float() if x.dtype == torch.uint8 else torch.round(x * 255).clamp(0, 255)
    if generator is None:
        u = torch.rand(k.shape, device=k.device, dtype=k.dtype)
    else:
        u = torch.rand(k.shape, generator=generator, device=generator.device, dtype=k.dtype)
        u = u.to(k.device)
    return (k + u) / 256


def to_float(x_uint8: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 pixel levels -> float32 in [0, 1] (``/ 255``)."""
    x = torch.as_tensor(x_uint8)
    if x.dtype != torch.uint8:
        raise TypeError(f"to_float expects uint8 pixel levels, got {x.dtype}")
    return x.float() / 255
