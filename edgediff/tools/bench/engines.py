"""``edgediff bench --peers ... --precisions ...``: every engine a user could pick for one model, timed call
by call in turns in one process, with the quality each one gives.

Engines: PyTorch eager, edgediff's host build (fp32), edgediff's low-precision builds (``--precisions``,
on the host spec with int8 added), and the peers (``--peers``: onnxruntime fp32 and int8, OpenVINO fp32
and at its default precision). Each round every engine makes one call, so the drift of a shared machine
hits all alike; min and median are reported, and the ratio of edgediff fp32's min to each engine's. Quality:
for a denoiser, the PSNR of the final latents of a 20-step DPM-Solver++ trajectory (``--psnr-steps``) against
float PyTorch from the same noise; for a decoder, the PSNR of one output against eager.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.tools.bench.measure import time_alternating
from edgediff.tools.bench.peers import Peer, make_peer, prepare_files
from edgediff.tools.bench.quality import host_int8, psnr, torch_denoiser, trajectory

DENOISER_FAMILIES = ("unet", "dit", "pixart", "sana")


@dataclass
class EngineRow:
    """One engine on one model: seconds per call and the quality it reaches."""

    model: str
    latent: int
    engine: str
    precision: str
    seconds: list[float]
    psnr_db: float | None = None

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def bench_engines(name: str, latent: int | None, args: argparse.Namespace, workdir: Path) -> list[EngineRow]:
    """Build every engine for zoo model ``name``, time them in turns and measure their quality."""
    import torch

    import edgediff
    from edgediff import zoo

    zm = zoo.build(name, latent_size=latent)
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    inputs = tuple(np.ascontiguousarray(x.numpy()) for x in zm.example_inputs)

    def eager(values: tuple[np.ndarray, ...]) -> np.ndarray:
        with torch.inference_mode():
            return zm.module(*(torch.from_numpy(v) for v in values)).numpy()

    engines = [Peer("eager", eager, "fp32")]
    prepare_files(args.peers, zm, workdir)
    builds = [("edgediff", None, "host")] + [(f"edgediff {p}", p, host_int8()) for p in args.precisions]
    for label, precision, target in builds:
        print(f"  compiling {label}", flush=True)
        artifact = edgediff.compile_model(
            zm,
            target=target,
            precision=precision,
            output_dir=workdir / f"{name}-{latent}-{precision or 'fp32'}",
            progress=False,
        )
        module = artifact.load()
        engines.append(Peer(label, lambda values, m=module: np.asarray(m(*values)), precision or "fp32"))
    for peer in args.peers:
        print(f"  preparing {peer}", flush=True)
        engines.append(make_peer(peer, zm, workdir, threads))

    calls = {engine.name: (lambda e=engine: e.run(inputs)) for engine in engines}
    times = time_alternating(calls, args.runs, args.warmup, args.cpu_time)
    latent_size = int(zm.meta.get("latent_size", latent or 0))
    rows = [EngineRow(name, latent_size, e.name, e.precision, times[e.name]) for e in engines]
    if args.psnr_steps:
        _measure_quality(zm, engines, rows, inputs, args.psnr_steps)
    return rows


def _measure_quality(
    zm: Any, engines: list[Peer], rows: list[EngineRow], inputs: tuple[np.ndarray, ...], steps: int
) -> None:
    if zm.family in DENOISER_FAMILIES:
        sampling = ("dpmpp-2m", steps)
        reference = trajectory(torch_denoiser(zm), zm, sampling)
        rest = inputs[2:]

        def result(engine: Peer) -> np.ndarray:
            return trajectory(lambda x, t: engine.run((x, t, *rest)), zm, sampling)
    else:
        reference = engines[0].run(inputs)

        def result(engine: Peer) -> np.ndarray:
            return engine.run(inputs)

    for engine, row in zip(engines, rows, strict=True):
        if engine.name != "eager":
            row.psnr_db = psnr(result(engine), reference)


def format_engine_table(rows: list[EngineRow], psnr_steps: int) -> str:
    """The engines as a Markdown table, ratios against edgediff fp32 of the same model and size."""
    quality = f"{psnr_steps}-step latent PSNR dB" if psnr_steps else "PSNR dB"
    lines = [
        f"| model | latent | engine | computes in | min s | median s | edgediff fp32 / engine | {quality} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    base = {(r.model, r.latent): r.best for r in rows if r.engine == "edgediff"}
    for r in rows:
        ratio = base[(r.model, r.latent)] / r.best
        if r.psnr_db is None:
            q = "-"
        else:
            q = "exact" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f}"
        lines.append(
            f"| {r.model} | {r.latent} | {r.engine} | {r.precision} | {r.best:.4g} | {r.median:.4g} "
            f"| {ratio:.2f} | {q} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``edgediff bench --peers/--precisions``: the engine table for each model."""
    import tempfile

    from edgediff.tools.bench.measure import machine_line
    from edgediff.tools.bench.models import model_runs

    runs, threads = model_runs(args)
    args.threads = threads
    timing = "CPU time" if args.cpu_time else "wall time"
    print(
        f"machine: {machine_line(threads)}; {args.runs} rounds of one call per engine in turn ({timing}) "
        f"after {args.warmup} warm-up",
        flush=True,
    )
    rows: list[EngineRow] = []
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-engines-") as tmp:
        for name, latent in runs:
            print(f"{name} latent {latent or 'default'}", flush=True)
            rows += bench_engines(name, latent, args, Path(tmp))
    table = format_engine_table(rows, args.psnr_steps)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0
