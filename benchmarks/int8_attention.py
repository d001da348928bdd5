"""int8 attention (QK^T and PV on the batched int8 GEMM kernel) vs edgediff's fp32 attention, SD 1.5 shapes.

One ``scaled_dot_product_attention(q, k, v)`` (batch 1, 8 heads) at SD 1.5's latent-32 shapes is compiled
by ``edgediff.compile_model`` four ways on this host: fp32 (the default passes: the fused attention
kernel; and without ``fuse-attention``: two fp32 matmuls and a softmax over the written score matrix),
``--precision int8`` (w8a8 attention: run-time per-row / per-column quantization of both operands,
the two matmuls on ``kernels/int8_attention.py``'s batched kernel with its dequantize epilogue, softmax in
float32 between them), and the same int8 plan with the previous Relax int8 batched matmul (the emitter
switched off in this process: what int8 attention ran on before). The int8 target is this host's spec with
int8 added (as the precision tests' ``host_int8``). The ``QK^T`` and ``PV`` columns time the two int8
kernels alone, on already-quantized operands. Engines take turns call by call; each figure is the least
process CPU time of ``--runs`` calls (``--threads 1``: a quiet core).

    PYTHONPATH=. nice -n 10 .venv/bin/python benchmarks/int8_attention.py --threads 1 --runs 10

The int8 builds pin attention to ``a8`` (``--pin '*sdpa=a8'``): CPU targets otherwise keep attention in float.

``--tiny-unet`` instead compiles the zoo's tiny-sd15-unet with ``--precision int8`` for the same target and
prints the mixed-precision pass's counts: which Linear layers (GEGLU projections included) and attention
matmuls run on the int8 kernels.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_speed import int8_host_target, least_cpu_ms  # noqa: E402

# SD 1.5 UNet attention at latent 32x32 (heads, queries, keys, head dim): self-attention at the first two
# levels, cross-attention (77 text tokens) at the first
CASES = [(8, 1024, 1024, 40), (8, 256, 256, 80), (8, 1024, 77, 40), (8, 64, 64, 160)]


class _Attention(torch.nn.Module):
    processor = "sdpa"  # what the calibration hooks take for a diffusers Attention module

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


class _Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _Attention()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.attn(q, k, v)


def _kernel_calls(heads: int, queries: int, keys: int, dim: int, target, dev) -> dict[str, object]:
    """The batched int8 kernel alone for QK^T ([q, d] x [d, k]) and PV ([q, k] x [k, d]), K and N padded."""
    import tvm

    from edgediff.kernels.int8_matmul import (
        DOT_DEPTH,
        KERNEL_NAME,
        choose_int8_tile,
        dot_instruction,
        int8_matmul_func,
    )

    dot = dot_instruction(target)
    calls = {}
    rng = np.random.default_rng(0)
    for name, depth, columns in (("QK^T", dim, keys), ("PV", keys, dim)):
        depth = -(-depth // DOT_DEPTH) * DOT_DEPTH
        columns = -(-columns // dot.lanes) * dot.lanes
        tile = choose_int8_tile(dot, queries, columns)
        func = int8_matmul_func(queries, depth, columns, dot, tile, epilogue="dequantize", batch=heads)
        kernel = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), target)[KERNEL_NAME]
        operands = [
            rng.integers(0 if dot.compensated else -127, 128, (heads, queries, depth)).astype(
                dot.activation_dtype
            ),
            rng.integers(-127, 128, (heads, columns // tile.panel, depth // 4, tile.panel, 4)).astype(
                np.int8
            ),
            np.zeros((heads, columns), np.int32),
            np.ones((heads, queries), np.float32),
            np.ones((heads, columns), np.float32),
            np.zeros(columns, np.float32),
            np.zeros((heads, queries, columns), np.float32),
        ]
        tensors = [tvm.runtime.tensor(o, dev) for o in operands]
        calls[name] = lambda kernel=kernel, tensors=tensors: kernel(*tensors)
    return calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--tiny-unet", action="store_true", help="print tiny-sd15-unet's int8 rewrite counts")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    import tvm

    import edgediff
    from edgediff.passes import mixed_precision
    from edgediff.precision import PrecisionConfig
    from edgediff.tools.bench.quality import host_int8

    spec = host_int8()
    int8_a8 = PrecisionConfig(mode="int8", pins={"*sdpa": "a8"})  # CPU plans keep attention float otherwise
    if args.tiny_unet:
        with tempfile.TemporaryDirectory() as tmp:
            artifact = edgediff.compile_model(
                "tiny-sd15-unet", target=spec, output_dir=f"{tmp}/a", progress=False, precision=int8_a8
            )
        report = {p["name"]: p["report"] for p in artifact.manifest["passes"]}["mixed-precision"]
        for key, count in report["rewritten"].items():
            print(f"{count:>4}  {key}")
        return
    target, dot = int8_host_target(spec, args.threads, args.runs)
    print(
        f"{'heads x q x k x d':<20} {'fp32 ms':>8} {'int8 ms':>8} {'fp32/int8':>9} {'Relax int8':>10} "
        f"{'fp32 unfused':>12} {'QK^T ms':>8} {'PV ms':>7}  kernel sites; max |int8 - fp32|"
    )
    dev = tvm.cpu()
    kernel_attention = mixed_precision._Rewriter._int8_kernel_attention
    for heads, queries, keys, dim in CASES:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, n, dim, generator=gen) for n in (queries, keys, keys))
        calls, outputs, sites = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            variants = (("fp32", None), ("fp32 unfused", None), ("int8", int8_a8), ("Relax int8", int8_a8))
            for name, precision in variants:
                # the previous path: the pass without the attention emitter (this process only)
                mixed_precision._Rewriter._int8_kernel_attention = (
                    (lambda *_: None) if name == "Relax int8" else kernel_attention
                )
                artifact = edgediff.compile_model(
                    _Model().eval(),
                    (q, k, v),
                    target=spec if precision else "host",
                    input_names=("q", "k", "v"),
                    output_dir=f"{tmp}/{name}",
                    progress=False,
                    precision=precision,
                    passes={"fuse-attention": False} if name == "fp32 unfused" else None,
                )
                report = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
                rewritten = report.get("mixed-precision", {}).get("rewritten", {})
                sites[name] = sum(v for key, v in rewritten.items() if "attention matmul int8 kernel" in key)
                run = edgediff.load(artifact.path)
                inputs = [tvm.runtime.tensor(x.numpy(), dev) for x in (q, k, v)]
                calls[name] = lambda run=run, inputs=inputs: run._main(*inputs, *run._weights)
                outputs[name] = run(q, k, v)
            mixed_precision._Rewriter._int8_kernel_attention = kernel_attention
            calls.update(_kernel_calls(heads, queries, keys, dim, target, dev))
            ms = least_cpu_ms(calls, args.runs, args.warmup)
        err = float(np.abs(outputs["int8"] - outputs["fp32"]).max())
        print(
            f"{heads} x {queries} x {keys} x {dim:<6} {ms['fp32']:>8.2f} {ms['int8']:>8.2f} "
            f"{ms['fp32'] / ms['int8']:>9.2f} {ms['Relax int8']:>10.2f} {ms['fp32 unfused']:>12.2f} "
            f"{ms['QK^T']:>8.2f} {ms['PV']:>7.2f}  "
            f"{sites['int8']} of 2; {err:.2e}"
        )


if __name__ == "__main__":
    main()
