"""Measure a target's kernel throughput per precision format: the ``measured`` block of a target spec.

``edgediff calibrate-target --target host`` compiles one small probe - a 3x3 convolution and a
feed-forward pair of Linear layers at SD 1.5's shapes (320 channels, 16x16 = 256 tokens) - once per
precision format the target computes in, times each artifact (least process CPU time of a few calls on one
thread, so a shared machine's load does not leak into the figures), and turns the time into effective
GFLOP/s = 2 x MACs / seconds. The cost model then uses these instead of the spec's peak figures for those
formats (:meth:`edgediff.targets.CostModel.estimate_seconds`).

The result is written as a target YAML (built-in targets: the resolved spec plus the ``measured`` block) or
as a ``<name>.measured.yaml`` sidecar next to a user's target YAML, which ``load_target`` picks up.
Cross targets cannot run here; they keep their spec figures until measured on a device.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from edgediff.errors import TargetSpecError
from edgediff.targets.schema import MEASURED_FORMATS
from edgediff.targets.spec import TargetSpec, host_cpu_flags, load_target, measured_sidecar

#: Probe shape: SD 1.5's first level at latent 32 (320 channels) on a 16x16 grid (256 tokens).
PROBE_CHANNELS = 320
PROBE_SIZE = 16
PROBE_FF = 4  # feed-forward expansion: Linear(320, 1280) then Linear(1280, 320)


def _probe_module(channels: int, size: int) -> tuple[Any, tuple[Any, Any], float]:
    """The probe denoiser ``(sample, timestep) -> sample``, its example inputs and its MACs per call."""
    import torch
    from torch import nn

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
            self.ff_in = nn.Linear(channels, PROBE_FF * channels)
            self.ff_out = nn.Linear(PROBE_FF * channels, channels)

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
            b, c, h, w = sample.shape
            x = self.conv(sample) + (timestep.float() / 1000.0)[:, None, None, None]
            tokens = x.flatten(2).transpose(1, 2)
            tokens = self.ff_out(nn.functional.gelu(self.ff_in(tokens)))
            return tokens.transpose(1, 2).reshape(b, c, h, w)

    gen = torch.Generator().manual_seed(0)
    model = Probe().eval().requires_grad_(False)
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=gen) * 0.05
    inputs = (torch.randn(1, channels, size, size, generator=gen), torch.tensor([500.0]))
    tokens = size * size
    macs = channels * channels * 9 * tokens + 2 * tokens * channels * PROBE_FF * channels
    return model, inputs, float(macs)


def formats_for(spec: TargetSpec) -> list[str]:
    """The precision formats the planner may give conv/linear layers on ``spec`` (those to measure)."""
    from edgediff.precision.assignment import candidate_formats

    return [
        f for f in candidate_formats("linear", spec.dtypes) if f in MEASURED_FORMATS and f != "w8a8-token"
    ]


@dataclass
class Calibration:
    """Measured throughput per format and where it was measured."""

    gflops: dict[str, float]
    seconds: dict[str, float]
    macs: float
    cpu: str
    threads: int
    date: str
    command: str

    def measured_block(self) -> dict[str, Any]:
        """The ``measured`` section of a target spec."""
        return {
            "date": self.date,
            "cpu": self.cpu,
            "command": self.command,
            "threads": self.threads,
            "gflops": {f: round(g, 3) for f, g in self.gflops.items()},
        }


def cpu_description(flags: set[str] | None = None) -> str:
    """This CPU in one line: its model name and the flags that matter for the formats."""
    from edgediff.runtime.arch import machine_arch
    from edgediff.targets.detect import detect_dtypes

    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.split(":")[0].strip() in ("model name", "Model", "CPU part"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    detected = detect_dtypes(host_cpu_flags() if flags is None else flags, machine_arch())
    return f"{model} ({detected.summary()})"


def measure(
    spec: TargetSpec,
    formats: Sequence[str] | None = None,
    *,
    runs: int = 5,
    channels: int = PROBE_CHANNELS,
    size: int = PROBE_SIZE,
    command: str = "",
    device: Any = None,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Compile the probe at each of ``formats`` (default: all the target supports) for ``spec`` and time it:
    here, the least process CPU time of ``runs`` calls on one kernel thread; on ``device`` (an open
    :class:`edgediff.tools.remote.RemoteDevice`), the least of ``runs`` device-side ``time_evaluator``
    figures over TVM RPC, on the device's own threads."""
    import edgediff
    from edgediff.precision.assignment import require_supported
    from edgediff.precision.quantizers import get_format

    if device is None and not spec.runs_on_host:
        raise TargetSpecError(
            f"target '{spec.name}' does not run on this machine; measure it on a device (calibrate-target "
            "--target NAME --rpc TRACKER --key KEY) or keep its spec figures"
        )
    formats = list(formats or formats_for(spec))
    for fmt in formats:
        if fmt not in MEASURED_FORMATS:
            raise TargetSpecError(
                f"unknown format {fmt!r} to calibrate; expected one of {', '.join(MEASURED_FORMATS)}"
            )
        require_supported(get_format(fmt), spec.dtypes, spec.name, "format")
    model, inputs, macs = _probe_module(channels, size)
    args = [x.numpy() for x in inputs]
    say = progress or (lambda _text: None)
    if device is None:
        # One kernel thread (unless the user set TVM_NUM_THREADS): process CPU time is then what a call
        # costs on a quiet core. Only effective before TVM's pool starts, i.e. in a fresh process (the CLI).
        os.environ.setdefault("TVM_NUM_THREADS", "1")
        threads = int(os.environ["TVM_NUM_THREADS"])
        where = cpu_description()
    else:
        threads = spec.compute.cores
        where = f"{device.name} ({device.arch or 'unknown arch'}) over RPC"
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="edgediff-calibrate-") as tmp:
        for fmt in formats:
            say(f"compile probe at {fmt}")
            artifact = edgediff.compile_model(
                model,
                inputs,
                target=spec,
                input_names=("sample", "timestep"),
                output_dir=Path(tmp) / fmt,
                progress=False,
                precision=None if fmt == "fp32" else _uniform(fmt),
            )
            say(f"time probe at {fmt}")
            seconds[fmt] = (
                _time_local(artifact.path, args, runs)
                if device is None
                else (_time_remote(device, artifact.path, args, runs))
            )
            say(f"{fmt}: {seconds[fmt] * 1e3:.2f} ms, {2 * macs / seconds[fmt] / 1e9:.2f} GFLOP/s")
    return Calibration(
        gflops={f: 2 * macs / s / 1e9 for f, s in seconds.items()},
        seconds=seconds,
        macs=macs,
        cpu=where,
        threads=threads,
        date=datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        command=command,
    )


