"""Size and quality of precision plans: fp32, fp16, uniform int8 (weight-only and w8a8), int4, a fixed rule
and auto.

For each model and plan: the weights size, the prediction SQNR the planner measured, and the PSNR of the
final latents of a 20-step DPM-Solver++ trajectory (``--sampler``, ``--steps``) against the float PyTorch
model on the same seed (the error as it accumulates over sampling). ``edges`` is the fixed rule of the
deployment papers: int8 weights everywhere except the first and last layer, kept in float16. ``auto`` gets
the ``edges`` size as its byte budget, so its row shows what measured, per-layer choice buys at equal size.

Default: the tiny zoo models, compiled for this machine (the ``host`` spec with int8 added, so int8
artifacts run here) and run through the compiled artifacts. ``--torch-only`` skips TVM and measures the
plans with fake quantization in PyTorch (sizes are computed exactly from the weight shapes): the way to get
numbers for the full-size models on a small machine, at a reduced latent size.

    .venv/bin/python benchmarks/precision.py [--models tiny-sd15-unet tiny-dit] [--steps 20]
    .venv/bin/python benchmarks/precision.py --torch-only --models dit-xl-2 sd15-unet --latent-size 8
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.tools.bench.quality import host_int8, psnr, torch_denoiser, trajectory  # noqa: E402

PLANS = ("fp32", "fp16", "w8", "int8", "w4", "edges", "auto")  # auto last: its budget is the edges size


def request(plan: str, edges: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, dict[str, str]]:
    """(precision mode, budget, pins) of a plan; ``edges`` holds what the earlier plans found: the first and
    last layer (from the w8 plan) and the size of the edges plan."""
    if plan == "fp32":
        return None, None, {}
    if plan == "edges":
        return "w8", None, {edges["first"]: "fp16", edges["last"]: "fp16"}
    if plan == "auto":
        return "auto", {"bytes": edges["bytes"]}, {}
    return plan, None, {}


def note_edges(plan: str, layers: list[dict[str, Any]], size: int, edges: dict[str, Any]) -> None:
    """Remember the first and last weighted layer (from the w8 plan) and the edges plan's size."""
    if plan == "w8":
        weighted = [layer["name"] for layer in layers if layer.get("weight")]
        edges.update(first=weighted[0], last=weighted[-1])
    if plan == "edges":
        edges["bytes"] = size


def compiled_rows(name: str, sampling: tuple[str, int], spec: Any, root: Path) -> list[dict[str, Any]]:
    from edgediff import compile_model, zoo
    from edgediff.precision import PrecisionConfig

    zm = zoo.build(name)
    reference = trajectory(torch_denoiser(zm), zm, sampling, seed=0)
    rows: list[dict[str, Any]] = []
    edges: dict[str, Any] = {}
    for plan in PLANS:
        mode, budget, pins = request(plan, edges)
        start = time.perf_counter()
        artifact = compile_model(
            name, target=spec, output_dir=root / f"{name}-{plan}", progress=False,
            precision=None if mode is None else PrecisionConfig(mode=mode, budget=budget, pins=pins),
        )  # fmt: skip
        seconds = time.perf_counter() - start
        module = artifact.load()
        latents = trajectory(lambda x, t, m=module: m(x, t, *zm.example_inputs[2:]), zm, sampling, seed=0)
        size = artifact.manifest["weights"]["bytes"]
        report = {p["name"]: p["report"] for p in artifact.manifest["passes"]}.get("mixed-precision")
        if report:
            note_edges(plan, report["plan"]["layers"], size, edges)
        totals = report["plan"]["totals"] if report else {}
        rows.append(_row(name, plan, size, psnr(latents, reference), totals, seconds, report))
    return rows


