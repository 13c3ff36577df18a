"""The out-of-distribution sets of the paper's Table 1, made as ../shared/data/README.md says.

- ``rot_rgb``: the CIFAR-10 test images with each pixel's RGB vector rotated about the grey
  point (0.5, 0.5, 0.5) by the fixed rotation ``Rx(a) Ry(b)``, ``a = 0.2 pi 0.35^0.7``,
  ``b = pi 0.35^1.2``, then clamped to [0, 1].
- ``quickdraw``: QuickDraw airplane, car, cat, dog, the first 2000 of each (the data copy has
  only 1497 cars: 7497 in all), in [0, 1], shuffled, each multiplied by a random colour
  ``0.3 + 0.7 U(0, 1)`` per channel and inverted (coloured strokes on white), edge-padded by 2
  pixels to 32x32. The shuffle (as in IB-INN's code) makes a ``limit``-ed set hold all four.
- ``tinyimagenet``: the first 8000 Tiny-ImageNet validation images (``val_0`` .. ``val_7999``),
  resized from 64x64 to 32x32 with PIL's bicubic filter.
- ``noisy``: the CIFAR-10 test images plus ``0.015 N(0, 1)`` per pixel, clamped to [0, 1].

Every set is float32 in [0, 1], (N, 3, 32, 32), and a deterministic function of ``seed``; a
``limit``-ed set is the first ``limit`` images of the full one.
"""

from __future__ import annotations

import io
import math
import pathlib
import re
import tarfile
import warnings
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from .data import Images, cached, default_cache_dir, default_data_root, fingerprint

OOD_NAMES = ("rot_rgb", "quickdraw", "tinyimagenet", "noisy")  # Table 1 column order

QUICKDRAW_FILE = "quickdraw-cifar7.npz"
QUICKDRAW_CATEGORIES = ("airplane", "car", "cat", "dog")
QUICKDRAW_PER_CATEGORY = 2000
TINYIMAGENET_FILE = "tiny-imagenet-val.tar.gz"
TINYIMAGENET_SIZE = 8000
NOISE_STD = 0.015
ROT_ALPHA = 0.35

_FILES = {"quickdraw": QUICKDRAW_FILE, "tinyimagenet": TINYIMAGENET_FILE}
_STREAM = {name: i for i, name in enumerate(OOD_NAMES)}  # a random stream per set


def rgb_rotation(alpha: float = ROT_ALPHA) -> torch.Tensor:
    """``Rx(a) @ Ry(b)`` with ``a = 0.2 pi alpha^0.7``, ``b = pi alpha^1.2`` (float64, 3x3)."""
    a = 0.2 * math.pi * alpha**0.7
    b = math.pi * alpha**1.2
    rx = torch.tensor(
        [[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]],
        dtype=torch.float64,
    )
    ry = torch.tensor(
        [[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]],
        dtype=torch.float64,
    )
    return rx @ ry


def rotate_rgb(x: torch.Tensor, alpha: float = ROT_ALPHA, clamp: bool = True) -> torch.Tensor:
    """Each pixel's RGB vector v of ``x`` (B, 3, H, W) in [0, 1] -> ``R (v - 0.5) + 0.5``."""
    r = rgb_rotation(alpha).to(x.dtype)
    out = torch.einsum("ij,bjhw->bihw", r, x - 0.5) + 0.5
    return out.clamp(0, 1) if clamp else out


def _arrays(
    decode: Callable[[pathlib.Path], np.ndarray], path: pathlib.Path
) -> dict[str, np.ndarray]:
    return {"x": decode(path)}


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, _STREAM[name]])


def noisy(x: torch.Tensor, seed: int = 0, std: float = NOISE_STD) -> torch.Tensor:
    """``x + std N(0, 1)`` per pixel, clamped to [0, 1]; ``x`` float (N, 3, H, W)."""
    noise = _rng(seed, "noisy").standard_normal(tuple(x.shape), dtype=np.float32)
    return (x + std * torch.from_numpy(noise).to(x.dtype)).clamp(0, 1)


def quickdraw_bitmaps(path: pathlib.Path) -> np.ndarray:
    """The first 2000 of each category, in category order: uint8 (N, 28, 28), strokes 255."""
    with np.load(path) as f:
        missing = [c for c in QUICKDRAW_CATEGORIES if c not in f.files]
        if missing:
            raise ValueError(f"{path} lacks the QuickDraw categories {missing}")
        parts = [f[c][:QUICKDRAW_PER_CATEGORY] for c in QUICKDRAW_CATEGORIES]
    return np.concatenate(parts).reshape(-1, 28, 28)


