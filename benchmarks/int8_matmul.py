"""int8 GEMM kernel vs edgediff's fp32 Linear and onnxruntime (fp32 and its dynamic int8), SD 1.5 shapes.

The int8 kernel (edgediff/kernels/int8_matmul.py) is built for this host's instruction: ``vpdpbusd`` where
the CPU has AVX512-VNNI, ``sdot`` on aarch64 with dotprod, else the portable vector path (exact but with no
dot-product instruction: widening int32 multiplies). It is timed with its dequantize epilogue (per-row
activation scale x per-column weight scale + bias, float32 out) on already-quantized activations; the
per-token activation quantization is a separate kernel not timed here. edgediff fp32 is ``nn.Linear``
compiled with the default host pipeline (packed weights, register-tiled matmul). Engines take turns call
by call; the figure is the least process CPU time of ``--runs`` calls (``--threads 1``: a quiet core).

    PYTHONPATH=. .venv/bin/python benchmarks/int8_matmul.py --threads 1 --runs 15
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch

# SD 1.5 Linear layers at latent 32x32: tokens x in -> out (attention projections, FF down, GEGLU up)
CASES = [
    (1024, 320, 320),
    (1024, 1280, 320),
    (1024, 320, 2560),
    (256, 640, 640),
    (64, 1280, 1280),
    (64, 5120, 1280),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)

    import tvm

    import edgediff
    from edgediff.kernels.int8_matmul import KERNEL_NAME, as_activation, build_int8_matmul, pack_int8_weight
    from edgediff.targets import load_target
    from edgediff.tools.bench.measure import time_alternating

    target = load_target("host").build_target()
    print(
        f"host target {target.attrs.get('mcpu', 'generic')}; {args.threads} thread(s); "
        f"least CPU time of {args.runs}"
    )
    header = f"{'M x K -> N':<22} {'fp32 ms':>8} {'int8 ms':>8} {'fp32/int8':>9} {'ort fp32':>9}"
    header += f" {'ort int8':>9}  instr"
    print(header)
    dev = tvm.cpu()
    for rows, depth, columns in CASES:
        torch.manual_seed(0)
        linear = torch.nn.Linear(depth, columns).eval()
        x = torch.randn(1, rows, depth)
        calls = {}
        with tempfile.TemporaryDirectory() as tmp:
            artifact = edgediff.compile_model(linear, (x,), output_dir=f"{tmp}/a", progress=False)
            run = edgediff.load(artifact.path)
            x_tvm = tvm.runtime.tensor(x.numpy(), dev)
            calls["fp32"] = lambda run=run, x_tvm=x_tvm: run._main(x_tvm, *run._weights)

            mod, dot, tile = build_int8_matmul(rows, depth, columns, target, epilogue="dequantize")
            ex = tvm.compile(mod, target)
            w = linear.weight.detach().numpy().T  # [K, N]
            w_scale = np.maximum(np.abs(w).max(axis=0) / 127, 1e-8).astype(np.float32)
            wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int8)
            xs = x.numpy()[0]
            a_scale = np.maximum(np.abs(xs).max(axis=1) / 127, 1e-8).astype(np.float32)
            q = np.clip(np.rint(xs / a_scale[:, None]), -127, 127).astype(np.int8)
            packed, comp = pack_int8_weight(wq, tile.panel, dot.compensated)
            comp = comp if comp is not None else np.zeros(columns, np.int32)
            bias = linear.bias.detach().numpy().astype(np.float32)
            operands = [as_activation(q, dot), packed, comp, a_scale, w_scale, bias]
            operands = [tvm.runtime.tensor(o, dev) for o in operands]
            out = tvm.runtime.tensor(np.zeros((rows, columns), np.float32), dev)
            kernel = ex[KERNEL_NAME]
            calls["int8"] = lambda kernel=kernel, operands=operands, out=out: kernel(*operands, out)
            kernel(*operands, out)
            err = np.abs(out.numpy() - linear(x).detach().numpy()[0]).max()

            ort = _ort_sessions(linear, x, tmp, args.threads)
            feed = {"x": x.numpy()}
            for name, session in ort.items():
                calls[name] = lambda session=session, feed=feed: session.run(None, feed)
            times = {
                k: min(v) for k, v in time_alternating(calls, args.runs, args.warmup, cpu_time=True).items()
            }
        ms = {k: v * 1e3 for k, v in times.items()}
        ort_fp32 = f"{ms['ort fp32']:>9.3f}" if "ort fp32" in ms else f"{'-':>9}"
        ort_int8 = f"{ms['ort int8']:>9.3f}" if "ort int8" in ms else f"{'-':>9}"
        print(
            f"{rows} x {depth} -> {columns:<8} {ms['fp32']:>8.3f} {ms['int8']:>8.3f} "
            f"{ms['fp32'] / ms['int8']:>9.2f} "
            f"{ort_fp32} {ort_int8}  {dot.name} (max |int8 - torch| {err:.2e})"
        )


def _ort_sessions(linear: torch.nn.Module, x: torch.Tensor, tmp: str, threads: int) -> dict[str, object]:
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        return {}
    path = f"{tmp}/m.onnx"
    torch.onnx.export(linear, (x,), path, input_names=["x"], dynamo=False)
    quantize_dynamic(path, f"{tmp}/m8.onnx", weight_type=QuantType.QInt8, per_channel=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return {
        name: ort.InferenceSession(p, options, providers=["CPUExecutionProvider"])
        for name, p in (("ort fp32", path), ("ort int8", f"{tmp}/m8.onnx"))
    }


if __name__ == "__main__":
    main()
