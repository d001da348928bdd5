"""A ``bf16`` Linear layer on the bf16 GEMM kernel vs the same layer on the Relax bf16 matmul and in fp32.

Each case is an ``nn.Linear`` on ``[1, tokens, in]`` compiled three ways for this host with bfloat16 listed
in its dtypes (as a host with AVX512-BF16 lists it): ``fp32`` (the default pipeline: packed weights,
register-tiled float32 matmul), ``bf16 kernel`` (``--precision bf16``: the bf16 GEMM of
edgediff/kernels/bf16_matmul.py, ``vdpbf16ps`` where the CPU has AVX512-BF16, else its portable path that
widens each bfloat16 to float32 in registers) and ``bf16 Relax`` (the same build with the kernel switched
off: TVM's bfloat16 matmul, legalized to float32 arithmetic). Engines take turns call by call; the figure
is the least process CPU time of ``--runs`` calls (``--threads 1``: the cost on a quiet core). ``err``:
max |out - torch fp32| / max |torch fp32|.

    PYTHONPATH=. .venv/bin/python benchmarks/bf16_linear.py --threads 1 --runs 15
"""

from __future__ import annotations

import argparse
import os
import tempfile
from unittest import mock

import numpy as np
import torch


def _host_bf16() -> object:
    """The host spec with bfloat16 in its dtypes (its bfloat16 throughput, 2x float32, is an assumption)."""
    from edgediff.targets import load_target
    from edgediff.targets.spec import TargetSpec

    data = load_target("host").to_dict()
    data.update(name="host-bf16", dtypes=[*[d for d in data["dtypes"] if d != "bfloat16"], "bfloat16"])
    data["compute"]["peak_gflops"].setdefault("bfloat16", 2 * data["compute"]["peak_gflops"]["float32"])
    return TargetSpec.from_dict(data)


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
    from benchmarks.int8_matmul import CASES  # SD 1.5 Linear layers at latent 32x32, as for int8
    from benchmarks.kernel_speed import least_cpu_ms
    from edgediff.passes import mixed_precision

    spec = _host_bf16()
    emitter = mixed_precision._bf16_emitter(spec)
    print(
        f"host target {spec.build_target().attrs.get('mcpu', 'generic')}; bf16 kernel path: {emitter.name}; "
        f"{args.threads} thread(s); least CPU time of {args.runs}"
    )
    print(f"{'M x K -> N':<22} {'fp32 ms':>8} {'kernel ms':>10} {'Relax ms':>9} {'fp32/kernel':>11}", end="")
    print(f" {'Relax/kernel':>12} {'err kernel':>10} {'err Relax':>9}")
    dev = tvm.cpu()
    for rows, depth, columns in CASES:
        torch.manual_seed(0)
        # in a container: the precision planner finds layers by their module names
        linear = torch.nn.Sequential(torch.nn.Linear(depth, columns)).eval()
        x = torch.randn(1, rows, depth)
        with torch.no_grad():
            want = linear(x).numpy()
        calls, errors = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            # (name, spec, precision, bf16 kernel on): the Relax build switches the kernel off
            for name, target, precision, kernel in (
                ("fp32", "host", None, True),
                ("kernel", spec, "bf16", True),
                ("Relax", spec, "bf16", False),
            ):
                emitter = mixed_precision._bf16_emitter if kernel else (lambda spec: None)
                with mock.patch.object(mixed_precision, "_bf16_emitter", emitter):
                    artifact = edgediff.compile_model(
                        linear, (x,), target=target, output_dir=f"{tmp}/{name}", progress=False,
                        precision=precision,
                    )  # fmt: skip
                _add(calls, errors, name, edgediff.load(artifact.path), x, want, dev)
            ms = least_cpu_ms(calls, args.runs, args.warmup)
        print(
            f"{rows} x {depth} -> {columns:<8} {ms['fp32']:>8.3f} {ms['kernel']:>10.3f} {ms['Relax']:>9.3f} "
            f"{ms['fp32'] / ms['kernel']:>11.2f} {ms['Relax'] / ms['kernel']:>12.2f} "
            f"{errors['kernel']:>10.1e} {errors['Relax']:>9.1e}"
        )


def _add(calls: dict, errors: dict, name: str, run: object, x: torch.Tensor, want: np.ndarray, dev) -> None:
    """The VM function itself on a TVM tensor made once (not CompiledModule's per-call input copy)."""
    import tvm

    x_tvm = tvm.runtime.tensor(x.numpy(), dev)
    calls[name] = lambda: run._main(x_tvm, *run._weights)
    errors[name] = float(np.abs(run(x) - want).max() / np.abs(want).max())


if __name__ == "__main__":
    main()
