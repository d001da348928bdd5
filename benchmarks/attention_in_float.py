"""int8 builds of sd15-unet with attention as a8 or kept in float (pins), against fp32, timed in turns.

Compiles the zoo's sd15-unet (random weights) at ``--latent`` for this host with int8 added (the bench's
``host_int8``) four ways: fp32; ``int8`` with every attention layer pinned to ``a8`` (the int8 attention
matmuls around a float softmax); int8 with the self-attention (``attn1``) layers pinned to fp32; int8 with
all attention pinned to fp32 (the fused float attention kernel). The builds take turns call by call, one
thread; each figure is the least process CPU time of ``--runs`` calls after ``--warmup``.

    PYTHONPATH=. .venv/bin/python benchmarks/attention_in_float.py
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"

    import numpy as np
    import torch

    import edgediff
    from edgediff import zoo
    from edgediff.precision import PrecisionConfig
    from edgediff.tools.bench.measure import time_alternating
    from edgediff.tools.bench.quality import host_int8

    torch.set_num_threads(1)
    zm = zoo.build("sd15-unet", latent_size=args.latent)
    inputs = tuple(np.ascontiguousarray(x.numpy()) for x in zm.example_inputs)
    builds = {
        "fp32": None,
        "int8 (attention a8)": PrecisionConfig(mode="int8", pins={"*.sdpa": "a8"}),
        "int8 self-attn float": PrecisionConfig(mode="int8", pins={"*.attn1.sdpa": "fp32"}),
        "int8 attn float": PrecisionConfig(mode="int8", pins={"*.sdpa": "fp32"}),
    }
    modules = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, precision) in enumerate(builds.items()):
            artifact = edgediff.compile_model(
                zm, target=host_int8(), precision=precision, output_dir=f"{tmp}/{i}", progress=False
            )
            modules[name] = artifact.load()
            print(f"compiled {name}", flush=True)
        calls = {name: (lambda m=m: m(*inputs)) for name, m in modules.items()}
        times = time_alternating(calls, args.runs, args.warmup, cpu_time=True)
    for name in builds:
        best, median = min(times[name]), sorted(times[name])[len(times[name]) // 2]
        ratio = min(times["fp32"]) / best
        print(f"{name:<24} min {best:.3f} s  median {median:.3f} s  fp32/build {ratio:.2f}")


if __name__ == "__main__":
    main()
