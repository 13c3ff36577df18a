"""benchmarks.cifar.data, benchmarks.cifar.oodsets and benchmarks.cifar.augment.

Cases that need the offline data (../shared/data, or $KLJ_DATA) skip when it is absent.
"""

from __future__ import annotations

import json
import pathlib
import pickle
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.cifar import data as bdata
from benchmarks.cifar import oodsets
from benchmarks.cifar.augment import Augment, colour_jitter, dequantise, pad_rotate_crop, to_float
from benchmarks.cifar.data import CLASSES, Images, corrupt, default_data_root, load_cifar10, subset
from benchmarks.cifar.oodsets import OOD_NAMES, make_ood_sets, rgb_rotation, rotate_rgb

ROOT = default_data_root()


def need(*names: str) -> pathlib.Path:
    """The data root, or skip the test when one of ``names`` is not under it."""
    if ROOT is None:
        pytest.skip("no data root ($KLJ_DATA or ../shared/data)")
    for name in names:
        if not (ROOT / name).exists():
            pytest.skip(f"{ROOT / name} not available")
    return ROOT


@pytest.fixture(scope="module")
def sprites_test() -> Images:
    need("cifar10-sprites")
    return load_cifar10("test", source="sprites", cache=False)


@pytest.fixture(scope="module")
def ood_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return tmp_path_factory.mktemp("ood-cache")


@pytest.fixture(scope="module")
def ood_full(sprites_test: Images, ood_cache: pathlib.Path) -> dict:
    need("quickdraw-cifar7.npz", "tiny-imagenet-val.tar.gz")
    return make_ood_sets(sprites_test, ROOT, cache_dir=ood_cache)


# ---------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.data
def test_sprite_decoding_matches_check_values() -> None:
    root = need("cifar10-sprites")
    x = bdata.decode_sprite(root / "cifar10-sprites" / "cifar10_batch_0.png")
    assert x.shape == (1000, 3, 32, 32) and x.dtype == np.uint8
    assert tuple(x[0, 0, 0, :8]) == (59, 43, 50, 68, 98, 119, 139, 145)


@pytest.mark.slow
@pytest.mark.data
def test_sprites_train_full() -> None:
    need("cifar10-sprites")
    train = load_cifar10("train", source="sprites", cache=False)  # runs check_train
    assert train.x.shape == (50000, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.y.shape == (50000,) and train.y.dtype == torch.int64
    assert torch.bincount(train.y).tolist() == [5000] * len(CLASSES)
    means = train.x.double().mean((0, 2, 3)) / 255
    np.testing.assert_allclose(means.numpy(), [0.4914, 0.4822, 0.4465], atol=1e-4)
    assert train.source == "cifar10-sprites (lossless)"


@pytest.mark.data
def test_sprites_test_split(sprites_test: Images) -> None:
    assert sprites_test.x.shape == (1000, 3, 32, 32) and sprites_test.y.shape == (1000,)
    assert int(sprites_test.y.min()) == 0 and int(sprites_test.y.max()) == 9
    assert "lossless" in sprites_test.source
    labels = json.loads(
        (need("cifar10-sprites") / "cifar10-sprites/cifar10_labels.json").read_text()
    )
    assert sprites_test.y.tolist() == labels["labels"][50000:]


@pytest.mark.slow
@pytest.mark.data
def test_jpeg_fallback_same_layout_and_order(sprites_test: Images) -> None:
    need("cifar10-jpeg.tar.gz")
    test = load_cifar10("test", source="jpeg", cache=False)
    assert test.x.shape == (10000, 3, 32, 32) and test.x.dtype == torch.uint8
    assert test.y.shape == (10000,) and test.y.dtype == torch.int64
    assert torch.bincount(test.y).tolist() == [1000] * len(CLASSES)
    assert "lossy" in test.source and "original order" in test.source
    # the restored order: the first 1000 are the sprites' test images, up to JPEG loss
    assert torch.equal(test.y[:1000], sprites_test.y)
    err = (test.x[:1000].float() - sprites_test.x.float()).abs().mean(dim=(1, 2, 3))
    assert err.max() < 20 and err.mean() < 8  # random pairs differ by ~100 levels


def test_jpeg_order_restores_original_order() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=300)
    within = np.array([(labels[:i] == c).sum() for i, c in enumerate(labels)])  # k-th of class
    shuffle = rng.permutation(300)  # archive order is arbitrary
    cls, idx = labels[shuffle], within[shuffle]
    order = bdata.jpeg_order(cls, idx, labels[:120])
    assert sorted(order.tolist()) == list(range(300))
    np.testing.assert_array_equal(cls[order][:120], labels[:120])
    np.testing.assert_array_equal(idx[order][:120], within[:120])
    # without labels: interleaved by class
    order = bdata.jpeg_order(cls, idx, None)
    np.testing.assert_array_equal(np.lexsort((cls[order], idx[order])), np.arange(300))