def torch_rows(
    name: str, sampling: tuple[str, int], spec: Any, latent_size: int | None
) -> list[dict[str, Any]]:
    from edgediff import zoo
    from edgediff.precision import PrecisionConfig, PrecisionPlan
    from edgediff.precision.planner import make_plan
    from edgediff.precision.sensitivity import FakeQuant

    zm = zoo.build(name, latent_size=latent_size)
    weights = {
        k: (tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in zm.module.state_dict().items()
    }
    reference = trajectory(torch_denoiser(zm), zm, sampling, seed=0)
    fp32_bytes = sum(-(-int(np.prod(s)) * 4 // 64) * 64 for s, _ in weights.values())
    rows = [_row(name, "fp32", fp32_bytes, float("inf"), {}, 0.0, None)]
    edges: dict[str, Any] = {}
    for plan_name in PLANS[1:]:
        mode, budget, pins = request(plan_name, edges)
        start = time.perf_counter()
        config = PrecisionConfig(mode=mode, budget=budget, pins=pins, keep=2, seeds=(0,))
        plan: PrecisionPlan = make_plan(
            zm.module, zm.example_inputs, zm.input_names, zm.meta, spec, config, weights=weights
        )
        seconds = time.perf_counter() - start
        scales = {layer.name: layer.scales for layer in plan.layers if layer.scales}
        formats = {layer.name: layer.format for layer in plan.layers}
        with FakeQuant(zm.module, formats, plan.dtypes, scales, plan.timestep_split) as fake:
            latents = trajectory(torch_denoiser(zm, fake), zm, sampling, seed=0)
        report = {"plan": plan.to_dict()}
        note_edges(plan_name, report["plan"]["layers"], plan.totals["bytes"], edges)
        rows.append(
            _row(
                name, plan_name, plan.totals["bytes"], psnr(latents, reference), plan.totals, seconds, report
            )
        )
    return rows


def _row(model, plan, size, latent_psnr, totals, seconds, report) -> dict[str, Any]:
    counts = ""
    if report:
        counts = ", ".join(f"{n} {f}" for f, n in sorted(_counts(report["plan"]["layers"]).items()))
    return {
        "model": model,
        "plan": plan,
        "bytes": size,
        "psnr": latent_psnr,
        "sqnr": totals.get("measured_sqnr_db"),
        "latency_ms": totals.get("latency_s", 0) * 1e3 if totals else None,
        "seconds": seconds,
        "formats": counts,
    }


def _counts(layers: list[dict[str, Any]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for layer in layers:
        counts[layer["format"]] = counts.get(layer["format"], 0) + 1
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny-sd15-unet", "tiny-dit"])
    parser.add_argument("--sampler", default="dpmpp-2m", help="sampler of the trajectory (default dpmpp-2m)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--torch-only", action="store_true", help="measure in PyTorch, no TVM build")
    parser.add_argument("--latent-size", type=int, help="(--torch-only) smaller latents for full-size models")
    parser.add_argument("--output", help="where artifacts go (default: a temporary directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    spec = host_int8()
    root = Path(args.output or tempfile.mkdtemp(prefix="edgediff-precision-"))
    sampling = (args.sampler, args.steps)
    print(f"target {spec.name}; {args.steps}-step {args.sampler}, seed 0; latent PSNR against float torch")
    header = f"{'model':<16} {'plan':<5} {'weights':>12} {'of fp32':>8} {'PSNR dB':>8} {'SQNR dB':>8}"
    print(f"{header} {'s':>6}  formats")
    for name in args.models:
        rows = torch_rows(name, sampling, spec, args.latent_size) if args.torch_only else None
        rows = rows or compiled_rows(name, sampling, spec, root)
        base = rows[0]["bytes"]
        for r in rows:
            sqnr = f"{r['sqnr']:8.1f}" if r["sqnr"] is not None else f"{'-':>8}"
            print(
                f"{r['model']:<16} {r['plan']:<5} {r['bytes']:>12,} {r['bytes'] / base:>8.1%} "
                f"{r['psnr']:>8.1f} {sqnr} {r['seconds']:>6.1f}  {r['formats']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
