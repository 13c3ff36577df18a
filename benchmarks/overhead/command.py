"""The command line: ``python -m benchmarks overhead [options]``."""

from __future__ import annotations

import argparse
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from ..common import backends
from ..common.records import run_metadata
from . import zoo
from .report import write_report
from .settings import ALL_MODELS, CLOCKS, DEFAULT_OUT, MODELS, VARIANTS, ZOO_VARIANTS, Settings
from .timing import measure, measure_zoo


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks overhead",
        description="what the KLJ penalty costs per training step",
    )
    parser.add_argument("--backend", default="all", help="comma-separated backends, or all")
    parser.add_argument(
        "--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available"
    )
    parser.add_argument(
        "--reps",
        type=int,
        default=None,
        help="timed rounds of the image flows (default 20; --quick 3)",
    )
    parser.add_argument(
        "--tabular-reps",
        type=int,
        default=None,
        help="timed rounds of the tabular flows, whose steps are short and noisy (default 100)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="warm-up steps (default 5; --quick 1)"
    )
    parser.add_argument("--batch", type=int, default=None, help="tabular batch (default 256)")
    parser.add_argument(
        "--image-batch", type=int, default=None, help="image batch (default 8 on CPU, 64 on CUDA)"
    )
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help="tabular,image (or reverse-kl, or zoo: see benchmarks/README.md)",
    )
    parser.add_argument(
        "--variants",
        default=None,
        help=",".join(VARIANTS) + " (default all; zoo: " + ",".join(ZOO_VARIANTS) + ")",
    )
    parser.add_argument(
        "--clock",
        choices=CLOCKS,
        default=None,
        help="wall: perf_counter; cpu: the thread's CPU time, one torch thread (default: cpu "
        "for the zoo on CPU, else wall)",
    )
    parser.add_argument(
        "--zoo", default="", help="--models zoo: comma-separated substrings of model names"
    )
    parser.add_argument(
        "--zoo-reps", type=int, default=None, help="timed rounds per zoo model (default 40)"
    )
    parser.add_argument(
        "--zoo-seconds",
        type=float,
        default=None,
        help="timed seconds per zoo model, fewer rounds (at least 8) for long steps (default 20)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--quick", action="store_true", help="tiny models, few reps (for tests)")
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> Settings:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    models = [m for m in args.models.split(",") if m]
    zoo_run = "zoo" in models
    if zoo_run and models != ["zoo"]:
        raise SystemExit("--models zoo runs alone (its report is cpu-zoo.json)")
    default = ",".join(ZOO_VARIANTS if zoo_run else VARIANTS)
    variants = [v for v in (args.variants or default).split(",") if v]
    for name, chosen, allowed in (("model", models, ALL_MODELS), ("variant", variants, VARIANTS)):
        unknown = sorted(set(chosen) - set(allowed))
        if unknown:
            raise SystemExit(f"unknown {name}(s) {unknown}; choose from {', '.join(allowed)}")
    s = Settings(
        device=device, backends=backends.parse(args.backend), models=models, variants=variants
    )
    if args.quick:
        s.quick, s.reps, s.tabular_reps, s.warmup, s.batch, s.image_batch = True, 3, 3, 1, 32, 2
        s.dim, s.layers, s.hidden = 8, 2, 16
        s.zoo_reps = 3
    elif device == "cuda":
        s.image_batch = 64
    s.clock = args.clock or ("cpu" if zoo_run and device == "cpu" else "wall")
    s.zoo = [p for p in args.zoo.split(",") if p]
    if args.zoo_seconds is not None:
        s.zoo_seconds = args.zoo_seconds
    for name in ("reps", "tabular_reps", "warmup", "batch", "image_batch", "zoo_reps"):
        value = getattr(args, name)
        if value is not None:
            if value < (0 if name == "warmup" else 1):
                raise SystemExit(f"--{name.replace('_', '-')} must be positive")
            setattr(s, name, value)
    return s


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    settings = settings_from(args)
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    load_before = [round(v, 2) for v in os.getloadavg()]
    if settings.clock == "cpu":
        torch.set_num_threads(1)  # thread_time counts the timing thread only
    metadata = run_metadata(device, settings.backends)  # before the report files dirty the tree
    results: list[dict[str, Any]] = []
    warnings.filterwarnings("ignore", message=".*ran its own.*")
    text = ""
    if settings.models == ["zoo"]:
        for entry in zoo.select(zoo.zoo(settings.backends), settings.zoo):
            print(f"{entry.name} ...", flush=True)
            start = time.perf_counter()
            try:
                results.append(measure_zoo(entry, settings, device))
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                results.append(
                    {
                        "model": "zoo",
                        "name": entry.name,
                        "family": entry.family,
                        "backend": entry.backend,
                        "size": entry.size,
                        "error": message,
                    }
                )
                print(f"  failed: {message}")
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
            text = write_report(args.out, settings, metadata, load_before, results)
    for model_kind in [m for m in settings.models if m != "zoo"]:
        for backend in settings.backends:
            print(f"{model_kind}/{backend} ...", flush=True)
            start = time.perf_counter()
            try:
                results.append(measure(model_kind, backend, settings, device))
            except Exception as error:
                results.append(
                    {
                        "model": model_kind,
                        "backend": backend,
                        "error": f"{type(error).__name__}: {error}",
                    }
                )
                print(f"  failed: {type(error).__name__}: {error}")
            print(f"  {time.perf_counter() - start:.0f} s", flush=True)
            # written after every model/backend, so that a run cut short keeps what it measured
            text = write_report(args.out, settings, metadata, load_before, results)
    print(text)
    return 0
