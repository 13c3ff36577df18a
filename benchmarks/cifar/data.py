"""CIFAR-10 for the benchmarks: loading from offline copies, outliers (Table 2), subsets (Fig. 6).

Images are kept as uint8 ``(N, 3, 32, 32)`` tensors, the lossless form; the training loop turns
them into floats (:func:`benchmarks.cifar.augment.dequantise`). Sources, in the order ``"auto"``
tries them under the data root:

1. ``cifar-10-batches-py/`` -- torchvision's download of the original pickle batches
   (lossless; 50,000 train / 10,000 test), read with pickle + numpy.
2. ``cifar10-sprites/`` -- lossless PNG sprites (50,000 train; test = the first 1,000 test
   images only). Decoding is checked against the data README's check values.
3. ``cifar10-jpeg.tar.gz`` -- JPEG re-encoding (lossy; 50,000 / 10,000). The archive stores each
   class in its own folder, numbered in the original order within the class; with the sprites'
   label list beside it the original order is restored (train: all of it; test: images 0-999,
   followed by the other 9,000 interleaved by class), otherwise the order is class-interleaved.

Decoded arrays are cached as ``.npz`` under :func:`default_cache_dir`, keyed by source, split
and the source files' size and modification time.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pathlib
import pickle
import re
import tarfile
import tempfile
import warnings
from collections.abc import Callable, Iterable
from typing import NamedTuple

import numpy as np
import torch

CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

SOURCES = ("pickle", "sprites", "jpeg")
PICKLE_DIR = "cifar-10-batches-py"
SPRITES_DIR = "cifar10-sprites"
JPEG_FILE = "cifar10-jpeg.tar.gz"
SOURCE_NAMES = {
    "pickle": "cifar10-pickle (lossless)",
    "sprites": "cifar10-sprites (lossless)",
    "jpeg": "cifar10-jpeg (lossy)",
}

# Check values from the data README: the first training image's first red row and the
# per-channel means of the 50,000 training images.
SPRITE_CHECK_RED_ROW = (59, 43, 50, 68, 98, 119, 139, 145)
TRAIN_CHANNEL_MEANS = (0.4914, 0.4822, 0.4465)

_HOW_TO_GET = (
    "Put CIFAR-10 under a data root as one of: "
    f"'{PICKLE_DIR}/' (torchvision's download, https://www.cs.toronto.edu/~kriz/cifar.html), "
    f"'{SPRITES_DIR}/' or '{JPEG_FILE}' (see ../shared/data/README.md); point $KLJ_DATA or "
    "data_root at it, or pass download=True (needs torchvision)."
)


class Images(NamedTuple):
    """A set of images with labels and a record of where they came from."""

    x: torch.Tensor  # uint8, (N, 3, 32, 32), or smaller after :func:`downsample`
    y: torch.Tensor  # int64, (N,)
    source: str


def default_data_root() -> pathlib.Path | None:
    """``$KLJ_DATA`` if set, else ``../shared/data`` beside the repository root if it exists."""
    env = os.environ.get("KLJ_DATA")
    if env:
        return pathlib.Path(env).expanduser()
    beside = pathlib.Path(__file__).resolve().parents[2].parent / "shared" / "data"
    return beside if beside.is_dir() else None


def default_cache_dir() -> pathlib.Path:
    """``$KLJ_CACHE`` if set, else ``~/.cache/klj-reg``."""
    env = os.environ.get("KLJ_CACHE")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "klj-reg"


# ---------------------------------------------------------------------------------------------
# cache


def fingerprint(paths: Iterable[pathlib.Path]) -> str:
    """Short hash of the files' resolved paths, sizes and modification times."""
    h = hashlib.sha1()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:12]


def cached(
    cache_dir: pathlib.Path | None,
    key: str,
    build: Callable[[], dict[str, np.ndarray]],
) -> dict[str, np.ndarray]:
    """Load the arrays stored under ``key`` in ``cache_dir``, or build and store them.

    ``cache_dir=None`` disables the cache. The file is written atomically (temporary file, then
    rename), so concurrent processes never read a half-written cache; an unwritable cache
    directory only warns.
    """
    if cache_dir is None:
        return build()
    path = pathlib.Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as f:
                return {k: f[k] for k in f.files}
        except (OSError, ValueError) as e:  # truncated or corrupt: rebuild
            warnings.warn(f"ignoring unreadable cache {path}: {e}", stacklevel=3)
    arrays = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"could not write cache {path}: {e}", stacklevel=3)
    return arrays


