"""Single-kernel benchmark: softmax, GroupNorm + SiLU, GEGLU, Linear and 3x3 conv layers, edgediff (host
build) vs PyTorch eager and onnxruntime.

Each case is compiled with edgediff's default pipeline for ``host`` (Winograd off, so that the conv cases
time the direct schedule) and timed as the median of ``--runs`` calls after ``--warmup`` calls, in one
process; PyTorch eager and onnxruntime (CPUExecutionProvider) run the same module on the same input with the
same thread count. ``--cpu-time`` takes the least process CPU time of the runs instead of the median wall
time: with ``--threads 1`` that is what a call costs on a quiet core even when other work shares the
machine. To compare two versions of edgediff, run the script with each on PYTHONPATH (the script uses only
``edgediff.compile_model`` and ``edgediff.load``).

    PYTHONPATH=. .venv/bin/python benchmarks/kernel_speed.py
    PYTHONPATH=. .venv/bin/python benchmarks/kernel_speed.py --threads 1 --cpu-time --cases 'linear*' 'conv*'
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import tempfile
from collections.abc import Callable

import numpy as np
import torch

import edgediff
from edgediff.tools.bench import time_calls
from edgediff.tools.bench.measure import time_alternating


class GEGLU(torch.nn.Module):
    """diffusers' GEGLU: one Linear to twice the width, then a * gelu(g)."""

    def __init__(self, dim: int, inner: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(dim, 2 * inner)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, g = self.proj(x).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(g)


CASES: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "softmax (8,1024,1024)": (lambda: torch.nn.Softmax(dim=-1), (8, 1024, 1024)),
    "softmax (8,4096,4096)": (lambda: torch.nn.Softmax(dim=-1), (8, 4096, 4096)),
    "groupnorm+silu (1,320,64,64)": (
        lambda: torch.nn.Sequential(torch.nn.GroupNorm(32, 320), torch.nn.SiLU()),
        (1, 320, 64, 64),
    ),
    # SD 1.5's first transformer block at latent 64x64: 4096 tokens, 320 -> 2 x 1280
    "geglu (1,4096,320)->1280": (lambda: GEGLU(320, 1280), (1, 4096, 320)),
    # SD 1.5's 8x8 level at latent 32x32: 64 tokens, 1280 -> 2 x 5120 (52 MB of weights)
    "geglu (1,64,1280)->5120": (lambda: GEGLU(1280, 5120), (1, 64, 1280)),
    # DiT-XL/2 at latent 32x32: 256 tokens of 1152, MLP up and down
    "linear (1,256,1152)->4608": (lambda: torch.nn.Linear(1152, 4608), (1, 256, 1152)),
    "linear (1,256,4608)->1152": (lambda: torch.nn.Linear(4608, 1152), (1, 256, 4608)),
    "linear (1,64,1280)->1280": (lambda: torch.nn.Linear(1280, 1280), (1, 64, 1280)),
    "linear (1,1024,320)->320": (lambda: torch.nn.Linear(320, 320), (1, 1024, 320)),
    # SD 1.5's resnet convs at latent 32x32, one per level
    "conv 3x3 320 (1,320,32,32)": (lambda: torch.nn.Conv2d(320, 320, 3, padding=1), (1, 320, 32, 32)),
    "conv 3x3 640 (1,640,16,16)": (lambda: torch.nn.Conv2d(640, 640, 3, padding=1), (1, 640, 16, 16)),
    "conv 3x3 1280 (1,1280,8,8)": (lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (1, 1280, 8, 8)),
    "conv 3x3 1280 (1,1280,4,4)": (lambda: torch.nn.Conv2d(1280, 1280, 3, padding=1), (1, 1280, 4, 4)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "2")))
    parser.add_argument(
        "--cpu-time", action="store_true", help="least process CPU time instead of median wall"
    )
    parser.add_argument(
        "--cases", nargs="*", default=["*"], help="case names or shell patterns (default: all)"
    )
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    names = [name for name in CASES if any(fnmatch.fnmatch(name, pattern) for pattern in args.cases)]

    clock = "CPU time, least of the runs" if args.cpu_time else "wall time, median of the runs"
    print(f"edgediff from {os.path.dirname(edgediff.__file__)}; {args.threads} threads; {clock}")
    print(
        f"{'case':<28} {'torch ms':>9} {'ort ms':>8} {'edgediff ms':>12} {'/torch':>7} {'/ort':>6} "
        f"{'max |err|':>9}"
    )
    for name in names:
        times, err = _bench_case(name, args)
        ours = times["edgediff"]
        ort_ms = f"{times['ort'] * 1e3:>8.2f}" if "ort" in times else f"{'-':>8}"
        ort_ratio = f"{ours / times['ort']:>6.2f}" if "ort" in times else f"{'-':>6}"
        print(
            f"{name:<28} {times['torch'] * 1e3:>9.2f} {ort_ms} {ours * 1e3:>12.2f} "
            f"{ours / times['torch']:>7.2f} {ort_ratio} {err:>9.1e}"
        )