def _time_local(path: Path, args: list[Any], runs: int) -> float:
    from edgediff.runtime.artifact import load

    module = load(path)
    module(*args)  # warm-up: first-call allocations and page faults
    best = float("inf")
    for _ in range(max(1, runs)):
        start = time.process_time()
        module(*args)
        best = min(best, time.process_time() - start)
    return best


def _time_remote(device: Any, path: Path, args: list[Any], runs: int) -> float:
    from edgediff.tools.remote import RemoteModule

    module = RemoteModule(device, path)
    return min(module.time_call(*args, number=1, repeat=max(1, runs)))


def _uniform(fmt: str) -> Any:
    """A uniform-precision request with the cheapest calibration: the probe's figures do not depend on the
    activation scales, only the kernels' speed does."""
    from edgediff.precision import PrecisionConfig

    return PrecisionConfig(mode=fmt, num_steps=1, keep=1, seeds=(0,), timestep_aware=False)


def write_measured(spec: TargetSpec, target_arg: str, block: dict[str, Any], output: str | None) -> Path:
    """Store ``block`` with the target: a sidecar next to a user YAML, else a full target YAML (the resolved
    spec plus the block; default ``edgediff-out/targets/<name>-measured.yaml``). Returns the path."""
    is_file = not target_arg.startswith("builtin:") and Path(target_arg).suffix in (".yaml", ".yml")
    if output is None and is_file:
        path = measured_sidecar(Path(target_arg))
        path.write_text(_dump(block), encoding="utf-8")
        return path
    path = Path(output or f"edgediff-out/targets/{spec.name}-measured.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".measured.yaml"):  # asked for a sidecar explicitly
        path.write_text(_dump(block), encoding="utf-8")
        return path
    data = spec.to_dict()
    data["name"] = data["name"] if data["name"].endswith("-measured") else data["name"] + "-measured"
    data["measured"] = block
    header = (
        f"# {spec.name} as resolved on this machine, with kernel throughput measured by\n"
        f"#   {block['command']}\n# Re-run that command to refresh the measured block.\n"
    )
    path.write_text(header + _dump(data), encoding="utf-8")
    TargetSpec.from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), str(path))  # must load back
    return path


def _dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


def calibrate_target(
    target: str,
    output: str | None = None,
    formats: Sequence[str] | None = None,
    runs: int = 5,
    argv: Sequence[str] | None = None,
    device: Any = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Calibration, Path]:
    """``edgediff calibrate-target``: measure ``target`` here (or on ``device``) and store the figures;
    returns them and the file written."""
    spec = load_target(target)
    command = "python -m edgediff calibrate-target " + " ".join(shlex.quote(a) for a in (argv or []))
    calibration = measure(spec, formats, runs=runs, command=command.strip(), device=device, progress=progress)
    path = write_measured(spec, target, calibration.measured_block(), output)
    return calibration, path
