"""Weight-only int8 (``w8``) or int4 (``--precision w4``) conv2d vs fp32, one SD 1.5 conv at a time: does a
weight-only build get fp32's schedules?

Each case is one ``nn.Conv2d`` (SD 1.5 UNet shapes at latent 32) compiled by edgediff for this host (int8
added to its dtypes, as ``benchmarks/precision.py`` does): ``fp32`` and ``w8`` with the Winograd pass free to
choose per the cost model (its model-wide weight budget lifted: one conv alone is the whole model, so 5% of
its own weights would forbid any Winograd variant), and both with ``variant: direct`` (the direct conv
only). The column ``chosen`` is the Winograd variant each build took. Whole artifact calls on the same input;
engines take turns call by call; the figure is the least process CPU time of ``--runs`` calls
(``--threads 1``: a quiet core).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/w8_conv.py --threads 1 --runs 7

Run of 2026-12-03 23:39 UTC at 6341dbe on the shared 2-core VM (znver3, AVX2), ms:

    conv                      fp32     w8  fp32-direct  w8-direct  fp32/w8  chosen fp32/w8
    320x32x32->320 3x3        8.32   9.28        23.39      25.04     0.90           F4/F4
    640x16x16->640 3x3        8.45  14.09        25.91      26.37     0.60           F4/F4
    1280x8x8->1280 3x3       13.26  30.24        25.63      30.24     0.44       F2/direct
    320x32x32->320 1x1        4.11   3.99         4.14       4.06     1.03             -/-
    320x16x16->640 1x1        1.38   1.28         1.39       1.28     1.08             -/-

Before (main at 7558234, same script, --runs 5): w8 3x3 convs took no Winograd (w8 = w8-direct: 32.2,
41.0, 30.7 ms against fp32 11.7, 15.4, 13.7), 1x1 w8 0.81x and 0.95x of fp32. A w8 Winograd layer writes its
transformed weight U (alpha^2/9 x 4 bytes per int8 weight byte) on every call, which is what separates it
from fp32 at 640 channels and keeps the cost model on the direct conv at 1280.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

# SD 1.5 UNet convs at latent 32: (in channels, size, out channels, kernel)
CASES = [
    (320, 32, 320, 3),  # resnet conv, down/up block 1
    (640, 16, 640, 3),  # resnet conv, block 2
    (1280, 8, 1280, 3),  # resnet conv, block 3
    (320, 32, 320, 1),  # transformer proj_in / proj_out
    (320, 16, 640, 1),  # resnet conv_shortcut
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--cases", type=int, nargs="*", help="indices into CASES (default: all)")
    parser.add_argument("--precision", choices=("w8", "w4"), default="w8", help="the weight-only format")
    args = parser.parse_args()
    low = args.precision
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    import tvm

    import edgediff
    from edgediff.tools.bench.measure import time_alternating
    from edgediff.tools.bench.quality import host_int8

    spec = host_int8()
    print(f"{args.threads} thread(s); least CPU time of {args.runs} calls, ms")
    builds = {
        "fp32": {"pass_options": {"winograd-conv2d": {"max_weight_growth": 100.0}}},
        low: {"precision": low, "pass_options": {"winograd-conv2d": {"max_weight_growth": 100.0}}},
        "fp32-direct": {"pass_options": {"winograd-conv2d": {"variant": "direct"}}},
        f"{low}-direct": {"precision": low, "pass_options": {"winograd-conv2d": {"variant": "direct"}}},
    }
    print(
        f"{'conv':<24} "
        + " ".join(f"{name:>12}" for name in builds)
        + f" {'fp32/' + low:>8} {'chosen fp32/' + low:>15} {low + ' MB':>6}  max|{low}-ref|/max|ref|"
    )
    dev = tvm.cpu()
    cases = [CASES[i] for i in args.cases] if args.cases else CASES
    for channels, size, out_channels, kernel in cases:
        torch.manual_seed(0)
        # wrapped: the precision planner quantizes named submodules
        conv = torch.nn.Sequential(
            torch.nn.Conv2d(channels, out_channels, kernel, padding=kernel // 2)
        ).eval()
        x = torch.randn(1, channels, size, size)
        want = conv(x).detach().numpy()
        calls, outputs, chosen, sizes = {}, {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for engine, options in builds.items():
                artifact = edgediff.compile_model(
                    conv, (x,), target=spec, output_dir=f"{tmp}/{engine}", progress=False, **options
                )
                passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
                layers = (passes.get("winograd-conv2d") or {}).get("layers") or []
                chosen[engine] = ",".join(layer["chosen"] for layer in layers) or "-"
                sizes[engine] = (artifact.path / "weights.bin").stat().st_size / 1e6
                run = edgediff.load(artifact.path)
                x_tvm = tvm.runtime.tensor(x.numpy(), dev)
                calls[engine] = lambda run=run, x_tvm=x_tvm: run._main(x_tvm, *run._weights)
                outputs[engine] = run(x.numpy())
            times = {
                k: min(v) * 1e3
                for k, v in time_alternating(calls, args.runs, args.warmup, cpu_time=True).items()
            }
        err = float(np.abs(outputs[low] - want).max() / np.abs(want).max())
        name = f"{channels}x{size}x{size}->{out_channels} {kernel}x{kernel}"
        print(
            f"{name:<24} "
            + " ".join(f"{times[e]:>12.2f}" for e in builds)
            + f" {times['fp32'] / times[low]:>8.2f} {chosen['fp32'] + '/' + chosen[low]:>15}"
            + f" {sizes[low]:>6.2f}  {err:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
