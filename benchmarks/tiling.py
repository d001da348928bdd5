"""DRAM traffic per denoising step (or decode) of model-level tiling, per model block: op-by-op execution
(every op's inputs and outputs through DRAM), fused regions run untiled, the tiled NPU program (simulated),
and the weight-streaming floor (each weight read once, plus the model's inputs and output).

The analysis needs shapes only: the full-size model is captured and imported (random weights, about 45 s
and 4 GB for sd15-unet) and its op-level graph is planned and simulated without running anything. Defaults:
sd15-unet at latent 64 and the SD VAE decoder at latent 64 (512 x 512 image), float16, on ``ane-like``
(4 MiB SRAM). ``--sram`` plans for other SRAM sizes (e.g. ``--sram 4MiB 2MiB 1MiB``); ``--l2-target``
also plans a CPU target with its L2 cache as the scratchpad (the pass option ``memory_level="l2"``).

    python benchmarks/tiling.py
    python benchmarks/tiling.py --models sd15-unet --sram 4MiB 1MiB 256KiB --l2-target arm-a78
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "kb": 1000, "mib": 1 << 20, "mb": 1000**2}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size such as 4MiB or 262144, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def op_level_module(model: str, latent: int, target: Any) -> Any:
    """The model's Relax module as the NPU pipeline has it before ``npu-tiling`` (shapes; no build)."""
    from edgediff import zoo
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes import default_pipeline
    from edgediff.passes.runner import run_passes

    zm = zoo.build(model, latent_size=latent)
    imported = import_to_relax(capture(zm))
    before = [p for p in default_pipeline(target) if p in ("decompose-for-inference", "cast-to-fp16")]
    mod, _ = run_passes(imported.mod, target, before)
    return mod


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["sd15-unet", "sd-vae-decoder"])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--target", default="ane-like")
    parser.add_argument("--sram", nargs="+", type=parse_bytes, default=None, help="SRAM sizes to plan for")
    parser.add_argument(
        "--l2-target", default=None, help="also plan this CPU target with its L2 as scratchpad"
    )
    parser.add_argument("--blocks", action="store_true", help="the per-block table for every SRAM size")
    args = parser.parse_args()

    from edgediff.npu import memory_budget, plan_model
    from edgediff.npu.tile_planner import SramTooSmallError
    from edgediff.npu.tiling_report import render_text
    from edgediff.precision.assignment import format_bytes
    from edgediff.targets import load_target

    target = load_target(args.target)
    sizes = args.sram or [target.memory.sram_bytes]
    summary = []
    for model in args.models:
        start = time.perf_counter()
        mod = op_level_module(model, args.latent, target)
        prepared = time.perf_counter() - start
        plans = [(target, sram, "sram") for sram in sizes]
        if args.l2_target:
            cpu = load_target(args.l2_target)
            plans.append((cpu, memory_budget(cpu, "l2"), "l2"))
        for index, (spec, sram, level) in enumerate(plans):
            start = time.perf_counter()
            try:
                plan = plan_model(mod, spec, sram)
            except SramTooSmallError as err:
                print(f"\n== {model}, {spec.name} ({level} {format_bytes(sram)}): {err}")
                continue
            planned = time.perf_counter() - start
            if index == 0 or args.blocks:
                print(f"\n== {model} @ latent {args.latent}, {spec.name} ({level} {format_bytes(sram)}); "
                      f"capture + import {prepared:.0f} s, plan + simulate {planned:.1f} s")  # fmt: skip
                print(render_text(plan.analysis).split("\nregions whose")[0].rstrip())
            t = plan.analysis.total()
            largest = max((g.plan["working_set"] for g in plan.groups if g.plan), default=0)
            summary.append((model, f"{spec.name} {level}", sram, t, largest))
    print(
        "\n== summary (DRAM bytes per call; ratio = op-by-op / tiled; floor = each weight once + model I/O)"
    )
    header = (
        f"{'model':<15} {'target':<14} {'SRAM':>9} {'op-by-op':>9} {'fused':>9} {'tiled':>9} {'ratio':>6} "
        f"{'floor':>9} {'tiled/floor':>11} {'SRAM peak':>9} {'max tile':>9} {'est. ms':>8}"
    )
    print(header)
    print("-" * len(header))
    for model, where, sram, t, largest in summary:
        print(
            f"{model:<15} {where:<14} {format_bytes(sram):>9} {format_bytes(t.op_by_op):>9} "
            f"{format_bytes(t.fused):>9} {format_bytes(t.tiled):>9} {t.op_by_op / max(1, t.tiled):>5.2f}x "
            f"{format_bytes(t.floor):>9} {t.tiled / max(1, t.floor):>10.2f}x {format_bytes(t.sram_peak):>9} "
            f"{format_bytes(largest):>9} {t.seconds * 1e3:>8.1f}"
        )


if __name__ == "__main__":
    main()