# ---------------------------------------------------------------------------------------------
# decoders: each returns (x uint8 (N, 3, 32, 32), y int64 (N,))


def _pickle_files(root: pathlib.Path, split: str) -> list[pathlib.Path]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return [root / PICKLE_DIR / n for n in names]


def _source_files(root: pathlib.Path, name: str, split: str) -> list[pathlib.Path]:
    if name == "pickle":
        return _pickle_files(root, split)
    if name == "sprites":
        return _sprite_files(root, split)
    return [root / JPEG_FILE]


def decode_pickle(files: list[pathlib.Path]) -> tuple[np.ndarray, np.ndarray]:
    """The original CIFAR-10 python batches: ``data`` (N, 3072) uint8 in CHW order."""
    xs, ys = [], []
    for path in files:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(batch[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _sprite_files(root: pathlib.Path, split: str) -> list[pathlib.Path]:
    batches = range(50) if split == "train" else [50]
    folder = root / SPRITES_DIR
    return [folder / f"cifar10_batch_{b}.png" for b in batches] + [folder / "cifar10_labels.json"]


def decode_sprite(path: pathlib.Path) -> np.ndarray:
    """One sprite sheet: 1000 rows of 1024 RGB pixels, each row a 32x32 image (row-major)."""
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"))
    if rgb.shape != (1000, 1024, 3):
        raise ValueError(f"{path}: expected a 1024x1000 RGB sprite sheet, got {rgb.shape}")
    return np.ascontiguousarray(rgb.reshape(1000, 32, 32, 3).transpose(0, 3, 1, 2))


def sprite_labels(path: pathlib.Path) -> np.ndarray:
    """The 51,000 labels of the sprites (train 0..49,999, then test images 0..999)."""
    with open(path) as f:
        labels = np.asarray(json.load(f)["labels"], dtype=np.int64)
    if labels.shape != (51000,) or labels.min() < 0 or labels.max() >= len(CLASSES):
        raise ValueError(f"{path}: expected 51,000 labels in 0..9, got shape {labels.shape}")
    return labels


def decode_sprites(files: list[pathlib.Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    *sheets, labels_file = files
    x = np.concatenate([decode_sprite(p) for p in sheets])
    labels = sprite_labels(labels_file)
    y = labels[:50000] if split == "train" else labels[50000:]
    if split == "train":
        check_train(x, "cifar10-sprites")
    return x, y


def check_train(x: np.ndarray, what: str) -> None:
    """Raise if lossless training images do not match the README's check values."""
    row = tuple(int(v) for v in x[0, 0, 0, :8])
    means = x.mean(axis=(0, 2, 3), dtype=np.float64) / 255.0
    if row != SPRITE_CHECK_RED_ROW or not np.allclose(means, TRAIN_CHANNEL_MEANS, atol=2e-4):
        raise ValueError(
            f"{what}: decoded training images fail the check values (first red row {row}, "
            f"expected {SPRITE_CHECK_RED_ROW}; channel means {np.round(means, 4).tolist()}, "
            f"expected {list(TRAIN_CHANNEL_MEANS)}); the files are damaged or laid out differently"
        )


_JPEG_NAME = re.compile(r"(?:^|/)cifar10/(train|test)/([a-z]+)/(\d+)\.jpg$")


def jpeg_order(cls: np.ndarray, idx: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Permutation that puts JPEG members (class, within-class index) in the original order.

    ``labels``: the original labels of the first ``len(labels)`` images of the split, if
    known. Those positions are restored exactly (the k-th image of class c in the original
    order is the JPEG archive's c/k); the remaining images follow, interleaved by class
    (ordered by within-class index, then class).
    """
    key = idx.astype(np.int64) * len(CLASSES) + cls  # the class-interleaved order
    rest = np.argsort(key, kind="stable")
    if labels is None:
        return rest
    lookup = {(int(c), int(k)): i for i, (c, k) in enumerate(zip(cls, idx, strict=True))}
    seen = np.zeros(len(CLASSES), dtype=np.int64)
    head = np.empty(len(labels), dtype=np.int64)
    for pos, c in enumerate(labels.tolist()):
        head[pos] = lookup[(c, int(seen[c]))]
        seen[c] += 1
    used = np.zeros(len(cls), dtype=bool)
    used[head] = True
    return np.concatenate([head, rest[~used[rest]]])


def decode_jpeg(
    archive: pathlib.Path, split: str, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """The JPEG archive's images of one split, in original order where ``labels`` allow."""
    from PIL import Image

    images, cls, idx = [], [], []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            m = _JPEG_NAME.search(member.name)
            if not member.isfile() or m is None or m.group(1) != split:
                continue
            if m.group(2) not in CLASSES:
                raise ValueError(f"{archive}: unknown class folder in {member.name}")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            with Image.open(io.BytesIO(data)) as im:
                images.append(np.asarray(im.convert("RGB")))
            cls.append(CLASSES.index(m.group(2)))
            idx.append(int(m.group(3)))
    expected = 50000 if split == "train" else 10000
    if len(images) != expected:
        raise ValueError(f"{archive}: found {len(images)} {split} images, expected {expected}")
    c, k = np.asarray(cls, dtype=np.int64), np.asarray(idx, dtype=np.int64)
    order = jpeg_order(c, k, labels)
    x = np.stack(images)[order].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x), c[order]


# ---------------------------------------------------------------------------------------------
# public API


def _download(root: pathlib.Path) -> None:
    try:
        import torchvision  # optional: imported only when asked to download
    except ImportError as e:
        raise RuntimeError(
            "download=True needs torchvision, which is not importable here. Download "
            "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz yourself and extract it "
            f"under {root} (giving {root / PICKLE_DIR}), or use the offline copies in "
            "../shared/data."
        ) from e
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        torchvision.datasets.CIFAR10(str(root), train=train, download=True)


def download_root(
    data_root: str | pathlib.Path | None = None, cache_dir: str | pathlib.Path | None = None
) -> pathlib.Path:
    """Where ``--download`` puts CIFAR-10: ``data_root`` if given, else ``cache_dir/data``."""
    if data_root is not None:
        return pathlib.Path(data_root)
    return (pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()) / "data"


def download_cifar10(root: pathlib.Path) -> None:
    """Fetch the original pickle batches into ``root`` with torchvision unless already there."""
    if not all(f.is_file() for split in ("train", "test") for f in _pickle_files(root, split)):
        _download(root)


def load_cifar10(
    split: str,
    data_root: pathlib.Path | None = None,
    *,
    cache_dir: pathlib.Path | None = None,
    download: bool = False,
    source: str = "auto",
    cache: bool = True,
) -> Images:
    """CIFAR-10 ``split`` ("train" or "test") as uint8 images and int64 labels.

    Args:
        data_root: folder holding one of the sources (module docstring); default
            :func:`default_data_root`.
        cache_dir: where decoded arrays are cached; default :func:`default_cache_dir`.
        download: use the original pickle batches (lossless, full 10,000-image test set),
            fetching them with torchvision into ``data_root`` if given, else
            ``cache_dir/data``, when they are not there already.
        source: "auto" (first available of pickle, sprites, jpeg), or one of those names.
        cache: False reads the source files every time.

    Raises:
        FileNotFoundError: no data root, or none of the requested sources under it.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    if source != "auto" and source not in SOURCES:
        raise ValueError(f"source must be 'auto' or one of {SOURCES}, not {source!r}")
    cache_dir = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    root = pathlib.Path(data_root) if data_root is not None else default_data_root()
    if download and source in ("auto", "pickle"):
        if root is None or not all(p.is_file() for p in _pickle_files(root, split)):
            # into the given root, else the cache (the default root may be a read-only copy)
            root = download_root(data_root, cache_dir)
            download_cifar10(root)
        source = "pickle"
    if root is None:
        raise FileNotFoundError(
            "no CIFAR-10 data root: $KLJ_DATA is not set and ../shared/data does not exist "
            f"beside the repository. {_HOW_TO_GET}"
        )

    candidates = SOURCES if source == "auto" else (source,)
    labels_file = root / SPRITES_DIR / "cifar10_labels.json"
    for name in candidates:
        files = _source_files(root, name, split)
        if all(p.is_file() for p in files):
            break
    else:
        looked = {
            "pickle": f"{root / PICKLE_DIR}/data_batch_1..5, test_batch",
            "sprites": f"{root / SPRITES_DIR}/cifar10_batch_<0..50>.png, cifar10_labels.json",
            "jpeg": str(root / JPEG_FILE),
        }
        raise FileNotFoundError(
            f"CIFAR-10 {split} not found; looked for "
            + "; ".join(looked[n] for n in candidates)
            + f". {_HOW_TO_GET}"
        )

    known_order = name == "jpeg" and labels_file.is_file()
    key_files = files + [labels_file] if known_order else files
    key = f"cifar10-{name}-{split}-{fingerprint(key_files)}"

    def build() -> dict[str, np.ndarray]:
        if name == "pickle":
            x, y = decode_pickle(files)
            if split == "train":
                check_train(x, str(root / PICKLE_DIR))
        elif name == "sprites":
            x, y = decode_sprites(files, split)
        else:
            labels = None
            if known_order:
                all_labels = sprite_labels(labels_file)
                labels = all_labels[:50000] if split == "train" else all_labels[50000:]
            x, y = decode_jpeg(files[0], split, labels)
        return {"x": x, "y": y}

    arrays = cached(cache_dir if cache else None, key, build)
    text = SOURCE_NAMES[name]
    if name == "sprites" and split == "test":
        text = "cifar10-sprites (lossless, test images 0-999)"
    if name == "jpeg":
        text += ", original order" if known_order else ", class-interleaved order"
    return Images(torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]), text)


def corrupt(
    x: torch.Tensor, fraction: float, sigma: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outliers as in the paper's Table 2: Gaussian noise on a random ``fraction`` of images.

    Exactly ``round(fraction * N)`` images, chosen at random, get ``x + sigma * N(0, 1)`` per
    pixel. Units: pixel values in [0, 1]. The paper states only "Gaussian additive noise
    sigma = 1"; in these units sigma = 1 spans the whole pixel range and drives most pixels
    to 0 or 1 (gross outliers). In the CIFAR-normalised units the flow sees (divided by the
    per-channel std, about 0.25) the same noise has a std of about 4. The result is clamped to
    [0, 1] and requantised to uint8.

    Args:
        x: uint8 images, or floats in [0, 1].
    Returns:
        (uint8 images, bool mask of the corrupted rows).
    """
    n = x.shape[0]
    k = round(fraction * n)
    if not 0 <= k <= n:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(n, generator=g)[:k]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    x = x.cpu()
    out = x.clone() if x.dtype == torch.uint8 else (x * 255).round().clamp(0, 255).to(torch.uint8)
    base = out[rows].double() / 255
    noisy = (base + sigma * torch.randn(base.shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    out[rows] = (noisy * 255).round().to(torch.uint8)
    return out, mask


def balanced_rows(y: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Sorted rows of a class-balanced random choice: ``round(fraction * n_c)`` of each class."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for c in torch.unique(y).tolist():
        idx = torch.nonzero(y == c).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[: round(fraction * len(idx))]])
    return torch.sort(torch.cat(keep)).values


def subset(images: Images, fraction: float, seed: int = 0) -> Images:
    """Class-balanced random subset: ``round(fraction * n_c)`` images of each class c.

    The chosen images keep their original order.
    """
    rows = balanced_rows(images.y, fraction, seed)
    source = f"{images.source}, class-balanced subset {fraction:g} (seed {seed})"
    return Images(images.x[rows], images.y[rows], source)


def downsample(x: torch.Tensor, side: int) -> torch.Tensor:
    """Box-filter (area) downsampling of ``(N, C, H, W)`` images to ``side x side``.

    Each output pixel is the mean of a ``H / side`` square of input pixels; uint8 input is
    rounded back to uint8 (the training pipeline's lossless form), float input stays float.
    """
    factor = x.shape[-1] // side
    if side <= 0 or x.shape[-1] != factor * side or x.shape[-2] != x.shape[-1]:
        raise ValueError(f"cannot box-downsample {tuple(x.shape[-2:])} images to {side}x{side}")
    if factor == 1:
        return x
    pooled = torch.nn.functional.avg_pool2d(x.float(), factor)
    if x.dtype == torch.uint8:
        return pooled.round().clamp(0, 255).to(torch.uint8)
    return pooled.to(x.dtype)


def downsample_images(images: Images, side: int) -> Images:
    """:func:`downsample` of a labelled set, its source saying so."""
    if images.x.shape[-1] == side:
        return images
    return Images(
        downsample(images.x, side), images.y, f"{images.source}, box-downsampled to {side}x{side}"
    )


def split(images: Images, fraction: float, seed: int = 0) -> tuple[Images, Images]:
    """``(rest, held_out)``: a class-balanced ``fraction`` held out (a validation split) and
    the rest for training, each in the original order."""
    held = torch.zeros(len(images.y), dtype=torch.bool)
    held[balanced_rows(images.y, fraction, seed)] = True
    tag = f"{fraction:g} validation split (seed {seed})"
    rest = Images(images.x[~held], images.y[~held], f"{images.source}, minus a {tag}")
    return rest, Images(images.x[held], images.y[held], f"{images.source}, {tag}")