def _bench_case(name: str, args: argparse.Namespace) -> tuple[dict[str, float], float]:
    """Seconds per engine (torch, ort when installed, edgediff) and max |edgediff - torch| for one case."""
    import tvm

    make, shape = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(*shape) * 4

    def seconds(fn: Callable[[], object]) -> float:
        return time_calls(fn, args.runs, args.warmup, args.cpu_time)

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        artifact = edgediff.compile_model(
            module, (x,), output_dir=f"{tmp}/a", passes={"winograd-conv2d": False}, progress=False
        )
        run = edgediff.load(artifact.path)
        with torch.no_grad():
            expected = module(x).numpy()
            times["torch"] = seconds(lambda: module(x))
        err = float(np.abs(run(x) - expected).max())
        session = _onnxruntime_session(module, x, f"{tmp}/m.onnx", args.threads)
        if session is not None:
            feed = {"x": x.numpy()}
            times["ort"] = seconds(lambda: session.run(None, feed))
        # the VM function itself on a TVM tensor made once: the torch -> numpy -> TVM copy that
        # CompiledModule.__call__ makes of every input would otherwise be timed too
        x_tvm = tvm.runtime.tensor(x.numpy(), tvm.cpu())
        times["edgediff"] = seconds(lambda: run._main(x_tvm, *run._weights))
    return times, err


def least_cpu_ms(calls: dict[str, Callable[[], object]], runs: int, warmup: int) -> dict[str, float]:
    """Milliseconds of each of ``calls``: the least process CPU time of ``runs`` rounds in which the engines
    take turns call by call after ``warmup`` untimed rounds (a shared machine's drift then hits every engine
    alike; with one thread, what a call costs on a quiet core). Shared by the int8 kernel benchmarks."""
    return {name: min(t) * 1e3 for name, t in time_alternating(calls, runs, warmup, cpu_time=True).items()}


def int8_host_target(spec: object, threads: int, runs: int) -> tuple[object, object]:
    """The build target of ``spec`` (an int8 target spec for this host) and its int8 dot-product instruction,
    after printing the first line of a :func:`least_cpu_ms` benchmark: the CPU, instruction and clock."""
    from edgediff.kernels.int8_matmul import dot_instruction  # imports TVM: after the thread count is set

    target = spec.build_target()
    dot = dot_instruction(target)
    mcpu = target.attrs.get("mcpu", "generic")
    print(f"host target {mcpu} ({dot.name}); {threads} thread(s); least CPU time of {runs}")
    return target, dot


def _onnxruntime_session(module: torch.nn.Module, x: torch.Tensor, path: str, threads: int) -> object | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    torch.onnx.export(module, (x,), path, input_names=["x"], dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


if __name__ == "__main__":
    main()
