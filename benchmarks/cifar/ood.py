"""``python -m benchmarks ood``: the paper's Table 1 (CIFAR-10 OoD detection), per backend.

For each backend, six rows: IB γ=1, IB γ=1 + KLJ, IB γ→∞, IB γ→∞ + KLJ, cNLL, cNLL + KLJ; each
trains a generative classifier (:mod:`benchmarks.cifar.classifier`) and scores the ID test images
and the four OoD sets by per-sample ``L_x``. Writes one JSON per run (finished runs with the
same config are skipped on rerun), a Markdown table beside the paper's numbers, and a PNG.

Runs go one after the other, as ``--parallel N`` processes (sharing one GPU), or, under
``torchrun --nproc_per_node N -m benchmarks ood ...``, each with DistributedDataParallel.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from typing import Any

import torch
from tqdm import tqdm

from ..common import backends
from ..common.records import parameter_count, run_metadata
from . import curves, presets, report

DEFAULT_ALPHA = 0.01
DEFAULT_OUT = pathlib.Path("benchmarks") / "runs"


@dataclass(frozen=True)
class Row:
    """One row of Table 1."""

    key: str
    label: str
    objective: str  # "ib" | "cnll"
    beta: float
    klj: bool
    alpha: float | None = None  # this row's KLJ weight (None: the command's --alpha)
    form: str | None = None  # this row's KLJ form (None: the command's --form)


def _beta_key(beta: float) -> str:
    return "inf" if math.isinf(beta) else f"{beta:g}"


def table_rows(beta: float = 1.0) -> list[Row]:
    """The six rows; ``beta`` replaces γ = 1 in the first IB pair."""
    rows = []
    for b in dict.fromkeys([beta, math.inf]):
        key, sym = f"ib{_beta_key(b)}", "∞" if math.isinf(b) else f"{b:g}"
        name = "IB γ→∞" if math.isinf(b) else f"IB γ={sym}"
        rows += [Row(key, name, "ib", b, False), Row(f"{key}_klj", f"{name} + KLJ", "ib", b, True)]
    rows += [
        Row("cnll", "cNLL", "cnll", 1.0, False),
        Row("cnll_klj", "cNLL + KLJ", "cnll", 1.0, True),
    ]
    return rows


EXTRA_ROWS = (
    Row("ibinf_klj_rc", "IB γ→∞ + KLJ (released-code form)", "ib", math.inf, True,
        form="released-code"),
)  # fmt: skip
"""Rows beside the six, chosen by key with ``--rows``: the released-code form of IB γ→∞ + KLJ
(baselines are shared, so it can live in the same folder as the six)."""

SELECTION_SPLIT = 0.1
"""Fraction of the training images held out (class-balanced) to choose alpha on."""


def run_config(
    command: str,
    preset: presets.Preset,
    backend: str,
    row: Row,
    seed: int,
    *,
    alpha: float,
    form: str,
    arch: str | None = None,
    variant: dict[str, Any] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """Everything that determines a run's result (compared to skip finished runs)."""
    return report.normalise_config(
        {
            "command": command,
            "preset": preset.name,
            "backend": backend,
            "size": preset.size_of(backend, arch),
            "row": row.key,
            "objective": row.objective,
            "beta": "inf" if math.isinf(row.beta) else row.beta,
            "alpha": (alpha if row.alpha is None else row.alpha) if row.klj else 0.0,
            # a baseline does not depend on the form: one baseline serves every form's table
            "form": (form if row.form is None else row.form) if row.klj else "jacobian",
            "seed": seed,
            "train": asdict(preset.train),
            "train_limit": preset.train_limit,
            "test_limit": preset.test_limit,
            "ood_limit": preset.ood_limit,
            "variant": variant or {},
            "world_size": world_size,
            # only where they differ from the defaults, so earlier runs' configs still match
            **({"resolution": preset.resolution} if preset.resolution != 32 else {}),
            **({"curves": True} if preset.curves else {}),
        }
    )


