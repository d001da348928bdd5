"""Planning time of ``precision="auto"``: the "transfer" sensitivity against the exhaustive "replay" (issue
#14 item 5).

Plans one zoo model with :func:`edgediff.precision.planner.make_plan` (the measurement side of
``edgediff compile --precision auto``, without the TVM build) once per sensitivity method and prints, for
each: wall and process CPU time (all of make_plan, and of its sensitivity stage), the whole-model replays
and model rows the sensitivity ran, the plan's bytes, its predicted SQNR and its measured SQNR (the
``measure_assignment`` check with every layer quantized at once, at the model's full size), and how many
layers got the same format in both plans.

On a full-size model the exhaustive replay takes hours (sd15-unet: 1350 replays); ``--check-layers N``
checks the transfer estimate against the replay on N layers spread over the model instead, at their
candidate formats (the same small-latent calibration the planner measures on).

    .venv/bin/python benchmarks/plan_time.py --model tiny-sd15-unet --target host-int8 --min-sqnr 30
    .venv/bin/python benchmarks/plan_time.py --model sd15-unet --target arm-a78 --max-bytes 1GB \\
        --methods transfer --check-layers 12
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch


def parse_bytes(text: str) -> int:
    from edgediff.precision.assignment import Budget

    return int(Budget.parse({"bytes": text}).bytes)


def target(name: str) -> Any:
    if name == "host-int8":
        from edgediff.tools.bench.quality import host_int8

        return host_int8()
    from edgediff.targets import load_target

    return load_target(name)


class Stages:
    """Wall and process CPU time at each stage message of make_plan's progress callback."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float, float]] = []
        self.last = ""

    def __call__(self, text: str) -> None:
        stage = text.split()[0]
        if stage != self.last:
            self.marks.append((stage, time.perf_counter(), time.process_time()))
            self.last = stage

    def span(self, stage: str, end: tuple[float, float]) -> tuple[float, float]:
        names = [m[0] for m in self.marks]
        i = names.index(stage)
        stop = self.marks[i + 1][1:] if i + 1 < len(self.marks) else end
        return stop[0] - self.marks[i][1], stop[1] - self.marks[i][2]


def plan_once(zm: Any, spec: Any, budget: dict[str, Any], method: str, latent: int | None) -> dict[str, Any]:
    from edgediff.precision import PrecisionConfig
    from edgediff.precision.planner import make_plan

    weights = {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in zm.module.state_dict().items()
    }
    config = PrecisionConfig(budget=budget, sensitivity=method, sensitivity_latent=latent)
    stages = Stages()
    wall, cpu = time.perf_counter(), time.process_time()
    plan = make_plan(
        zm.module, zm.example_inputs, zm.input_names, zm.meta, spec, config, weights=weights, progress=stages
    )
    end = (time.perf_counter(), time.process_time())
    sens_wall, sens_cpu = stages.span("sensitivity", end)
    record = plan.calibration["sensitivity"]
    return {
        "plan": plan,
        "wall_s": end[0] - wall,
        "cpu_s": end[1] - cpu,
        "sensitivity_wall_s": sens_wall,
        "sensitivity_cpu_s": sens_cpu,
        "replays": record["replays"],
        "model_rows": record["model_rows"],
    }


def small_calibration(zm: Any, latent: int | None) -> Any:
    """The planner's small-latent calibration, without the full-size one (only its fallback needs it)."""
    from edgediff.precision import PrecisionConfig
    from edgediff.precision.calibration import calibrate_as_configured
    from edgediff.precision.planner import _sensitivity_calibration

    config = PrecisionConfig(sensitivity_latent=latent)
    notes: list[str] = []
    cal = _sensitivity_calibration(
        zm.module, zm.example_inputs, zm.input_names, zm.meta, config, None, [], notes
    )
    if cal is None:
        cal = calibrate_as_configured(config, zm.module, zm.example_inputs, zm.input_names, zm.meta)
    print(f"calibrated on {tuple(cal.steps[0].inputs[0].shape[-2:])} latents; {'; '.join(notes)}")
    return cal


