"""``edgediff bench --resolutions``: one multi-resolution artifact against builds specialised for each size.

For each model: one artifact compiled with ``resolutions=`` and one ordinary build per resolution, then per
resolution the median latency of both on the same inputs, timed alternately (multi, specialised, multi,
...) so that a machine shared with other work slows both alike; then the artifact sizes. The goal (issue #9)
is a ratio within 10% and a ``weights.bin`` no larger than a single build's.

    edgediff bench --resolutions 256x256,384x256                 # sd15-unet-half (below) at two sizes
    edgediff bench --resolutions 128x128,192x128 --quick          # tiny-sd15-unet, 3 runs
    edgediff bench --resolutions 512x512,768x512 --models sd15-unet

``sd15-unet-half``: the SD 1.5 UNet's architecture at half its channel widths (160-320-640-640, 216 M
parameters instead of 860 M): every layer kind and the real depth, at a quarter of the compute and memory,
so that it runs on a small shared machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.tools.bench.measure import machine_line, median_alternating

HALF_SD15 = "sd15-unet-half"


@dataclass
class SizeRow:
    """One model at one resolution: seconds per call of the multi-resolution and the specialised build."""

    model: str
    resolution: tuple[int, int]
    latent: tuple[int, int]
    multi: float = 0.0
    specialised: float = 0.0
    max_abs_diff: float = 0.0


@dataclass
class SizeRecord:
    """Bytes of each artifact of one model."""

    model: str
    multi: dict[str, int] = field(default_factory=dict)  # "library", "weights"
    specialised: dict[str, dict[str, int]] = field(default_factory=dict)  # resolution -> bytes
    compile_seconds: dict[str, float] = field(default_factory=dict)


def build_model(name: str) -> Any:
    """A zoo model, or ``sd15-unet-half``."""
    from edgediff import zoo

    if name != HALF_SD15:
        return zoo.build(name)
    import torch
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in zoo.SD15_UNET_CONFIG.items() if not k.startswith("_")}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**{**config, "block_out_channels": [160, 320, 640, 640]})
    return zoo.wrap(unet, name=HALF_SD15)


def bench_model(
    name: str, sizes: list[tuple[int, int]], args: argparse.Namespace, workdir: Path
) -> tuple[list[SizeRow], SizeRecord]:
    import edgediff
    from edgediff.frontend.multires import format_resolution, latent_of, resolution_inputs

    zm = build_model(name)
    record = SizeRecord(name)
    start = time.perf_counter()
    multi = edgediff.compile_model(
        zm, output_dir=workdir / f"{name}-multi", progress=False, resolutions=sizes
    )
    record.compile_seconds["multi"] = time.perf_counter() - start
    record.multi = {
        "library": multi.manifest["library"]["bytes"],
        "weights": multi.manifest["weights"]["bytes"],
    }
    print(
        f"  multi-resolution artifact: {record.compile_seconds['multi']:.0f} s to compile, "
        f"library {record.multi['library']:,} B, weights {record.multi['weights']:,} B",
        flush=True,
    )
    multi_module = multi.load()
    rows = []
    for size in sizes:
        label = format_resolution(size)
        inputs = resolution_inputs(zm, size)
        start = time.perf_counter()
        # an ordinary build at this size: the model's example inputs resized, no resolutions=
        single = edgediff.compile_model(zm, inputs, output_dir=workdir / f"{name}-{label}", progress=False)
        record.compile_seconds[label] = time.perf_counter() - start
        record.specialised[label] = {
            "library": single.manifest["library"]["bytes"],
            "weights": single.manifest["weights"]["bytes"],
        }
        single_module = single.load()
        row = SizeRow(name, size, latent_of(zm, size))
        row.max_abs_diff = float(np.abs(multi_module(*inputs) - single_module(*inputs)).max())
        seconds = median_alternating(
            {"multi": partial(multi_module, *inputs), "specialised": partial(single_module, *inputs)},
            args.runs,
            args.warmup,
        )
        row.multi, row.specialised = seconds["multi"], seconds["specialised"]
        print(
            f"  {label}: multi {1e3 * row.multi:.2f} ms, specialised {1e3 * row.specialised:.2f} ms "
            f"(ratio {row.multi / row.specialised:.3f}; specialised build compiled in "
            f"{record.compile_seconds[label]:.0f} s)",
            flush=True,
        )
        rows.append(row)
        single_module = None  # its weights go before the next size's build
        gc.collect()
    return rows, record


def format_tables(rows: list[SizeRow], records: list[SizeRecord]) -> str:
    """Latency per resolution and the artifact sizes, as Markdown tables."""
    lines = [
        "| model | resolution (HxW) | latent | specialised ms | multi-resolution ms | multi / specialised "
        "| max abs diff |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.model} | {r.resolution[0]}x{r.resolution[1]} | {r.latent[0]}x{r.latent[1]} "
            f"| {1e3 * r.specialised:.2f} | {1e3 * r.multi:.2f} | {r.multi / r.specialised:.3f} "
            f"| {r.max_abs_diff:.1e} |"
        )
    lines += [
        "",
        "| model | build | library bytes | weights.bin bytes | compile s |",
        "|---|---|---|---|---|",
    ]
    for rec in records:
        for label, sizes in rec.specialised.items():
            lines.append(
                f"| {rec.model} | specialised {label} | {sizes['library']:,} | {sizes['weights']:,} "
                f"| {rec.compile_seconds[label]:.0f} |"
            )
        total = sum(s["library"] for s in rec.specialised.values())
        weights = sum(s["weights"] for s in rec.specialised.values())
        lines.append(f"| {rec.model} | sum of the specialised builds | {total:,} | {weights:,} | |")
        lines.append(
            f"| {rec.model} | multi-resolution ({len(rec.specialised)} entries) | {rec.multi['library']:,} "
            f"| {rec.multi['weights']:,} | {rec.compile_seconds['multi']:.0f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``edgediff bench --resolutions``: the tables for each model."""
    from edgediff.frontend.multires import parse_resolutions

    sizes = parse_resolutions(args.resolutions)
    if args.quick:
        args.runs = min(args.runs, 3)
    models = args.models or (["tiny-sd15-unet"] if args.quick else [HALF_SD15])
    threads = os.cpu_count() if args.threads is None else args.threads
    # TVM's thread pool reads TVM_NUM_THREADS when it starts (default: one thread per core)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    print(
        f"machine: {machine_line(threads)}; median of {args.runs} alternating runs after {args.warmup} "
        "warm-up",
        flush=True,
    )
    rows: list[SizeRow] = []
    records: list[SizeRecord] = []
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-resolutions-") as tmp:
        for name in dict.fromkeys(models):
            print(f"{name} at {', '.join(f'{h}x{w}' for h, w in sizes)}", flush=True)
            model_rows, record = bench_model(name, sizes, args, Path(tmp))
            rows += model_rows
            records.append(record)
            gc.collect()
    table = format_tables(rows, records)
    print()
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0
