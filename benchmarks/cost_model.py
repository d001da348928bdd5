"""The planner's latency estimate against the measured time of the artifact it produces.

Compiles a zoo model with a uniform precision (default ``fp32``, so the precision planner runs and writes
its ``latency_s`` estimate into the plan) for a target - typically the host YAML written by
``edgediff calibrate-target --target host``, so that the estimate uses measured kernel throughput - then
times the artifact here (least process CPU time of ``--runs`` calls on one kernel thread) and prints the
estimate of the planned layers, the measured time and their ratio. The issue's goal: within 25%.

    python -m edgediff calibrate-target --target host --output edgediff-out/targets/host-measured.yaml
    nice -n 10 env TVM_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python benchmarks/cost_model.py \\
        --target edgediff-out/targets/host-measured.yaml --model sd15-unet --latent 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

# Timing on one kernel thread: must be set before TVM's thread pool starts.
os.environ.setdefault("TVM_NUM_THREADS", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="host", help="target name or YAML (with a measured block)")
    parser.add_argument("--model", default="sd15-unet")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--precision", default="fp32", help="uniform format to plan and build")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output-dir", type=Path, help="keep the artifact here (default: a temp dir)")
    args = parser.parse_args()

    import torch

    import edgediff
    from edgediff import zoo
    from edgediff.precision import PrecisionConfig, PrecisionPlan
    from edgediff.targets import CostModel, load_target
    from edgediff.tools.bench import time_calls

    torch.set_num_threads(1)
    spec = load_target(args.target)
    zm = zoo.build(args.model, latent_size=args.latent)
    config = PrecisionConfig(mode=args.precision, num_steps=1, keep=1, seeds=(0,), timestep_aware=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.output_dir or Path(tmp) / "artifact"
        start = time.perf_counter()
        artifact = edgediff.compile_model(zm, target=spec, output_dir=out, progress=True, precision=config)
        compile_s = time.perf_counter() - start
        passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
        plan = PrecisionPlan.from_dict(passes["mixed-precision"]["plan"])
        module = edgediff.load(artifact.path)
        inputs = [x.numpy() for x in zm.example_inputs]
        measured = time_calls(lambda: module(*inputs), args.runs, 1, cpu_time=True)
    estimate = plan.totals["latency_s"]
    formats = sorted({layer.format for layer in plan.layers})
    print(f"target {spec.name} ({spec.source}); {CostModel(spec).sources_note(formats)}")
    print(f"compile {compile_s:.0f} s wall; {len(plan.layers)} planned layers at {', '.join(formats)}")
    print(f"estimate (planned layers) {estimate * 1e3:.1f} ms")
    print(f"measured (whole artifact, least CPU time of {args.runs}, 1 thread) {measured * 1e3:.1f} ms")
    print(f"estimate / measured {estimate / measured:.3f}")


if __name__ == "__main__":
    main()