def transfer_all(zm: Any, spec: Any, latent: int | None, replays: int) -> None:
    """Time the transfer sensitivity of every layer at every candidate format (the planner's stage), and
    ``replays`` replays of the exhaustive measurement (the time it would take is that per replay x pairs)."""
    from edgediff.precision.assignment import candidate_formats
    from edgediff.precision.sensitivity import measure_sensitivity

    cal = small_calibration(zm, latent)
    split = cal.timestep_split()
    scales = {i.name: cal.activation_scales(i.name, split) for i in cal.layers if i.kind != "attention"}
    candidates = {info.name: candidate_formats(info.kind, spec.dtypes) for info in cal.layers}
    pairs = sum(len(f) for f in candidates.values())
    exact_pairs = sum("fp32" in f for f in candidates.values()) if "float32" in spec.dtypes else 0
    wall, cpu = time.perf_counter(), time.process_time()
    result = measure_sensitivity(
        zm.module, cal, candidates, spec.dtypes, scales=scales, timestep_split=split, method="transfer"
    )
    print(
        f"transfer sensitivity of {len(candidates)} layers, {pairs} (layer, format) pairs "
        f"({pairs - exact_pairs} that the replay would replay): {time.perf_counter() - wall:.0f} s wall, "
        f"{time.process_time() - cpu:.0f} s cpu, {result.replays} replays, {result.model_rows} model rows"
    )
    if replays:
        sample: dict[str, list[str]] = {}
        pairs_in = [(n, f) for n, formats in candidates.items() for f in formats if f != "fp32"]
        for name, fmt in pairs_in[:: max(1, len(pairs_in) // replays)][:replays]:  # spread over the model
            sample.setdefault(name, []).append(fmt)
        wall, cpu = time.perf_counter(), time.process_time()
        exact = measure_sensitivity(
            zm.module, cal, sample, spec.dtypes, scales=scales, timestep_split=split, method="replay"
        )
        per_wall = (time.perf_counter() - wall) / exact.replays
        per_cpu = (time.process_time() - cpu) / exact.replays
        todo = pairs - exact_pairs
        print(
            f"replay: {exact.replays} replays at {per_wall:.2f} s wall, {per_cpu:.2f} s cpu each: the "
            f"exhaustive measurement of the {todo} pairs ~{per_wall * todo / 60:.0f} min wall, "
            f"{per_cpu * todo / 60:.0f} min cpu"
        )


def check_layers(
    zm: Any, spec: Any, latent: int | None, count: int, probes: int
) -> list[tuple[str, str, float, float]]:
    """(layer, format, replay SQNR, transfer SQNR) for ``count`` layers spread over the model."""
    from edgediff.precision.assignment import candidate_formats
    from edgediff.precision.sensitivity import measure_sensitivity

    cal = small_calibration(zm, latent)
    split = cal.timestep_split()
    scales = {i.name: cal.activation_scales(i.name, split) for i in cal.layers if i.kind != "attention"}
    picked = [cal.layers[int(i)] for i in np.linspace(0, len(cal.layers) - 1, count).round()]
    candidates = {
        info.name: [f for f in candidate_formats(info.kind, spec.dtypes) if f != "fp32"] for info in picked
    }
    results = {
        method: measure_sensitivity(
            zm.module,
            cal,
            candidates,
            spec.dtypes,
            scales=scales,
            timestep_split=split,
            method=method,
            probes=probes,
        )
        for method in ("replay", "transfer")
    }
    return [
        (layer, fmt, results["replay"].sqnr_db(layer, fmt), results["transfer"].sqnr_db(layer, fmt))
        for layer, fmts in candidates.items()
        for fmt in fmts
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-sd15-unet")
    parser.add_argument("--target", default="host-int8", help="a target name, or host-int8")
    parser.add_argument("--max-bytes", help="byte budget, e.g. 1GB")
    parser.add_argument("--min-sqnr", type=float, help="prediction SQNR budget (dB)")
    parser.add_argument(
        "--methods", nargs="*", default=["transfer", "replay"], choices=["transfer", "replay"]
    )
    parser.add_argument("--sensitivity-latent", type=int, default=16, help="0: at the model's own size")
    parser.add_argument("--check-layers", type=int, default=0, help="replay-vs-transfer check on N layers")
    parser.add_argument(
        "--transfer-all", action="store_true", help="time the transfer sensitivity of all layers alone"
    )
    parser.add_argument("--replay-sample", type=int, default=0, help="with --transfer-all: time N replays")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = parser.parse_args()

    from edgediff import zoo

    if args.threads:
        torch.set_num_threads(args.threads)
    budget: dict[str, Any] = {}
    if args.max_bytes:
        budget["bytes"] = parse_bytes(args.max_bytes)
    if args.min_sqnr is not None:
        budget["sqnr_db"] = args.min_sqnr
    spec = target(args.target)
    zm = zoo.build(args.model)
    latent = args.sensitivity_latent or None
    print(
        f"{args.model} on {spec.name}, budget {budget or 'default'}, torch threads {torch.get_num_threads()}"
    )
    runs = {method: plan_once(zm, spec, budget, method, latent) for method in args.methods}
    if runs:
        print(
            f"{'method':<9} {'wall s':>8} {'cpu s':>8} {'sens wall':>9} {'sens cpu':>9} {'replays':>7} "
            f"{'rows':>6} {'bytes':>13} {'pred dB':>7} {'meas dB':>7}"
        )
    for method, run in runs.items():
        totals = run["plan"].totals
        print(
            f"{method:<9} {run['wall_s']:8.1f} {run['cpu_s']:8.1f} {run['sensitivity_wall_s']:9.1f} "
            f"{run['sensitivity_cpu_s']:9.1f} {run['replays']:7d} {run['model_rows']:6d} "
            f"{totals['bytes']:13,d} "
            f"{totals['predicted_sqnr_db']:7.2f} {totals['measured_sqnr_db']:7.2f}"
        )
        print(f"          formats: {run['plan'].format_counts()}")
    if len(runs) == 2:
        a, b = (runs[m]["plan"].layers for m in ("transfer", "replay"))
        same = sum(x.format == y.format for x, y in zip(a, b, strict=True))
        print(f"layers with the same format in both plans: {same}/{len(a)}")
    if args.transfer_all:
        transfer_all(zm, spec, latent, args.replay_sample)
    if args.check_layers:
        wall, cpu = time.perf_counter(), time.process_time()
        rows = check_layers(zm, spec, latent, args.check_layers, 4)
        gaps = np.array([t - r for _, _, r, t in rows])
        print(
            f"transfer - replay SQNR on {len(rows)} (layer, format) pairs of {args.check_layers} layers: "
            f"mean {gaps.mean():+.2f} dB, mean |gap| {np.abs(gaps).mean():.2f} dB, max |gap| "
            f"{np.abs(gaps).max():.2f} dB ({time.perf_counter() - wall:.0f} s wall, "
            f"{time.process_time() - cpu:.0f} s cpu)"
        )
        for layer, fmt, exact, estimate in rows:
            print(f"  {layer:<70} {fmt:<11} replay {exact:7.2f}  transfer {estimate:7.2f}")


if __name__ == "__main__":
    main()
