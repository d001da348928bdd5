"""Winograd vs the direct conv2d schedule on one 3x3 stride-1 convolution (default: 320 -> 320 channels at
64x64, batch 1, float32, the SD 1.5 UNet's first stage at latent 64).

For each variant (direct, F2, F4, F6) the layer is compiled for the host with the ``winograd-conv2d`` pass
forced to that variant, then timed as the median of ``--runs`` calls after ``--warmup`` calls; PyTorch eager
is the reference. The weight transform runs once at compile time when ``lift-weight-transforms`` lifts it;
until then it runs inside every call, so its kernel's time (from a per-kernel profile) is subtracted and the
column "pre-transformed" is what a lifted build costs. The error is max |y - y_torch| / max |y_torch| of the
compiled output against PyTorch (float32), next to the pass's own measured bound.

    python benchmarks/winograd.py
    python benchmarks/winograd.py --channels 64 --size 32 --runs 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def median_seconds(call, runs: int, warmup: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["direct", "2", "4", "6"])
    args = parser.parse_args()

    import torch
    import tvm

    import edgediff
    from edgediff.lowering.profile import profile_vm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1).eval()
    x = torch.randn(1, args.channels, args.size, args.size)
    with torch.no_grad():
        expected = conv(x).numpy()
        eager = median_seconds(lambda: conv(x), args.runs, args.warmup)
    threads = os.environ.get("TVM_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    print(
        f"conv2d {args.channels}->{args.channels} 3x3 stride 1 at {args.size}x{args.size}, batch 1, float32; "
        f"torch threads {torch.get_num_threads()}, TVM threads {threads}; median of {args.runs} after "
        f"{args.warmup} warm-up"
    )
    print(
        f"{'variant':<8} {'compile s':>9} {'ms/call':>9} {'weight ms':>9} {'pre-transf':>10} "
        f"{'vs direct':>9} {'vs eager':>9} {'error':>9} {'pass est.':>9}"
    )
    print(f"{'eager':<8} {'':>9} {1e3 * eager:9.2f}")
    direct_ms = None
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            start = time.perf_counter()
            artifact = edgediff.compile_model(
                conv,
                (x,),
                output_dir=Path(tmp) / variant,
                progress=False,
                passes={"winograd-conv2d": variant != "direct"},
                pass_options={"winograd-conv2d": {"variant": variant}},
            )
            compile_s = time.perf_counter() - start
            module = edgediff.load(artifact.path)
            got = module(x)
            error = float(np.abs(got - expected).max() / np.abs(expected).max())
            call_args = [tvm.runtime.tensor(x.numpy())] + list(module._weights)
            seconds = median_seconds(lambda: module._main(*call_args), args.runs, args.warmup)  # noqa: B023
            profile = profile_vm(module._vm, call_args, runs=args.runs)
            weight = sum(s for name, s in profile.seconds.items() if "winograd_weight" in name) / profile.runs
            lifted_ms = 1e3 * (seconds - weight)
            direct_ms = direct_ms or lifted_ms
            report = next(
                (p["report"] for p in artifact.manifest["passes"] if p["name"] == "winograd-conv2d"), {}
            )
            layer = (report.get("layers") or [{}])[0]
            estimate = (
                f"{layer['estimated_speedup']:.2f}x" if layer.get("chosen", "direct") != "direct" else ""
            )
            print(
                f"{variant:<8} {compile_s:9.1f} {1e3 * seconds:9.2f} {1e3 * weight:9.2f} {lifted_ms:10.2f} "
                f"{direct_ms / lifted_ms:8.2f}x {1e3 * eager / lifted_ms:8.2f}x {error:9.1e} {estimate:>9}"
            )
            print("         " + profile.table(top=6).replace("\n", "\n         "))


if __name__ == "__main__":
    main()
