"""Winograd vs the direct conv2d schedule on one 3x3 stride-1 convolution (default: 320 -> 320 channels at
64x64, batch 1, float32, the SD 1.5 UNet's first stage at latent 64).

For each variant (direct, F2, F4, F6) the layer is compiled for the host with the ``winograd-conv2d`` pass
forced to that variant; all variants and PyTorch eager are then timed round-robin (one call each per round,
so load from other processes on a shared machine hits all alike), median of ``--runs`` rounds after
``--warmup`` calls each. The default pipeline's ``lift-weight-transforms`` computes the Winograd weight
transform at compile time, so a call runs only the input transform, the GEMM and the output transform;
with lifting switched off (``--no-lift``) the transform runs in every call, and its share of a call (from
a per-kernel profile, column "weight %") is taken off in "pre-transf". The error is max |y - y_torch| /
max |y_torch| of the compiled output against PyTorch (float32); "pass est." is the cost model's estimated
speedup.

    python benchmarks/winograd.py
    python benchmarks/winograd.py --channels 640 --size 32 --runs 10 --profile
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgediff.tools.bench.measure import median_alternating  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--channels", type=int, default=320)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=["direct", "2", "4", "6"])
    parser.add_argument("--profile", action="store_true", help="per-kernel table of each variant")
    parser.add_argument("--no-lift", action="store_true", help="weight transform inside every call")
    args = parser.parse_args()

    import torch
    import tvm

    import edgediff
    from edgediff.backend.profile import profile_vm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(args.channels, args.channels, 3, padding=1).eval()
    x = torch.randn(1, args.channels, args.size, args.size)
    with torch.no_grad():
        expected = conv(x).numpy()
    threads = os.environ.get("TVM_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    calls: dict[str, Callable[[], Any]] = {"eager": lambda: conv(x)}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for variant in args.variants:
            start = time.perf_counter()
            artifact = edgediff.compile_model(
                conv,
                (x,),
                output_dir=Path(tmp) / variant,
                progress=False,
                passes={"winograd-conv2d": variant != "direct", "lift-weight-transforms": not args.no_lift},
                pass_options={"winograd-conv2d": {"variant": variant}},
            )
            compile_s = time.perf_counter() - start
            module = edgediff.load(artifact.path)
            got = module(x)
            call_args = [tvm.runtime.tensor(x.numpy())] + list(module._weights)
            # the weight transform's share of a call (it leaves the call once lifted to compile time)
            profile = profile_vm(module._vm, call_args, runs=args.runs)
            weight = sum(s for name, s in profile.seconds.items() if "winograd_weight" in name)
            report = next(
                (p["report"] for p in artifact.manifest["passes"] if p["name"] == "winograd-conv2d"), {}
            )
            layer = (report.get("layers") or [{}])[0]
            rows[variant] = {
                "compile": compile_s,
                "error": float(np.abs(got - expected).max() / np.abs(expected).max()),
                "weight_share": weight / profile.total,
                "estimate": f"{layer['estimated_speedup']:.2f}x"
                if layer.get("chosen", "direct") != "direct"
                else "",
                "profile": profile.table(top=5),
            }
            calls[variant] = lambda main=module._main, a=call_args: main(*a)
        medians = median_alternating(calls, args.runs, args.warmup)
    print(
        f"conv2d {args.channels}->{args.channels} 3x3 stride 1 at {args.size}x{args.size}, batch 1, float32; "
        f"torch threads {torch.get_num_threads()}, TVM threads {threads}; median of {args.runs} interleaved "
        f"calls after {args.warmup} warm-up"
    )
    print(
        f"{'variant':<8} {'compile s':>9} {'ms/call':>9} {'weight %':>8} {'pre-transf':>10} "
        f"{'vs direct':>9} {'vs eager':>9} {'error':>9} {'pass est.':>9}"
    )
    eager = medians["eager"]
    print(f"{'eager':<8} {'':>9} {1e3 * eager:9.2f}")
    direct = None
    for variant, row in rows.items():
        lifted = medians[variant] * (1 - row["weight_share"])
        direct = direct or lifted
        print(
            f"{variant:<8} {row['compile']:9.1f} {1e3 * medians[variant]:9.2f} "
            f"{100 * row['weight_share']:7.1f}% "
            f"{1e3 * lifted:10.2f} {direct / lifted:8.2f}x {eager / lifted:8.2f}x {row['error']:9.1e} "
            f"{row['estimate']:>9}"
        )
    if args.profile:
        for variant, row in rows.items():
            print(f"\n{variant}:\n{row['profile']}")


if __name__ == "__main__":
    main()
