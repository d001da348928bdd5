"""Fused attention (pass ``fuse-attention``) against the unfused edgediff build and PyTorch eager SDPA.

The shapes are SD1.5's self attention in its first transformer blocks: 8 heads of dim 40 over the latent's
tokens, N = M = 4096 at a 64x64 latent and 1024 at 32x32, batch 1, fp32. Each engine is timed as the median
of ``--runs`` calls after ``--warmup``, the engines taking turns call by call (so a shared machine's
background load hits them alike); peak memory is the growth of the process's VmHWM over loading and
first calling that engine (reset before each). ``--exp`` also times the fused kernel alone with libm's
scalar ``exp`` against the vectorized range-reduction ``exp`` the pass uses.

    python benchmarks/attention.py                    # N = 4096 and 1024
    python benchmarks/attention.py --tokens 1024 --runs 5 --exp
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edgediff.tools.bench.measure import (  # noqa: E402
    machine_line,
    median_alternating,
    peak_rss_mb,
    reset_peak_rss,
    time_calls,
)

HEADS, HEAD_DIM = 8, 40


def _sdpa_module():
    import torch

    class SelfAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return SelfAttention().eval()


def _eager(model: Any, inputs: tuple[Any, ...]) -> Any:
    import torch

    with torch.inference_mode():
        return model(*inputs)


def bench_tokens(tokens: int, args: argparse.Namespace, workdir: Path) -> dict[str, float]:
    """Time eager SDPA, edgediff unfused and edgediff fused at ``tokens`` queries and keys."""
    import torch

    import edgediff

    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, HEADS, tokens, HEAD_DIM) for _ in range(3))
    model = _sdpa_module()
    peak: dict[str, float] = {}
    reset_peak_rss()
    base_mb = peak_rss_mb()
    expected = _eager(model, inputs).numpy()
    peak["eager SDPA"] = peak_rss_mb() - base_mb
    calls: dict[str, Callable[[], Any]] = {"eager SDPA": lambda: _eager(model, inputs)}
    report: dict = {}
    for label, on in (("edgediff unfused", False), ("edgediff fused", True)):
        artifact = edgediff.compile_model(
            model,
            inputs,
            output_dir=workdir / f"{tokens}-{on}",
            passes={"fuse-attention": on},
            progress=False,
        )
        if on:
            report = next(p for p in artifact.manifest["passes"] if p["name"] == "fuse-attention")["report"]
        gc.collect()
        reset_peak_rss()
        base_mb = peak_rss_mb()
        module = edgediff.load(artifact.path)  # its first call allocates the VM's memory pool
        err = float(np.abs(module(*inputs) - expected).max())
        peak[label] = peak_rss_mb() - base_mb
        print(f"    {label}: max |err| vs eager {err:.1e}", flush=True)
        calls[label] = lambda module=module: module(*inputs)
    seconds = median_alternating(calls, args.runs, args.warmup)
    print(f"  N = M = {tokens} ({HEADS} heads, head dim {HEAD_DIM}, batch 1, fp32)")
    for label, value in seconds.items():
        print(f"    {label:18s} {value * 1e3:9.2f} ms   peak +{peak[label]:7.0f} MB")
    fused = seconds["edgediff fused"]
    print(
        f"    fused speedup: {seconds['edgediff unfused'] / fused:.2f}x vs unfused, "
        f"{seconds['eager SDPA'] / fused:.2f}x vs eager SDPA"
    )
    site = report["sites"][0]
    print(
        f"    score matrix not materialised: {report['score_bytes_avoided'] / 2**20:.0f} MiB "
        f"({site['batch_heads']} x {site['n']} x {site['m']} fp32); tiles {site['tiles']}"
    )
    if args.exp:
        _bench_exp(tokens, args)
    return seconds


def _bench_exp(tokens: int, args: argparse.Namespace) -> None:
    """The fused kernel alone, with libm's exp and with the vectorized fast exp."""
    import tvm

    from edgediff.kernels.attention import fused_attention_kernel
    from edgediff.targets import CostModel, load_target

    spec = load_target("host")
    cost = CostModel(spec)
    rng = np.random.default_rng(0)
    shape = (HEADS, tokens, HEAD_DIM)  # q, k, v and the output
    arrays = [rng.standard_normal(shape).astype("float32") for _ in range(3)] + [np.zeros(shape, "float32")]
    times = {}
    for exp in ("libm", "fast"):
        func = fused_attention_kernel(
            cost, batch=HEADS, n=tokens, m=tokens, d=HEAD_DIM, dtype="float32", scale=HEAD_DIM**-0.5, exp=exp
        )
        lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target=spec.build_target())
        args_nd = [tvm.runtime.tensor(a) for a in arrays]
        times[exp] = time_calls(lambda lib=lib, a=args_nd: lib(*a), args.runs, args.warmup)
    print(
        f"    kernel alone: libm exp {times['libm'] * 1e3:.2f} ms, fast exp {times['fast'] * 1e3:.2f} ms "
        f"({times['libm'] / times['fast']:.2f}x)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 1024])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--exp", action="store_true", help="also time the kernel with libm exp vs fast exp")
    args = parser.parse_args(argv)
    import torch

    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    print(machine_line(threads))
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in args.tokens:
            bench_tokens(tokens, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
