"""Speed of edgediff's host build against PyTorch eager and onnxruntime, in one process.

For each model: PyTorch eager, onnxruntime (CPUExecutionProvider, all cores) and the edgediff host build,
each timed as the median of ``--runs`` calls after ``--warmup`` calls, on the same inputs; then the
ratios, the edgediff compile time and the peak resident memory while each engine ran. ``--profile`` adds
the per-kernel table of one edgediff call.

    edgediff bench                # sd15-unet at latents 32 and 64, VAE decoder and DiT at 32
    edgediff bench --quick        # tiny models: a smoke run in a minute or two
    edgediff bench --models sd15-unet --latent 32 64 --profile

Peak memory: for eager and onnxruntime, the process's VmHWM reset before each engine (Linux
``clear_refs``), with the PyTorch model loaded throughout, so their figures include its weights; for
edgediff, the VmHWM of a fresh process that loads the artifact with the torch-free runtime and makes one
call (what a deployment holds).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.tools.bench.measure import machine_line, peak_rss_mb, reset_peak_rss, time_calls

# what issue #4 measures: the SD1.5 UNet at two latent sizes, the VAE decoder and DiT-XL/2
DEFAULT_RUNS = (("sd15-unet", 32), ("sd15-unet", 64), ("sd-vae-decoder", 32), ("dit-xl-2", 32))
QUICK_MODELS = ("tiny-sd15-unet", "tiny-vae-decoder", "tiny-dit")


@dataclass
class Row:
    """One model at one latent size: seconds per call for each engine, and the build facts."""

    model: str
    latent: int
    seconds: dict[str, float] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    compile_seconds: float = 0.0
    max_abs_error: float = 0.0
    notes: list[str] = field(default_factory=list)


_RUNTIME_PEAK = """
import sys, numpy as np
from edgediff.tools.bench.measure import peak_rss_mb
from edgediff.runtime import load
module = load(sys.argv[1])
module(*[np.load(path) for path in sys.argv[2:]])
print(peak_rss_mb())
"""


def _runtime_peak_rss_mb(artifact: Path, inputs: tuple[Any, ...], workdir: Path) -> float | None:
    """Peak RSS of a fresh torch-free process that loads the artifact and makes one call."""
    import subprocess

    paths = []
    for i, value in enumerate(inputs):
        paths.append(str(workdir / f"input{i}.npy"))
        np.save(paths[-1], value.numpy() if hasattr(value, "numpy") else np.asarray(value))
    result = subprocess.run(
        [sys.executable, "-c", _RUNTIME_PEAK, str(artifact), *paths], capture_output=True, text=True
    )
    lines = result.stdout.split()
    return float(lines[-1]) if result.returncode == 0 and lines else None


def bench_model(name: str, latent: int | None, args: argparse.Namespace, workdir: Path) -> Row:
    """Time one zoo model on the three engines."""
    import torch

    import edgediff
    from edgediff import zoo

    zm = zoo.build(name, latent_size=latent)
    inputs = zm.example_inputs
    row = Row(name, int(zm.meta.get("latent_size", latent or 0)))
    threads = os.cpu_count() if args.threads is None else args.threads
    torch.set_num_threads(threads)

    reset_peak_rss()
    with torch.inference_mode():
        expected = zm.module(*inputs).numpy()
        row.seconds["eager"] = time_calls(lambda: zm.module(*inputs), args.runs, args.warmup, args.cpu_time)
    row.peak_mb["eager"] = peak_rss_mb()
    print(f"  eager        {row.seconds['eager']:8.4g} s", flush=True)

    if "onnxruntime" in args.engines:
        reset_peak_rss()
        seconds = _bench_onnxruntime(zm, inputs, args, workdir / f"{name}.onnx", threads, row)
        if seconds is not None:
            row.seconds["onnxruntime"] = seconds
            row.peak_mb["onnxruntime"] = peak_rss_mb()
            print(f"  onnxruntime  {seconds:8.4g} s", flush=True)
        gc.collect()

    start = time.perf_counter()
    # one directory per model and size: a process cannot load a second library from the same path
    output_dir = workdir / f"{name}-{row.latent}"
    artifact = edgediff.compile_model(zm, target="host", output_dir=output_dir, progress=False)
    row.compile_seconds = time.perf_counter() - start
    module = edgediff.load(artifact.path)
    got = module(*inputs)
    row.max_abs_error = float(np.abs(got - expected).max())
    row.seconds["edgediff"] = time_calls(lambda: module(*inputs), args.runs, args.warmup, args.cpu_time)
    # this process still holds the PyTorch model and the compiler's freed-but-kept heap: the deployed
    # run's memory is measured where it would run, in a process with the runtime alone
    peak = _runtime_peak_rss_mb(artifact.path, inputs, workdir)
    if peak is not None:
        row.peak_mb["edgediff"] = peak
    print(
        f"  edgediff     {row.seconds['edgediff']:8.4g} s  (compile {row.compile_seconds:.0f} s, "
        f"max |err| vs eager {row.max_abs_error:.1e})",
        flush=True,
    )
    if args.profile:
        print_profile(module, inputs)
    return row


def _bench_onnxruntime(
    zm: Any, inputs: tuple[Any, ...], args: argparse.Namespace, path: Path, threads: int, row: Row
) -> float | None:
    try:
        import onnxruntime as ort
    except ImportError:
        row.notes.append("onnxruntime not installed (pip install -e '.[bench]')")
        return None
    import torch

    # the TorchScript exporter (dynamo=False) handles every zoo model; the weights go to external data
    # files because a UNet's exceed protobuf's 2 GB limit
    torch.onnx.export(
        zm.module,
        tuple(inputs),
        str(path),
        input_names=list(zm.input_names),
        dynamo=False,
        external_data=True,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in zip(zm.input_names, inputs, strict=True)}
    return time_calls(lambda: session.run(None, feed), args.runs, args.warmup, args.cpu_time)


def print_profile(module: Any, inputs: tuple[Any, ...], top: int = 25) -> None:
    """The ``top`` kernels of one call of a loaded artifact on ``inputs`` (torch tensors), and the time per
    op family."""
    import tvm

    from edgediff.backend.profile import profile_vm

    # CompiledModule keeps its VM and device-resident weights private; the profile needs the raw VM call
    vm_args = [tvm.runtime.tensor(np.ascontiguousarray(x.numpy())) for x in inputs] + list(module._weights)
    module(*inputs)  # warm: the first call also starts TVM's thread pool
    profile = profile_vm(module._vm, vm_args, runs=1)
    print(profile.table(top=top))
    families = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in profile.by_family().items())
    print(f"  by op family: {families}")


def format_table(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| model | latent | eager s | onnxruntime s | edgediff s | edgediff/ort | edgediff/eager "
        "| compile s | peak RSS MB (eager / ort / edgediff) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ort = r.seconds.get("onnxruntime")
        ours = r.seconds["edgediff"]
        peaks = " / ".join(
            f"{r.peak_mb[k]:.0f}" if k in r.peak_mb else "-" for k in ("eager", "onnxruntime", "edgediff")
        )
        lines.append(
            f"| {r.model} | {r.latent} | {r.seconds['eager']:.4g} | {'-' if ort is None else f'{ort:.4g}'} "
            f"| {ours:.4g} | {'-' if ort is None else f'{ours / ort:.2f}'} | {ours / r.seconds['eager']:.2f} "
            f"| {r.compile_seconds:.0f} | {peaks} |"
        )
    return "\n".join(lines)


def model_runs(args: argparse.Namespace) -> tuple[list[tuple[str, int | None]], int]:
    """The (model, latent) pairs ``args`` asks for and the thread count; sets up TVM's thread pool."""
    if args.quick:
        args.runs = min(args.runs, 3)
    runs: list[tuple[str, int | None]]
    if args.models is None and args.latent is None and not args.quick:
        runs = list(DEFAULT_RUNS)
    else:
        models = args.models or (QUICK_MODELS if args.quick else [name for name, _ in DEFAULT_RUNS])
        latents: list[int | None] = list(args.latent or ([None] if args.quick else [32]))
        runs = [(name, latent) for name in dict.fromkeys(models) for latent in latents]
    threads = os.cpu_count() if args.threads is None else args.threads
    # TVM's thread pool reads TVM_NUM_THREADS when it starts (default: one thread per core)
    os.environ.setdefault("TVM_NUM_THREADS", str(threads))
    return runs, threads


def run(args: argparse.Namespace) -> int:
    """Benchmark the chosen models and print the table (and the profile with ``--profile``)."""
    if args.no_onnxruntime:
        args.engines = []
    runs, threads = model_runs(args)

    timing = "least CPU time" if args.cpu_time else "median"
    print(
        f"machine: {machine_line(threads)}; {timing} of {args.runs} runs after {args.warmup} warm-up",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgediff-bench-") as tmp:
        for name, latent in runs:
            print(f"{name} latent {latent or 'default'}", flush=True)
            rows.append(bench_model(name, latent, args, Path(tmp)))
            gc.collect()
    table = format_table(rows)
    print()
    print(table)
    for r in rows:
        for note in r.notes:
            print(f"note ({r.model}): {note}")
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0
