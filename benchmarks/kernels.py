"""Single-kernel benchmark: softmax, GroupNorm + SiLU and GEGLU, edgediff (host build) vs PyTorch eager.

Each case is compiled with edgediff's default pipeline for ``host`` and timed as the median of ``--runs``
calls after ``--warmup`` calls, in one process; PyTorch eager runs the same module on the same input with
the same thread count. To compare two versions of edgediff, run the script with each on PYTHONPATH (the
script uses only ``edgediff.compile_model`` and ``edgediff.load``).

    PYTHONPATH=. .venv/bin/python benchmarks/kernels.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch

import edgediff


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
}


def _median_seconds(fn: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TVM_NUM_THREADS", "2")))
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="case names (default: all)")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    print(f"edgediff from {os.path.dirname(edgediff.__file__)}; {args.threads} threads")
    print(f"{'case':<30} {'torch ms':>10} {'edgediff ms':>12} {'edgediff/torch':>15} {'max |err|':>10}")
    for name in args.cases:
        torch_s, ours_s, err = _bench_case(name, args.warmup, args.runs)
        ratio = ours_s / torch_s
        print(f"{name:<30} {torch_s * 1e3:>10.2f} {ours_s * 1e3:>12.2f} {ratio:>15.2f} {err:>10.1e}")


def _bench_case(name: str, warmup: int, runs: int) -> tuple[float, float, float]:
    """(torch seconds, edgediff seconds, max |edgediff - torch|) for one case."""
    import tvm

    make, shape = CASES[name]
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(*shape) * 4
    with tempfile.TemporaryDirectory() as tmp:
        artifact = edgediff.compile_model(module, (x,), output_dir=f"{tmp}/a", progress=False)
        run = edgediff.load(artifact.path)
        with torch.no_grad():
            expected = module(x).numpy()
            torch_s = _median_seconds(lambda: module(x), warmup, runs)
        err = float(np.abs(run(x) - expected).max())
        # the VM function itself on a TVM tensor made once: the torch -> numpy -> TVM copy that
        # CompiledModule.__call__ makes of every input would otherwise be timed too
        x_tvm = tvm.runtime.tensor(x.numpy(), tvm.cpu())
        ours_s = _median_seconds(lambda: run._main(x_tvm, *run._weights), warmup, runs)
    return torch_s, ours_s, err


if __name__ == "__main__":
    main()