@dataclass
class Job:
    """A run to do: its config, label, output path and where it runs."""

    config: dict[str, Any]
    label: str
    path: pathlib.Path
    device: str
    data_root: str | None = None
    cache_dir: str | None = None
    threads: int | None = None
    progress: bool = True
    eval_batch: int = 500
    checkpoint: str | None = None  # resumable: fit's per-epoch checkpoint, deleted when done


# ------------------------------------------------------------------------------- one run


_MEMO: dict[tuple[Any, ...], Any] = {}


def _memo(key: tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """Data shared by the runs of one process (loaded once)."""
    if key not in _MEMO:
        _MEMO[key] = make()
    return _MEMO[key]


def limited_training_set(config: dict[str, Any], data_root: Any, cache_dir: Any) -> Any:
    """The preset's training images: its limit (class-balanced) at its resolution."""
    from .data import downsample_images, load_cifar10, subset

    side = config.get("resolution", 32)

    def limited() -> Any:
        train = load_cifar10("train", data_root, cache_dir=cache_dir)
        limit = config["train_limit"]
        if limit and limit < len(train.y):
            train = subset(train, limit / len(train.y), seed=0)
        return downsample_images(train, side)

    return _memo(("train", data_root, cache_dir, config["train_limit"], side), limited)


def load_training_set(config: dict[str, Any], data_root: Any, cache_dir: Any) -> tuple[Any, str]:
    """The training images of a run: :func:`limited_training_set` minus the variant's
    validation split (``validation``), then its fraction (``train_fraction``, Fig. 6) and
    outliers (``outlier_fraction``, Table 2)."""
    from .data import Images, corrupt, split, subset

    train = limited_training_set(config, data_root, cache_dir)
    variant = config.get("variant", {})
    if variant.get("validation"):
        train = split(train, float(variant["validation"]), seed=0)[0]
    if variant.get("train_fraction") is not None:
        train = subset(train, float(variant["train_fraction"]), seed=config["seed"])
    if variant.get("outlier_fraction"):
        x, mask = corrupt(
            train.x,
            float(variant["outlier_fraction"]),
            float(variant.get("sigma", 1.0)),
            seed=config["seed"],
        )
        text = f"{train.source}, {int(mask.sum())} outliers (sigma {variant.get('sigma', 1.0)})"
        train = Images(x, train.y, text)
    return train, train.source


def evaluate(clf: Any, test: Any, ood_sets: dict[str, torch.Tensor], batch: int) -> dict[str, Any]:
    """Accuracy, ID ``L_x`` and KLJ, and per OoD set: one-tailed and typicality AUROC / AUPR /
    FPR95 and the entropy ratio. Typicality reference: mean ``L_x`` of the ID test images."""
    import klj_reg

    from . import metrics
    from .augment import to_float
    from .train import score

    klj_error = None
    try:
        klj_reg.attach(clf.flow.model)
    except klj_reg.KLJError as e:
        klj_error = f"{type(e).__name__}: {e}"
    try:
        ids = score(clf, to_float(test.x), batch, klj=klj_error is None)
    except klj_reg.KLJError as e:
        klj_error = f"{type(e).__name__}: {e}"
        ids = score(clf, to_float(test.x), batch)
    id_lx = ids["l_x"]
    if not torch.isfinite(id_lx).all():
        raise FloatingPointError(f"{int((~torch.isfinite(id_lx)).sum())} ID test scores not finite")
    reference = float(id_lx.mean())
    h_id = metrics.entropy(ids["logits"])
    result: dict[str, Any] = {
        "accuracy": metrics.accuracy(ids["logits"], test.y),
        "id_l_x_mean": reference,
        "id_bits_per_dim": (reference + 0.5 * math.log(2 * math.pi) + math.log(256)) / math.log(2),
        "klj_test": float(ids["klj"].mean()) if "klj" in ids else None,
        "n_test": len(test.y),
        "typicality_reference": "mean L_x of the ID test images",
        "ood": {},
    }
    if klj_error:
        result["klj_error"] = klj_error
    for name, x in ood_sets.items():
        s = score(clf, x, batch)
        lx = s["l_x"]
        one = metrics.ood_metrics(id_lx, lx)
        typ = metrics.ood_metrics(
            metrics.typicality(id_lx, reference), metrics.typicality(lx, reference)
        )
        result["ood"][name] = {
            **one,
            **{f"{k}_typical": v for k, v in typ.items()},
            "entropy_ratio": metrics.entropy_ratio(metrics.entropy(s["logits"]), h_id),
            "l_x_mean": float(lx[torch.isfinite(lx)].mean()) if torch.isfinite(lx).any() else None,
            "n": len(lx),
        }
    return result


def run_one(job: Job) -> dict[str, Any]:
    """Train and evaluate one run; write and return its record (``status`` ok or failed)."""
    from .train import Objective, TrainConfig, fit, refresh_batch_norm, world

    cfg = job.config
    rank, size = world()
    if job.threads:
        torch.set_num_threads(job.threads)
    started = time.time()
    record: dict[str, Any] = {
        "config": cfg,
        "label": job.label,
        "seed": cfg["seed"],
        "status": "failed",
        **run_metadata(job.device, [cfg["backend"]]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
    }
    try:
        from ..common.image_flows import build
        from .classifier import GenerativeClassifier
        from .data import downsample_images, load_cifar10, split

        device = torch.device(job.device)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        root = pathlib.Path(job.data_root) if job.data_root else None
        cache = pathlib.Path(job.cache_dir) if job.cache_dir else None
        side = cfg.get("resolution", 32)
        train, source = load_training_set(cfg, root, cache)
        test = _memo(("test", root, cache), lambda: load_cifar10("test", root, cache_dir=cache))
        validation = cfg.get("variant", {}).get("validation")
        if validation:  # evaluated on the held-out part of the training set, no OoD sets
            full = limited_training_set(cfg, root, cache)
            test_eval = split(full, float(validation), seed=0)[1]
        else:
            n_test = cfg["test_limit"] or len(test.y)
            test_eval = downsample_images(
                type(test)(test.x[:n_test], test.y[:n_test], test.source), side
            )
        record["data_source"] = {"train": source, "test": test_eval.source}
        record["train_images"] = len(train.y)
        shape = tuple(train.x.shape[1:])
        flow = build(cfg["backend"], cfg["size"], shape=shape, seed=cfg["seed"])
        clf = GenerativeClassifier(flow, shape=shape).to(device)
        record["parameters"] = parameter_count(clf.flow)
        train_cfg = TrainConfig(**{k: _tuple(v) for k, v in cfg["train"].items()})
        beta = math.inf if cfg["beta"] == "inf" else float(cfg["beta"])
        objective = Objective(cfg["objective"], beta, cfg["alpha"], cfg["form"])
        x_train, y_train = train.x.to(device), train.y.to(device)
        curve = _test_curve(clf, test_eval, job.eval_batch) if cfg.get("curves") else None
        checkpoint = pathlib.Path(job.checkpoint) if job.checkpoint else None
        history = fit(
            clf, x_train, y_train, train_cfg, objective,
            seed=cfg["seed"], progress=job.progress, desc=job.label, after_epoch=curve,
            checkpoint=checkpoint,
        )  # fmt: skip
        record["history"] = history.epochs
        train_s = history.seconds
        if rank == 0:
            t0 = time.perf_counter()
            record["bn_layers_refreshed"] = refresh_batch_norm(
                clf, x_train, train_cfg.bn_refresh, job.eval_batch,
                augment=train_cfg.augment, seed=cfg["seed"],
            )  # fmt: skip
            at_side = bool(cfg.get("ood_at_resolution"))
            if validation:
                ood: dict[str, torch.Tensor] = {}
            else:
                ood = _memo(
                    ("ood", root, cache, cfg["ood_limit"], side, at_side),
                    lambda: ood_sets_at(test, side, root, cache, cfg["ood_limit"], at_side),
                )
            record["metrics"] = evaluate(clf, test_eval, ood, job.eval_batch)
            if cfg.get("curves"):
                record["metrics"]["train_accuracy"] = train_accuracy(clf, train, job.eval_batch)
            record["time"] = {
                "train_s": train_s,
                "eval_s": time.perf_counter() - t0,
                "total_s": time.time() - started,
            }
            record["status"] = "ok"
        else:
            record["status"] = "ok"  # trained its share; rank 0 evaluates and writes
    except Exception as e:  # a failed run is recorded, not hidden
        record["error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        record["time"] = {"total_s": time.time() - started}
    if rank == 0:
        report.write_json(job.path, record)
        if job.checkpoint and record["status"] == "ok":
            pathlib.Path(job.checkpoint).unlink(missing_ok=True)
    if size > 1:
        import torch.distributed as dist

        dist.barrier()
    return record


def ood_sets_at(
    test: Any,
    side: int,
    root: pathlib.Path | None,
    cache: pathlib.Path | None,
    limit: int | None,
    at_resolution: bool,
) -> dict[str, torch.Tensor]:
    """The OoD sets at ``side`` x ``side``. ``at_resolution``: Noisy's noise is added after
    the test images are box-downsampled (at the paper's sigma), not before, where the 2x2 box
    mean would halve it; the other sets are made at 32x32 and downsampled either way."""
    from .data import downsample
    from .oodsets import make_ood_sets, noisy

    sets = {
        k: downsample(v, side)
        for k, v in make_ood_sets(test, root, cache_dir=cache, limit=limit).items()
    }
    if at_resolution and side != 32 and "noisy" in sets:
        n = len(test.x) if limit is None else min(limit, len(test.x))
        sets["noisy"] = noisy(downsample(test.x[:n], side).float() / 255.0)  # = the ID images
    return sets


def train_accuracy(clf: Any, train: Any, batch: int, n: int = 2000) -> float:
    """Accuracy % on the first ``n`` training images (eval mode, not augmented): with the
    test accuracy, the train-test gap that says whether a regime overfits."""
    from . import metrics
    from .augment import to_float
    from .train import score

    s = score(clf, to_float(train.x[:n].cpu()), batch)
    return metrics.accuracy(s["logits"], train.y[:n].cpu())


def _test_curve(clf: Any, test: Any, batch: int) -> Callable[[], dict[str, float]]:
    """After each epoch: accuracy and mean ``L_x`` of the test images (eval mode, running
    batch-norm statistics, no refresh), for learning curves."""
    from . import metrics
    from .augment import to_float
    from .train import score

    x = to_float(test.x)

    def measure() -> dict[str, float]:
        s = score(clf, x, batch)
        return {
            "test_accuracy": metrics.accuracy(s["logits"], test.y),
            "test_l_x": float(s["l_x"].mean()),
        }

    return measure


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


# ---------------------------------------------------------------------------- orchestration


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_jobs(jobs: Sequence[Job], parallel: int = 1, desc: str = "runs") -> list[dict[str, Any]]:
    """Run ``jobs`` one by one or as ``parallel`` processes; returns their records."""
    records: list[dict[str, Any]] = []
    if not jobs:
        return records
    rank = int(os.environ.get("RANK", "0"))
    bar = tqdm(total=len(jobs), desc=desc, disable=rank != 0)
    if parallel <= 1 or len(jobs) == 1:
        for job in jobs:
            records.append(run_one(job))
            bar.update()
            _note(bar, records[-1])
    else:
        prewarm(jobs[0])  # decode and cache the data once, not in every process
        threads = max(1, (os.cpu_count() or 1) // parallel)
        ctx = get_context("spawn")
        with ProcessPoolExecutor(
            parallel, mp_context=ctx, initializer=_init_worker, initargs=(threads,)
        ) as pool:
            futures = [
                pool.submit(run_one, replace(job, progress=False, threads=job.threads or threads))
                for job in jobs
            ]
            for future in as_completed(futures):
                records.append(future.result())
                bar.update()
                _note(bar, records[-1])
    bar.close()
    return records


def prewarm(job: Job) -> None:
    """Load (and so cache) CIFAR-10 and the OoD sets once before parallel runs start."""
    from .data import load_cifar10
    from .oodsets import make_ood_sets

    root = pathlib.Path(job.data_root) if job.data_root else None
    cache = pathlib.Path(job.cache_dir) if job.cache_dir else None
    try:
        load_cifar10("train", root, cache_dir=cache)
        make_ood_sets(load_cifar10("test", root, cache_dir=cache), root, cache_dir=cache)
    except (FileNotFoundError, ValueError):
        pass  # each run reports the problem in its record


def _note(bar: Any, record: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:
        return
    cfg = record["config"]
    if record["status"] != "ok":
        bar.write(
            f"FAILED {cfg['backend']} {record['label']} seed {cfg['seed']}: "
            f"{report.one_line(record.get('error', ''))}"
        )
    else:
        m = record["metrics"]
        auc = " ".join(f"{k}={v['auroc_typical']:.1f}" for k, v in m["ood"].items())
        bar.write(
            f"{cfg['backend']:<9} {record['label']:<16} seed {cfg['seed']}: "
            f"acc {m['accuracy']:.1f}  typ-AUROC {auc}  ({record['time']['total_s']:.0f}s)"
        )


def setup_distributed() -> tuple[int, int, str | None]:
    """Initialise torch.distributed under torchrun; ``(rank, world, device)``."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return 0, 1, None
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        device = f"cuda:{local}"
    else:
        dist.init_process_group("gloo")
        device = "cpu"
    return dist.get_rank(), size, device


def parser(command: str, description: str) -> argparse.ArgumentParser:
    """The options shared by ood, outliers, trainsize and sweep."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks {command}", description=description)
    p.add_argument("--backend", default="all", help="comma-separated backends, or 'all'")
    p.add_argument("--preset", default="smoke", choices=presets.PRESETS)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA, help="KLJ weight of + KLJ rows")
    p.add_argument("--form", default="jacobian", choices=("jacobian", "released-code"))
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: preset's)")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument(
        "--resolution", type=int, default=None, help="override the preset's image side (16, 8)"
    )
    p.add_argument("--curves", action="store_true", help="test accuracy and L_x after every epoch")
    p.add_argument(
        "--data-root", default=None, help="data folder (default: $KLJ_DATA or ../shared/data)"
    )
    p.add_argument("--cache-dir", default=None, help="decoded-data cache (default: $KLJ_CACHE)")
    p.add_argument(
        "--download",
        action="store_true",
        help="fetch CIFAR-10 with torchvision into --data-root (else the cache) if absent; "
        "QuickDraw and Tiny-ImageNet are read from --data-root and left out if not there",
    )
    p.add_argument(
        "--out", default=None, help=f"output folder (default: {DEFAULT_OUT}/{command}/<preset>)"
    )
    p.add_argument("--parallel", type=int, default=None, help="parallel run processes")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument(
        "--arch", default="default", choices=("default", "paper"), help="'paper': IB-INN (FrEIA)"
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads per run process")
    p.add_argument("--no-progress", action="store_true")
    return p


@dataclass
class Setting:
    """Parsed common options."""

    preset: presets.Preset
    backends: list[str]
    seeds: list[int]
    out: pathlib.Path
    device: str
    parallel: int
    rank: int
    world: int
    args: argparse.Namespace


def settings(args: argparse.Namespace, command: str) -> Setting:
    preset = presets.get(args.preset)
    if args.epochs is not None:
        preset = replace(preset, train=replace(preset.train, epochs=args.epochs))
    if args.resolution is not None:
        preset = replace(preset, resolution=args.resolution)
    if args.curves:
        preset = replace(preset, curves=True)
    names = backends.parse(args.backend)
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(preset.seeds)
    rank, size, ddp_device = setup_distributed()
    if args.download:
        from .data import download_cifar10, download_root

        root = download_root(args.data_root, args.cache_dir)
        if rank == 0:
            download_cifar10(root)
        if size > 1:
            import torch.distributed as dist

            dist.barrier()
        args.data_root = str(root)
    device = ddp_device or args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    parallel = args.parallel if args.parallel is not None else preset.parallel
    if device == "cpu" and args.parallel is None:
        parallel = min(parallel, os.cpu_count() or 1)  # e.g. the gpu preset on a laptop
    if size > 1:
        parallel = 1 if args.parallel is None else parallel
    if size > 1 and parallel > 1:
        raise SystemExit(
            "--parallel and torchrun do not mix: torchrun already runs one process per device"
        )
    out = pathlib.Path(args.out) if args.out else DEFAULT_OUT / command / preset.name
    return Setting(preset, names, seeds, out, device, max(1, parallel), rank, size, args)


def make_jobs(
    s: Setting,
    command: str,
    rows: Sequence[Row],
    folder: Callable[[str], pathlib.Path],
    variant: dict[str, Any] | None = None,
    alpha: float | None = None,
) -> list[Job]:
    """Jobs for every backend x row x seed, minus finished ones (same config)."""
    args = s.args
    jobs = []
    for backend in s.backends:
        for row in rows:
            for seed in s.seeds:
                config = run_config(
                    command, s.preset, backend, row, seed,
                    alpha=args.alpha if alpha is None else alpha, form=args.form,
                    arch=args.arch, variant=variant, world_size=s.world,
                )  # fmt: skip
                path = folder(backend) / f"{row.key}_seed{seed}.json"
                if report.finished(path, config):
                    continue
                jobs.append(
                    Job(config, row.label, path, s.device, args.data_root, args.cache_dir,
                        args.threads, not args.no_progress, s.preset.eval_batch)
                )  # fmt: skip
    return jobs


def main(argv: list[str] | None = None) -> int:
    p = parser("ood", __doc__.splitlines()[0] if __doc__ else "")
    p.add_argument(
        "--beta", type=float, default=1.0, help="IB beta of the first IB pair (γ; inf allowed)"
    )
    p.add_argument(
        "--rows",
        default=None,
        help="comma-separated row keys (default: all six; also: "
        + ", ".join(r.key for r in EXTRA_ROWS)
        + ")",
    )
    p.add_argument(
        "--select-alpha",
        default=None,
        metavar="ALPHAS",
        help="comma-separated alphas: train IB γ→∞ + KLJ with each on the training set minus a "
        f"{SELECTION_SPLIT:g} validation split, choose one on that split (never OoD or test "
        "data: best held-out L_x among the alphas within 1 point of the best held-out "
        "accuracy), then add the row 'ibinf_klj_val' with it",
    )
    args = p.parse_args(argv)
    s = settings(args, "ood")
    rows = table_rows(args.beta)
    if args.rows:
        wanted = args.rows.split(",")
        known = rows + list(EXTRA_ROWS)
        unknown = set(wanted) - {r.key for r in known}
        if unknown:
            raise SystemExit(
                f"unknown rows {sorted(unknown)}; choose from {[r.key for r in known]}"
            )
        rows = [r for r in known if r.key in wanted]
    jobs = table_jobs = make_jobs(s, "ood", rows, lambda b: s.out / b)
    if args.select_alpha:
        jobs = jobs + selected_alpha_jobs(s, [float(a) for a in args.select_alpha.split(",")])
    total = len(s.backends) * len(rows) * len(s.seeds)
    if s.rank == 0:
        print(f"ood: preset {s.preset.name}, {total - len(table_jobs)} of {total} runs done, "
              f"{len(jobs)} to run on {s.device}" + (f" x{s.parallel}" if s.parallel > 1 else "")
              + (f" (DDP x{s.world})" if s.world > 1 else ""))  # fmt: skip
    records = run_jobs(jobs, s.parallel, desc="ood")
    return finish(s, "ood", "table1", records, report.table1_markdown, report.table1_chart)


def selected_alpha_jobs(s: Setting, alphas: Sequence[float]) -> list[Job]:
    """Choose alpha for IB γ→∞ + KLJ on a validation split of the training images, per backend
    (one run per alpha, the first seed, the preset's ``select_epochs``; see
    ``--select-alpha``), write the choice to
    ``<out>/<backend>/validation/selection.json``, and return the jobs of the row
    ``ibinf_klj_val`` with it (every seed, the whole training set)."""
    variant = {"validation": SELECTION_SPLIT}
    probe = [
        Row(
            "ibinf" if a == 0 else f"ibinf_a{a:g}",
            f"IB γ→∞, α={a:g}",
            "ib",
            math.inf,
            a > 0,
            alpha=a,
        )
        for a in alphas
    ]
    folder = lambda b: s.out / b / "validation"  # noqa: E731
    preset = s.preset
    if preset.select_epochs:  # a shorter schedule of the same shape
        preset = replace(preset, train=replace(preset.train, epochs=preset.select_epochs))
    first = replace(s, seeds=s.seeds[:1], preset=preset)
    jobs = make_jobs(first, "ood", probe, folder, variant)
    if s.rank == 0 and jobs:
        print(f"ood: choosing alpha on a validation split: {len(jobs)} runs")
    records = run_jobs(jobs, s.parallel, desc="alpha")
    out: list[Job] = []
    for backend in s.backends:
        runs = [
            r for r in report.load_runs(folder(backend))
            if r["status"] == "ok" and r["config"].get("variant") == variant
            and r["config"]["seed"] == first.seeds[0]
            and r["config"]["alpha"] in alphas and r["config"]["preset"] == s.preset.name
        ]  # fmt: skip
        if not runs:
            failed = [r for r in records if r["config"]["backend"] == backend]
            raise SystemExit(f"alpha selection for {backend}: no finished run ({failed[:1]})")
        choice = choose_alpha(runs)
        report.write_json(folder(backend) / "selection.json", choice)
        if s.rank == 0:
            print(f"ood: {backend}: alpha {choice['alpha']:g} chosen on the validation split")
        if choice["alpha"] > 0:
            label = f"IB γ→∞ + KLJ (α={choice['alpha']:g}, chosen on validation)"
            row = Row("ibinf_klj_val", label, "ib", math.inf, True, alpha=choice["alpha"])
            out += make_jobs(replace(s, backends=[backend]), "ood", [row], lambda b: s.out / b)
    return out


def choose_alpha(runs: Sequence[dict[str, Any]], tolerance: float = 1.0) -> dict[str, Any]:
    """The alpha with the lowest held-out mean ``L_x`` (the OoD score's density term) among
    those whose held-out accuracy is within ``tolerance`` points of the best."""
    scored = sorted(
        (
            {
                "alpha": float(r["config"]["alpha"]),
                "accuracy": float(r["metrics"]["accuracy"]),
                "l_x": float(r["metrics"]["id_l_x_mean"]),
            }
            for r in runs
        ),
        key=lambda c: c["alpha"],
    )
    best_acc = max(c["accuracy"] for c in scored)
    eligible = [c for c in scored if c["accuracy"] >= best_acc - tolerance]
    chosen = min(eligible, key=lambda c: c["l_x"])
    return {
        "alpha": chosen["alpha"],
        "rule": f"lowest held-out L_x among alphas within {tolerance:g} accuracy points of the "
        "best held-out accuracy",
        "candidates": scored,
    }


def finish(
    s: Setting,
    command: str,
    stem: str,
    records: Sequence[dict[str, Any]],
    markdown: Callable[[list[dict[str, Any]]], str],
    chart: Callable[[list[dict[str, Any]], pathlib.Path], None],
) -> int:
    """Write ``<stem>.md`` and ``<stem>.png`` from every finished run of ``command`` in the
    output folder (rank 0), end DDP; exit status 1 if a run failed."""
    if s.rank == 0:
        runs = report.command_runs(s.out, command)
        (s.out / f"{stem}.md").write_text(markdown(runs))
        chart(runs, s.out / f"{stem}.png")
        print(f"wrote {s.out / stem}.md and {s.out / stem}.png")
        if any(curves.has_curves(r) for r in runs):
            (s.out / "curves.md").write_text(curves.markdown(runs))
            curves.chart(runs, s.out / "curves.png")
            print(f"wrote {s.out / 'curves'}.md and .png (learning curves)")
    if s.world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 1 if any(r["status"] != "ok" for r in records) else 0
