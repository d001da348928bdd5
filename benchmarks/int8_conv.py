"""w8a8 conv2d on the int8 GEMM kernel vs the fp32 conv and the previous Relax int8 conv2d, SD 1.5 shapes.

Each case is one ``nn.Conv2d`` (SD 1.5 UNet shapes at latent 32) compiled by edgediff three ways for this
host: fp32 (the default host pipeline: Winograd or direct, as the build picks), ``--precision int8`` as
wired now (quantize + im2col kernel, the int8 GEMM with its dequantize epilogue and the conv bias, the
NCHW transpose; ``edgediff/kernels/int8_conv2d.py``) and ``--precision int8`` with the kernel switched off
(the Relax int8 conv2d every int8 build used before). ``im2col`` is the quantize + im2col kernel alone (its
share of the int8 figure). Whole artifact calls on the same input; engines take turns call by call; the
figure is the least process CPU time of ``--runs`` calls (``--threads 1``: a quiet core).

    PYTHONPATH=$PWD nice -n 10 .venv/bin/python benchmarks/int8_conv.py --threads 1 --runs 7
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from unittest import mock

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import int8_host_target, least_cpu_ms  # noqa: E402

# SD 1.5 UNet convs at latent 32: (in channels, size, out channels, kernel, stride)
CASES = [
    (320, 32, 320, 3, 1),  # resnet conv, down/up block 1
    (640, 16, 640, 3, 1),  # resnet conv, block 2
    (1280, 8, 1280, 3, 1),  # resnet conv, block 3
    (320, 32, 320, 3, 2),  # downsample
    (320, 32, 320, 1, 1),  # transformer proj_in / proj_out
    (320, 16, 640, 1, 1),  # resnet conv_shortcut
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    import tvm

    import edgediff
    from edgediff.kernels.int8_conv2d import IM2COL_NAME, ConvShape, int8_im2col_func
    from edgediff.tools.bench.quality import host_int8

    spec = host_int8()
    target, dot = int8_host_target(spec, args.threads, args.runs)
    print(
        f"{'conv':<28} {'fp32 ms':>8} {'int8 ms':>8} {'im2col':>7} {'relax8 ms':>9} "
        f"{'fp32/int8':>9} {'relax8/int8':>11}  max|int8-fp32|/max|fp32|"
    )
    dev = tvm.cpu()
    for channels, size, out_channels, kernel, stride in CASES:
        torch.manual_seed(0)
        # wrapped: the precision planner quantizes named submodules
        conv = torch.nn.Sequential(
            torch.nn.Conv2d(channels, out_channels, kernel, stride=stride, padding=kernel // 2)
        ).eval()
        x = torch.randn(1, channels, size, size)
        want = conv(x).detach().numpy()
        calls, outputs = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            builds = {
                "fp32": {},
                "int8": {"target": spec, "precision": "int8"},
                "relax8": {"target": spec, "precision": "int8"},
            }
            for engine, options in builds.items():
                patch = mock.patch(
                    "edgediff.passes.mixed_precision.int8_conv2d_fits", return_value=engine != "relax8"
                )
                with patch:
                    artifact = edgediff.compile_model(
                        conv, (x,), output_dir=f"{tmp}/{engine}", progress=False, **options
                    )
                if engine == "int8":
                    passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
                    rewritten = passes["mixed-precision"]["rewritten"]
                    assert rewritten.get(f"int8 kernel conv2d ({dot.name})") == 1, rewritten
                run = edgediff.load(artifact.path)
                x_tvm = tvm.runtime.tensor(x.numpy(), dev)
                calls[engine] = lambda run=run, x_tvm=x_tvm: run._main(x_tvm, *run._weights)
                outputs[engine] = run(x.numpy())

            pad = kernel // 2
            shape = ConvShape(
                1, channels, size, size, out_channels, (kernel, kernel), (stride, stride), (pad,) * 4
            )
            im2col = tvm.compile(
                tvm.IRModule(
                    {IM2COL_NAME: int8_im2col_func(shape, "float32", dot.activation_dtype, IM2COL_NAME)}
                ),
                target,
            )[IM2COL_NAME]
            scale = tvm.runtime.tensor(np.array([np.abs(x.numpy()).max() / 127], np.float32), dev)
            patches = tvm.runtime.tensor(np.zeros((shape.rows, shape.depth), dot.activation_dtype), dev)
            calls["im2col"] = lambda im2col=im2col, x_tvm=x_tvm, scale=scale, patches=patches: im2col(
                x_tvm, scale, patches
            )
            times = least_cpu_ms(calls, args.runs, args.warmup)
        err = float(np.abs(outputs["int8"] - want).max() / np.abs(want).max())
        name = f"{channels}x{size}x{size}->{out_channels} {kernel}x{kernel}" + (
            f" s{stride}" if stride > 1 else ""
        )
        print(
            f"{name:<28} {times['fp32']:>8.2f} {times['int8']:>8.2f} {times['im2col']:>7.2f} "
            f"{times['relax8']:>9.2f} {times['fp32'] / times['int8']:>9.2f} "
            f"{times['relax8'] / times['int8']:>11.2f}  {err:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