@pytest.mark.data
def test_cache_round_trip(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    need("cifar10-sprites")
    first = load_cifar10("test", source="sprites", cache_dir=tmp_path)
    files = list(tmp_path.glob("cifar10-sprites-test-*.npz"))
    assert len(files) == 1

    def fail(*args: object) -> None:
        raise AssertionError("decoded again instead of reading the cache")

    monkeypatch.setattr(bdata, "decode_sprites", fail)
    second = load_cifar10("test", source="sprites", cache_dir=tmp_path)
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert first.source == second.source


def _write_pickle_batch(path: pathlib.Path, x: np.ndarray, y: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    batch = {b"data": x.reshape(len(x), -1), b"labels": y.tolist()}
    path.write_bytes(pickle.dumps(batch))


@pytest.mark.data
def test_pickle_source_is_preferred_and_checked(
    tmp_path: pathlib.Path, sprites_test: Images
) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    x, y = sprites_test.x.numpy(), sprites_test.y.numpy()
    _write_pickle_batch(folder / "test_batch", x, y)
    got = load_cifar10("test", tmp_path, cache=False)
    assert got.source == "cifar10-pickle (lossless)"
    assert torch.equal(got.x, sprites_test.x) and torch.equal(got.y, sprites_test.y)
    # training batches that fail the README's check values are rejected
    for i in range(1, 6):
        _write_pickle_batch(folder / f"data_batch_{i}", x[:10], y[:10])
    with pytest.raises(ValueError, match="check values"):
        load_cifar10("train", tmp_path, cache=False)


def test_missing_data_raises(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="cifar10-sprites") as info:
        load_cifar10("train", tmp_path / "empty", cache_dir=tmp_path)
    assert "cifar-10-batches-py" in str(info.value) and "cifar10-jpeg.tar.gz" in str(info.value)
    monkeypatch.setattr(bdata, "default_data_root", lambda: None)
    with pytest.raises(FileNotFoundError, match="KLJ_DATA"):
        load_cifar10("test", cache_dir=tmp_path)
    with pytest.raises(ValueError):
        load_cifar10("valid", tmp_path)


def test_download_without_torchvision(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(RuntimeError, match="torchvision"):
        load_cifar10("test", tmp_path, cache_dir=tmp_path, download=True)


def test_download_option_fetches_once_into_the_cache(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks.cifar import ood

    calls: list[pathlib.Path] = []
    rng = np.random.default_rng(0)

    def fake_download(root: pathlib.Path) -> None:  # what torchvision leaves behind
        calls.append(root)
        x = rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8)
        y = np.arange(20) % 10
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            _write_pickle_batch(root / "cifar-10-batches-py" / name, x, y)

    monkeypatch.setattr(bdata, "_download", fake_download)
    argv = ["--preset", "smoke", "--backend", "freia", "--download", "--cache-dir", str(tmp_path)]
    for _ in range(2):
        s = ood.settings(ood.parser("ood", "").parse_args(argv), "ood")
        assert s.args.data_root == str(tmp_path / "data")
    assert calls == [tmp_path / "data"]  # the second call finds the files
    test = load_cifar10("test", tmp_path / "data", cache=False)
    assert test.source == "cifar10-pickle (lossless)" and test.x.shape == (20, 3, 32, 32)


def test_default_roots(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("KLJ_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("KLJ_CACHE", str(tmp_path / "c"))
    assert bdata.default_data_root() == tmp_path / "d"
    assert bdata.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("KLJ_CACHE")
    assert bdata.default_cache_dir() == pathlib.Path.home() / ".cache" / "klj-reg"


# ---------------------------------------------------------------------------------------------
# outliers and subsets


def _images(n: int = 200, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize(("n", "fraction"), [(200, 0.1), (7, 0.5), (50, 0.0), (30, 1.0)])
def test_corrupt_changes_exactly_the_masked_rows(n: int, fraction: float) -> None:
    x = _images(n)
    out, mask = corrupt(x, fraction, sigma=1.0, seed=3)
    assert out.dtype == torch.uint8 and out.shape == x.shape and mask.dtype == torch.bool
    changed = (out != x).flatten(1).any(1)
    assert int(mask.sum()) == round(fraction * n)
    assert torch.equal(changed, mask)
    assert torch.equal(out[~mask], x[~mask])


def test_corrupt_noise_units_and_determinism() -> None:
    x = torch.full((400, 3, 32, 32), 128, dtype=torch.uint8)  # mid-grey: little clamping
    out, mask = corrupt(x, 0.25, sigma=0.05, seed=1)
    noise = (out[mask].double() - 128) / 255
    assert abs(noise.std().item() - 0.05) < 0.002 and abs(noise.mean().item()) < 0.002
    again, mask2 = corrupt(x, 0.25, sigma=0.05, seed=1)
    assert torch.equal(out, again) and torch.equal(mask, mask2)
    other, mask3 = corrupt(x, 0.25, sigma=0.05, seed=2)
    assert not torch.equal(mask, mask3)
    # float input in [0, 1] gives the same result as its uint8 levels
    same, _ = corrupt(x.float() / 255, 0.25, sigma=0.05, seed=1)
    assert torch.equal(same, out)


def test_subset_is_class_balanced_and_deterministic() -> None:
    y = torch.cat([torch.full((10 + 7 * c,), c) for c in range(10)])
    y = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    x = torch.zeros(len(y), 3, 32, 32, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = torch.arange(len(y)) % 256, torch.arange(len(y)) // 256
    images = Images(x, y, "toy")
    sub = subset(images, 0.3, seed=4)
    counts = torch.bincount(sub.y, minlength=10).tolist()
    assert counts == [round(0.3 * (10 + 7 * c)) for c in range(10)]
    rows = sub.x[:, 0, 0, 0].long() + 256 * sub.x[:, 0, 0, 1].long()  # each carries its row
    assert torch.equal(y[rows], sub.y)
    assert torch.all(rows[1:] > rows[:-1])  # original order, no repeats
    again = subset(images, 0.3, seed=4)
    assert torch.equal(again.x, sub.x) and torch.equal(again.y, sub.y)
    assert not torch.equal(subset(images, 0.3, seed=5).x, sub.x)
    assert "subset 0.3" in sub.source
    assert len(subset(images, 1.0).y) == len(y) and len(subset(images, 0.0).y) == 0


# ---------------------------------------------------------------------------------------------
# OoD sets


@pytest.mark.slow
@pytest.mark.data
def test_ood_sets_shapes_and_ranges(ood_full: dict) -> None:
    assert list(ood_full) == list(OOD_NAMES)
    sizes = {"rot_rgb": 1000, "noisy": 1000, "tinyimagenet": 8000, "quickdraw": 7497}
    for name, x in ood_full.items():
        assert x.shape == (sizes[name], 3, 32, 32), name
        assert x.dtype == torch.float32
        assert float(x.min()) >= 0 and float(x.max()) <= 1


@pytest.mark.data
def test_ood_sets_deterministic_limit_is_prefix(
    ood_full: dict, sprites_test: Images, ood_cache: pathlib.Path
) -> None:
    small = make_ood_sets(sprites_test, ROOT, seed=0, cache_dir=ood_cache, limit=40)
    again = make_ood_sets(sprites_test, ROOT, seed=0, cache=False, limit=40)  # decoded anew
    other = make_ood_sets(sprites_test, ROOT, seed=1, cache_dir=ood_cache, limit=40)
    for name in OOD_NAMES:
        assert small[name].shape == (40, 3, 32, 32)
        assert torch.equal(small[name], again[name])
        assert torch.equal(small[name], ood_full[name][:40])
    for name in ("quickdraw", "noisy"):  # random: differ between seeds
        assert not torch.equal(small[name], other[name])
    for name in ("rot_rgb", "tinyimagenet"):  # not random
        assert torch.equal(small[name], other[name])


@pytest.mark.slow
@pytest.mark.data
def test_rot_rgb_is_a_rotation_about_grey(sprites_test: Images, ood_full: dict) -> None:
    a, b = 0.2 * np.pi * 0.35**0.7, np.pi * 0.35**1.2
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    r = rgb_rotation().numpy()
    np.testing.assert_allclose(r, rx @ ry, atol=1e-12)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)
    x = sprites_test.x[:50].double() / 255
    free = rotate_rgb(x, clamp=False)
    torch.testing.assert_close((free - 0.5).norm(dim=1), (x - 0.5).norm(dim=1))
    # the grey point is fixed; the set is the clamped rotation of the test images
    grey = torch.full((1, 3, 1, 1), 0.5, dtype=torch.float64)
    torch.testing.assert_close(rotate_rgb(grey, clamp=False), grey)
    expected = np.einsum("ij,bjhw->bihw", rx @ ry, x.numpy() - 0.5) + 0.5
    np.testing.assert_allclose(ood_full["rot_rgb"][:50].numpy(), expected.clip(0, 1), atol=1e-6)


@pytest.mark.slow
@pytest.mark.data
def test_noisy_adds_small_gaussian_noise(sprites_test: Images, ood_full: dict) -> None:
    x = sprites_test.x.float() / 255
    d = ood_full["noisy"] - x
    inside = (ood_full["noisy"] > 0) & (ood_full["noisy"] < 1)
    assert abs(float(d[inside].std()) - 0.015) < 0.0005
    assert abs(float(d[inside].mean())) < 0.0005


@pytest.mark.slow
@pytest.mark.data
def test_quickdraw_coloured_strokes_on_white(ood_full: dict) -> None:
    root = need("quickdraw-cifar7.npz")
    qd = ood_full["quickdraw"]
    with np.load(root / "quickdraw-cifar7.npz") as f:
        sources = np.concatenate([f[c][:2000] for c in ("airplane", "car", "cat", "dog")])
    assert len(qd) == len(sources)
    # 2-pixel edge padding: the outer two rows / columns repeat the inner ones
    assert torch.equal(qd[:, :, :2], qd[:, :, 2:3].expand_as(qd[:, :, :2]))
    assert torch.equal(qd[:, :, -2:], qd[:, :, -3:-2].expand_as(qd[:, :, -2:]))
    assert torch.equal(qd[..., :2], qd[..., 2:3].expand_as(qd[..., :2]))
    assert torch.equal(qd[..., -2:], qd[..., -3:-2].expand_as(qd[..., -2:]))
    assert float((qd == 1).float().mean()) > 0.6  # mostly white background
    # each image is 1 - colour * bitmap / 255 with colour in [0.3, 1] per channel, where the
    # bitmap is one of the source drawings
    known = {s.tobytes() for s in sources}
    colours = []
    for img in qd[:: len(qd) // 25].double().numpy():
        inner = 1 - img[:, 2:-2, 2:-2]
        colour = inner.reshape(3, -1).max(1)
        assert np.all(colour >= 0.3 - 1e-6) and np.all(colour <= 1 + 1e-6)
        colours.append(colour)
        levels = inner / colour[:, None, None] * 255
        bitmap = np.rint(levels[0]).astype(np.uint8)
        np.testing.assert_allclose(levels, np.broadcast_to(bitmap, levels.shape), atol=1e-3)
        assert bitmap.tobytes() in known
    assert np.std(colours, axis=1).mean() > 0.05  # coloured, not grey


@pytest.mark.slow
@pytest.mark.data
def test_tinyimagenet_first_images_bicubic(ood_full: dict) -> None:
    from PIL import Image

    root = need("tiny-imagenet-val.tar.gz")
    x = ood_full["tinyimagenet"]
    assert x.shape == (8000, 3, 32, 32)
    with tarfile.open(root / "tiny-imagenet-val.tar.gz") as tar:
        member = tar.extractfile("tiny-imagenet-val/images/val_7999.JPEG")
        assert member is not None
        with Image.open(member) as im:
            assert im.size == (64, 64)
            small = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_allclose(x[7999].numpy(), small.transpose(2, 0, 1) / 255.0, atol=1e-6)


@pytest.mark.data
def test_tinyimagenet_cache_is_used(
    sprites_test: Images, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("tiny-imagenet-val.tar.gz")
    calls = []
    real = oodsets.tinyimagenet_images

    def counting(path: pathlib.Path, count: int = 8000) -> np.ndarray:
        calls.append(count)
        return real(path, 64) if count == 64 else np.zeros((count, 3, 32, 32), np.uint8)

    monkeypatch.setattr(oodsets, "tinyimagenet_images", counting)
    make_ood_sets(sprites_test, ROOT, names=("tinyimagenet",), cache_dir=tmp_path, limit=64)
    assert calls == [64] and not list(tmp_path.iterdir())  # partial decode, nothing cached
    make_ood_sets(sprites_test, ROOT, names=("tinyimagenet",), cache_dir=tmp_path)
    make_ood_sets(sprites_test, ROOT, names=("tinyimagenet",), cache_dir=tmp_path, limit=64)
    assert calls == [64, 8000]  # the full decode is cached and reused


@pytest.mark.data
def test_missing_ood_files_are_left_out(sprites_test: Images, tmp_path: pathlib.Path) -> None:
    with pytest.warns(UserWarning, match="left out") as record:
        sets = make_ood_sets(sprites_test, tmp_path, cache_dir=tmp_path, limit=8)
    assert list(sets) == ["rot_rgb", "noisy"]
    assert len(record) == 2
    with pytest.raises(ValueError, match="unknown"):
        make_ood_sets(sprites_test, tmp_path, names=("svhn",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert list(make_ood_sets(sprites_test, tmp_path, names=("noisy",), limit=4)) == ["noisy"]


# ---------------------------------------------------------------------------------------------
# augmentation


def _batch(n: int = 64, size: int = 32, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, size, size, generator=g, dtype=dtype)


def test_augment_shape_and_range() -> None:
    out = Augment()(_batch(), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert float(out.min()) >= 0 and float(out.max()) <= 1


def test_augment_identity_settings() -> None:
    x = _batch()
    aug = Augment(flip=False, jitter=(0, 0, 0), pad=0, degrees=0, centre=32, crop=32)
    assert torch.equal(aug(x), x)
    aug = Augment(flip=False, colour_jitter=False, pad=0, degrees=0, centre=32, crop=32)
    assert torch.equal(aug(x, torch.Generator().manual_seed(0)), x)


def test_augment_flip_only() -> None:
    x = _batch(4000, 8)
    aug = Augment(flip=True, colour_jitter=False, pad=0, degrees=0, centre=8, crop=8)
    out = aug(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert torch.all(same ^ flipped)  # each image exactly one of the two
    assert 0.46 < float(flipped.float().mean()) < 0.54
    again = aug(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    other = aug(x, torch.Generator().manual_seed(1))
    assert not torch.equal((other == x.flip(-1)).flatten(1).all(1), flipped)


def test_augment_zero_rotation_is_a_translated_crop() -> None:
    x = _batch(200)
    aug = Augment(flip=False, colour_jitter=False, pad=8, degrees=0, centre=36, crop=32)
    out = aug(x, torch.Generator().manual_seed(0))
    padded = F.pad(x, (8, 8, 8, 8), mode="replicate")
    offsets = set()
    for i in range(len(x)):
        hits = [
            (u, v)
            for u in range(5)
            for v in range(5)
            if torch.equal(out[i], padded[i, :, 6 + u : 38 + u, 6 + v : 38 + v])
        ]
        assert len(hits) == 1, i
        offsets.add(hits[0])
    assert len(offsets) > 15  # the crop offset is random per image
    # the sampling path at angle 0 gives the same crops as the exact integer path
    angle, shift = torch.zeros(200), torch.randint(0, 5, (200, 2))
    exact = pad_rotate_crop(x, angle, shift, 8, 36, 32, exact=True)
    assert torch.equal(pad_rotate_crop(x, angle, shift, 8, 36, 32), exact)
    torch.testing.assert_close(pad_rotate_crop(x, angle, shift, 8, 36, 32, "bilinear"), exact)


def test_rotation_matches_pil() -> None:
    from PIL import Image

    x = (_batch(6) * 255).round().to(torch.uint8)
    angles = torch.tensor([11.3, -7.9, 4.2, -0.6, 9.99, -12.0])
    shifts = torch.tensor([[0, 0], [4, 4], [1, 3], [2, 0], [3, 1], [4, 2]])
    ours = pad_rotate_crop(x.float() / 255, angles, shifts, 8, 36, 32)
    for i in range(6):
        padded = np.pad(x[i].permute(1, 2, 0).numpy(), ((8, 8), (8, 8), (0, 0)), mode="edge")
        rotated = np.asarray(
            Image.fromarray(padded).rotate(float(angles[i]), resample=Image.Resampling.NEAREST)
        )
        u, v = shifts[i].tolist()
        ref = rotated[6 + u : 38 + u, 6 + v : 38 + v]
        mine = (ours[i].permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        assert (mine == ref).all(-1).mean() > 0.99  # rare rounding ties may differ


@pytest.mark.parametrize("op", [0, 1, 2])
def test_colour_jitter_matches_pil(op: int) -> None:
    from PIL import Image, ImageEnhance

    enhance = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)[op]
    x = (_batch(8) * 255).round().to(torch.uint8)
    for factor in (0.9, 1.1):
        factors = torch.ones(8, 3, dtype=torch.float64)
        factors[:, op] = factor
        ours = colour_jitter(x.double() / 255, factors, torch.tensor([[0, 1, 2]] * 8)) * 255
        for i in range(8):
            im = Image.fromarray(x[i].permute(1, 2, 0).numpy())
            ref = np.asarray(enhance(im).enhance(factor)).transpose(2, 0, 1).astype(float)
            assert np.abs(ours[i].numpy() - ref).max() < 1.0  # PIL truncates to uint8


def test_augment_determinism_and_float64() -> None:
    x = _batch(32)
    aug = Augment()
    a = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, aug(x, torch.Generator().manual_seed(6)))
    d = aug(x.double(), torch.Generator().manual_seed(5))
    assert d.dtype == torch.float64 and d.shape == a.shape
    assert float((d.float() - a).abs().lt(1e-4).float().mean()) > 0.99
    with pytest.raises(TypeError):
        aug((x * 255).to(torch.uint8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_augment_on_gpu_matches_cpu() -> None:
    x = _batch(16)
    cpu = Augment()(x, torch.Generator().manual_seed(2))
    gpu = Augment()(x.cuda(), torch.Generator().manual_seed(2))  # CPU generator, GPU batch
    assert gpu.device.type == "cuda"
    assert float((gpu.cpu() - cpu).abs().lt(1e-4).float().mean()) > 0.99


def test_dequantise_and_to_float() -> None:
    k = torch.randint(0, 256, (200, 3, 8, 8), dtype=torch.uint8)
    out = dequantise(k, torch.Generator().manual_seed(0))
    lo = k.float() / 256
    assert out.dtype == torch.float32
    assert torch.all(out >= lo) and torch.all(out < lo + 1 / 256)
    assert abs(float((out - lo).mean()) * 256 - 0.5) < 0.01
    same = dequantise(to_float(k), torch.Generator().manual_seed(0))  # floats on the grid
    torch.testing.assert_close(same, out)
    assert torch.equal(to_float(k.numpy()), k.float() / 255)
    with pytest.raises(TypeError):
        to_float(k.float())


# ---------------------------------------------------------------------------------------------
# Downsampling and validation splits (the converged preset)


def test_downsample_is_the_block_mean() -> None:
    from benchmarks.cifar.data import downsample, downsample_images

    x = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    small = downsample(x, 16)
    assert small.shape == (5, 3, 16, 16) and small.dtype == torch.uint8
    blocks = x.double().reshape(5, 3, 16, 2, 16, 2).mean((3, 5))
    assert (small.double() - blocks).abs().max() <= 0.5  # rounded to the nearest level
    f = x.float() / 255
    assert torch.allclose(
        downsample(f, 8), x.double().reshape(5, 3, 8, 4, 8, 4).mean((3, 5)).float() / 255
    )
    assert downsample(x, 32) is x
    with pytest.raises(ValueError, match="cannot box-downsample"):
        downsample(x, 12)
    images = downsample_images(Images(x, torch.arange(5), "toy"), 16)
    assert images.x.shape[-1] == 16 and "downsampled to 16x16" in images.source


def test_validation_split_is_balanced_disjoint_and_complete() -> None:
    from benchmarks.cifar.data import split

    y = torch.arange(200) % 10
    x = torch.zeros(200, 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(200)  # each image carries its row
    rest, held = split(Images(x, y, "toy"), 0.1, seed=0)
    assert torch.bincount(held.y).tolist() == [2] * 10 and len(rest.y) == 180
    rows = torch.cat([rest.x[:, 0, 0, 0], held.x[:, 0, 0, 0]]).long()
    assert sorted(rows.tolist()) == list(range(200))  # disjoint and complete
    assert torch.equal(y[rows], torch.cat([rest.y, held.y]))
    assert "validation split" in held.source and "minus" in rest.source


def test_augment_for_side_scales_the_geometry() -> None:
    assert Augment.for_side(32).extra_repr() == Augment().extra_repr()
    aug = Augment.for_side(16)
    assert (aug.pad, aug.centre, aug.crop) == (4, 18, 16)
    out = aug(_batch(8, 16), torch.Generator().manual_seed(0))
    assert out.shape == (8, 3, 16, 16)
