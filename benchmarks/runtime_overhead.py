"""Runtime overhead of the sampler loop: time per step outside the compiled denoiser, per sampler.

Issue #3's goal: under 2% of the step time for the tiny UNet. Compiles tiny-sd15-unet (batch 2, one-call
CFG) for the host, runs each sampler for 20 steps and prints the share of step time spent outside the model.

    .venv/bin/python benchmarks/runtime_overhead.py [--steps 20] [--output DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

GOAL = 0.02


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", help="where to compile the artifact (default: a temporary directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)

    from edgediff import compile_model
    from edgediff.runtime.pipeline import Pipeline
    from edgediff.runtime.samplers import list_samplers

    root = Path(args.output or tempfile.mkdtemp(prefix="edgediff-overhead-"))
    compile_model("tiny-sd15-unet", target="host", batch=2, output_dir=root / "denoiser", progress=False)
    pipeline = Pipeline.from_artifacts(root / "denoiser")
    shape = (1, *pipeline.conditioning[0].shape[1:])
    cond = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    negative = np.zeros(shape, np.float32)

    print(f"tiny-sd15-unet, batch-2 CFG, {args.steps} steps; goal: overhead < {GOAL:.0%} of step time")
    print(f"{'sampler':<11} {'step ms':>9} {'model ms':>9} {'overhead':>9}")
    worst = 0.0
    for name in list_samplers():
        if name == "flow-euler":  # needs a flow model; the tiny UNet predicts epsilon
            continue
        steps = min(args.steps, 8) if name == "lcm" else args.steps
        result = pipeline.generate(cond, negative=negative, sampler=name, steps=steps, decode=False)
        timings = result.timings
        worst = max(worst, timings.runtime_overhead)
        print(
            f"{name:<11} {1e3 * np.median(timings.steps):9.2f} {1e3 * np.median(timings.model):9.2f} "
            f"{100 * timings.runtime_overhead:8.2f}%"
        )
    print(f"worst overhead {100 * worst:.2f}% -> {'meets' if worst < GOAL else 'MISSES'} the {GOAL:.0%} goal")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
