"""``edgediff bench``: edgediff's host builds against the engines a user would pick instead, in one process.

``models.py`` times whole models (PyTorch eager, onnxruntime, edgediff); ``resolutions.py`` one
multi-resolution artifact against builds specialised for each size; ``measure.py`` holds the clocks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgediff.tools.bench import engines, models, resolutions
from edgediff.tools.bench.measure import machine_line, peak_rss_mb, reset_peak_rss, time_calls
from edgediff.tools.bench.models import DEFAULT_RUNS
from edgediff.tools.bench.peers import PEERS

__all__ = ["add_arguments", "machine_line", "main", "peak_rss_mb", "reset_peak_rss", "run", "time_calls"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options, for its own parser and for ``edgediff bench``."""
    default_runs = ", ".join(f"{name}@{latent}" for name, latent in DEFAULT_RUNS)
    parser.add_argument("--models", nargs="+", help=f"zoo names (default: {default_runs})")
    parser.add_argument(
        "--latent", nargs="+", type=int, help="latent sizes (default 32; tiny models: theirs)"
    )
    parser.add_argument("--runs", type=int, default=5, help="timed calls per engine (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls first")
    parser.add_argument("--threads", type=int, help="threads for every engine (default: all cores)")
    parser.add_argument(
        "--cpu-time",
        action="store_true",
        help="least CPU time of the runs, not the median wall time (with --threads 1 on a busy machine)",
    )
    parser.add_argument("--engines", nargs="+", default=["onnxruntime"], help="extra engines: onnxruntime")
    parser.add_argument("--no-onnxruntime", action="store_true", help="skip the onnxruntime baseline")
    parser.add_argument("--quick", action="store_true", help="tiny models, 3 runs: a smoke run")
    parser.add_argument("--profile", action="store_true", help="per-kernel profile of one edgediff call")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    parser.add_argument(
        "--peers",
        nargs="+",
        default=[],
        choices=PEERS,
        help="instead of the default table: every engine timed in turns, with these peer engines",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=[],
        help="with the engine table: edgediff builds at these precisions too (w8, int8, fp16, ...)",
    )
    parser.add_argument(
        "--psnr-steps",
        type=int,
        default=20,
        help="engine table: steps of the DPM-Solver++ trajectory whose final latents give the PSNR (0: none)",
    )
    parser.add_argument(
        "--resolutions",
        help="HEIGHTxWIDTH,...: time one multi-resolution artifact against a build specialised for each "
        "size instead (default model sd15-unet-half; --quick: tiny-sd15-unet)",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` asks for and print its tables."""
    if args.resolutions:
        return resolutions.run(args)
    return engines.run(args) if args.peers or args.precisions else models.run(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=models.__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