def quickdraw(bitmaps: np.ndarray, seed: int = 0) -> torch.Tensor:
    """Shuffle, colour ``0.3 + 0.7 U`` per channel, invert, edge-pad 2: float32 (N, 3, 32, 32)."""
    rng = _rng(seed, "quickdraw")
    order = rng.permutation(len(bitmaps))
    x = bitmaps[order].astype(np.float32)[:, None] / 255.0
    colour = 0.3 + 0.7 * rng.random((len(x), 3, 1, 1), dtype=np.float32)
    x = 1.0 - x * colour
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)), mode="edge")
    return torch.from_numpy(np.ascontiguousarray(x))


_VAL_NAME = re.compile(r"(?:^|/)images/val_(\d+)\.JPEG$")


def tinyimagenet_images(path: pathlib.Path, count: int = TINYIMAGENET_SIZE) -> np.ndarray:
    """``val_0`` .. ``val_<count-1>`` resized to 32x32 (PIL bicubic): uint8 (count, 3, 32, 32)."""
    from PIL import Image

    out = np.zeros((count, 32, 32, 3), dtype=np.uint8)
    found = np.zeros(count, dtype=bool)
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            m = _VAL_NAME.search(member.name)
            if not member.isfile() or m is None or int(m.group(1)) >= count:
                continue
            i = int(m.group(1))
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            with Image.open(io.BytesIO(data)) as im:
                small = im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC)
            out[i] = np.asarray(small)
            found[i] = True
    if not found.all():
        raise ValueError(f"{path}: {int((~found).sum())} of val_0..val_{count - 1} missing")
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def make_ood_sets(
    test: Images,
    data_root: pathlib.Path | None = None,
    *,
    names: tuple[str, ...] | list[str] = OOD_NAMES,
    seed: int = 0,
    cache_dir: pathlib.Path | None = None,
    limit: int | None = None,
    cache: bool = True,
) -> dict[str, torch.Tensor]:
    """The OoD sets ``names`` (see the module docstring), float32 in [0, 1], (N, 3, 32, 32).

    Args:
        test: the in-distribution test images (uint8) that Rot-RGB and Noisy are made from.
        data_root: where the QuickDraw / Tiny-ImageNet files are; default
            :func:`benchmarks.cifar.data.default_data_root`. A set whose file is missing is left
            out with a warning.
        seed: seeds the random parts (QuickDraw shuffle and colours, Noisy's noise).
        cache_dir: where decoded QuickDraw / Tiny-ImageNet arrays are cached; default
            :func:`benchmarks.cifar.data.default_cache_dir`.
        limit: keep only the first ``limit`` images of each set (smoke runs). Without a cache
            entry, only those Tiny-ImageNet images are decoded (and nothing is cached).
        cache: False decodes the files every time.
    """
    unknown = [n for n in names if n not in OOD_NAMES]
    if unknown:
        raise ValueError(f"unknown OoD sets {unknown}; choose from {OOD_NAMES}")
    root = pathlib.Path(data_root) if data_root is not None else default_data_root()
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    store = cache_dir if cache else None
    n = len(test.x) if limit is None else min(limit, len(test.x))
    base = test.x[:n].float() / 255.0

    sets: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "rot_rgb":
            sets[name] = rotate_rgb(base)
            continue
        if name == "noisy":
            sets[name] = noisy(base, seed)
            continue
        path = root / _FILES[name] if root is not None else None
        if path is None or not path.is_file():
            where = path if path is not None else f"{_FILES[name]} (no data root: set $KLJ_DATA)"
            warnings.warn(f"OoD set {name!r} left out: {where} not found", stacklevel=2)
            continue
        if name == "quickdraw":
            key = f"quickdraw-{fingerprint([path])}"
            bitmaps = cached(store, key, partial(_arrays, quickdraw_bitmaps, path))["x"]
            sets[name] = quickdraw(bitmaps, seed)[:limit]
        else:
            key = f"tinyimagenet-{TINYIMAGENET_SIZE}-{fingerprint([path])}"
            entry = None if store is None else store / f"{key}.npz"
            if limit is not None and limit < TINYIMAGENET_SIZE and not (entry and entry.is_file()):
                images = tinyimagenet_images(path, limit)
            else:
                images = cached(store, key, partial(_arrays, tinyimagenet_images, path))["x"]
            sets[name] = torch.from_numpy(images[:limit]).float() / 255.0
    return sets
