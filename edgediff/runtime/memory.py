"""Memory-capped generation: what each stage of a pipeline holds, and a plan that keeps a run under a cap.

Torch-free. A stage (text encoder, denoiser, decoder) holds, while it runs:

- its weights (``weights.bin`` copied into runtime tensors) and its library (``model.so``, mapped);
- its activation workspace: the storage blocks TVM's memory planner made for ``main`` (measured at compile
  time, manifest ``memory.workspace_bytes``), which the VM's pooled allocator keeps after the call;
- its inputs and outputs, and while loading, one weight tensor twice (``iter_weights`` reads one at a time);
- LoRA-merged copies of the tensors a LoRA touched.

Everything else a run holds is the process itself (Python, numpy, the TVM runtime): measured as the resident
set size when the plan is made (the ``baseline``). The plan keeps every model loaded when all stages fit
under the cap together; otherwise it loads each model for its stage and unloads it after (text encoder ->
denoising loop -> decoder), and decodes in overlapping tiles (a decoder compiled at a tile latent size,
``decoder_tile/`` of the artifact set) when the full decoder does not fit. Attention needs no slicing at run
time: the ``fuse-attention`` kernels never materialise the N x N scores (the manifest's ``memory.attention``
says where they are still materialised; those bytes are part of the workspace, so the plan counts them).
"""

from __future__ import annotations

import re
import resource
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgediff.errors import InputError

_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_UNITS.update({f"{p}B": v for p, v in list(_UNITS.items()) if p not in ("", "B")})
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
# Workspace of an artifact compiled before the manifest recorded it: this many times its inputs + outputs.
UNMEASURED_WORKSPACE_FACTOR = 16
DEFAULT_TILE_OVERLAP = 0.25  # of the tile's latent size
# What a call holds beyond the planned blocks (kernel-internal buffers, allocator rounding, the output's
# numpy copy): measured 66 MB over a 693 MB plan for SD's VAE decoder at a 32x32 latent tile
# (benchmarks/memory_cap.py), so a tenth of the workspace; and a few MB of Python objects per run.
UNPLANNED_WORKSPACE_FRACTION = 0.10
UNPLANNED_RUN_BYTES = 8_000_000


def parse_bytes(value: int | float | str, what: str = "a size") -> int:
    """``1.5GB`` (10^9), ``512MiB`` (2^29), ``2e6`` or a plain number of bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if not match or match.group(2).upper() not in _UNITS:
            raise InputError(f"cannot read {value!r} as a size; expected e.g. 800MB, 1.5GiB or 120000")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size < 1:
        raise InputError(f"{what} must be at least one byte, got {value!r}")
    return size


def format_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def current_rss() -> int:
    """This process's resident set size now (Linux ``/proc``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(peak if sys.platform == "darwin" else peak * 1024)


def peak_rss() -> int:
    """This process's peak resident set size so far, in bytes: Linux's VmHWM (``ru_maxrss`` keeps the peak
    of the process that forked this one across ``exec``: a small child of a large parent would report the
    parent's), elsewhere ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _tensor_bytes(infos: list[Mapping[str, Any]]) -> int:
    return sum(int(np.prod(i["shape"])) * np.dtype(i["dtype"]).itemsize for i in infos)


@dataclass
class Footprint:
    """What one compiled model holds while it is loaded and called (bytes)."""

    weights: int
    library: int
    workspace: int
    io: int
    load_copy: int  # the one tensor held twice while loading
    measured: bool  # workspace from the compile-time memory plan (False: estimated from the I/O)
    unplanned: int = 0  # kernel scratch + UNPLANNED_WORKSPACE_FRACTION of the workspace

    @property
    def total(self) -> int:
        return self.weights + self.library + self.workspace + self.io + self.load_copy + self.unplanned

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Footprint:
        memory = manifest.get("memory") or {}
        io = _tensor_bytes(manifest["inputs"]) + _tensor_bytes(manifest["outputs"])
        workspace = memory.get("workspace_bytes")
        tensors = manifest["weights"]["tensors"]
        workspace = int(workspace) if workspace is not None else UNMEASURED_WORKSPACE_FACTOR * io
        return cls(
            weights=int(manifest["weights"]["bytes"]),
            library=int(manifest["library"]["bytes"]),
            workspace=workspace,
            io=io,
            load_copy=max((int(t["nbytes"]) for t in tensors), default=0),
            measured=memory.get("workspace_bytes") is not None,
            unplanned=int(memory.get("kernel_scratch_bytes") or 0)
            + int(UNPLANNED_WORKSPACE_FRACTION * workspace),
        )

    def describe(self) -> str:
        ws = "workspace" if self.measured else "workspace (estimated)"
        return (
            f"{format_bytes(self.total)} = weights {format_bytes(self.weights)} + library "
            f"{format_bytes(self.library)} + {ws} {format_bytes(self.workspace)} + I/O "
            f"{format_bytes(self.io)} + unplanned {format_bytes(self.unplanned + self.load_copy)}"
        )


@dataclass
class MemoryPlan:
    """How a pipeline run stays under ``cap`` bytes: which models stay loaded, and how the decoder runs."""

    cap: int | None
    baseline: int
    stages: dict[str, Footprint]  # role -> footprint (decoder_tile: the tiled decoder, one tile at a time)
    resident: bool = True  # keep every model loaded (everything fits together) or load per stage
    tiled_decode: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def decoder_role(self) -> str | None:
        if self.tiled_decode:
            return "decoder_tile"
        return "decoder" if "decoder" in self.stages else None

    def active_roles(self) -> list[str]:
        roles = [r for r in ("text_encoder", "denoiser") if r in self.stages]
        return roles + ([self.decoder_role] if self.decoder_role else [])

    @property
    def peak_estimate(self) -> int:
        """The largest estimated resident set of the run under this plan."""
        footprints = [self.stages[r].total for r in self.active_roles()]
        return self.baseline + (sum(footprints) if self.resident else max(footprints, default=0))

    @property
    def minimum(self) -> int:
        """The smallest footprint any plan reaches: one stage at a time, the smaller decoder."""
        sizes = [self.stages[r].total for r in ("text_encoder", "denoiser") if r in self.stages]
        decoders = [self.stages[r].total for r in ("decoder", "decoder_tile") if r in self.stages]
        return self.baseline + max(sizes + ([min(decoders)] if decoders else []), default=0)

    def describe(self) -> str:
        lines = [
            f"memory plan: cap {format_bytes(self.cap) if self.cap else 'none'}, estimated peak "
            f"{format_bytes(self.peak_estimate)} (process baseline {format_bytes(self.baseline)}); "
            + ("all models loaded together" if self.resident else "one model loaded per stage")
            + (", tiled VAE decode" if self.tiled_decode else "")
        ]
        for role in self.active_roles():
            lines.append(f"  {role:<13} {self.stages[role].describe()}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def make_plan(
    manifests: Mapping[str, Mapping[str, Any]],
    cap: int | None,
    *,
    baseline: int | None = None,
    extra_io: int = 0,
    lora_bytes: Mapping[str, int] | None = None,
) -> MemoryPlan:
    """Plan a run of the artifact set whose manifests are ``manifests`` (by role) under ``cap`` bytes.

    ``extra_io``: the pipeline's own arrays (latents, conditioning, the image) held throughout;
    ``lora_bytes``: bytes of LoRA-merged tensors each role holds. Raises :class:`InputError` when even one
    stage at a time, with the smaller decoder, does not fit, saying what the smallest footprint is.
    """
    # the pipeline's own arrays are held throughout: part of the baseline, not of each stage
    baseline = (current_rss() if baseline is None else baseline) + extra_io + UNPLANNED_RUN_BYTES
    stages = {}
    for role, manifest in manifests.items():
        footprint = Footprint.of(manifest)
        footprint.weights += int((lora_bytes or {}).get(role, 0))
        stages[role] = footprint
    plan = MemoryPlan(cap, baseline, stages)
    if cap is None:
        return plan
    if plan.minimum > cap:
        smallest = min(
            (r for r in ("decoder", "decoder_tile") if r in stages),
            key=lambda r: stages[r].total,
            default=None,
        )
        parts = "; ".join(
            f"{r} {format_bytes(stages[r].total)}"
            for r in ("text_encoder", "denoiser", smallest)
            if r is not None and r in stages
        )
        raise InputError(
            f"--max-memory {format_bytes(cap)} is below the smallest footprint of this pipeline, "
            f"{format_bytes(plan.minimum)} (process {format_bytes(baseline)} + the largest stage loaded "
            f"alone: {parts})"
            + (
                ""
                if "decoder_tile" in stages or "decoder" not in stages
                else "; a tiled decoder (compile-pipeline --decoder-tile) would make the decode stage smaller"
            )
        )
    if "decoder" in stages and "decoder_tile" in stages:
        without_tiles = MemoryPlan(cap, baseline, stages, resident=False)
        plan.tiled_decode = without_tiles.peak_estimate > cap
    elif "decoder_tile" in stages and "decoder" not in stages:
        plan.tiled_decode = True
    plan.resident = MemoryPlan(cap, baseline, stages, True, plan.tiled_decode).peak_estimate <= cap
    attention = [m.get("memory", {}).get("attention", {}) for m in manifests.values()]
    unfused = sum(a.get("unfused_score_bytes", 0) for a in attention)
    fused = sum(a.get("fused_sites", 0) for a in attention)
    if fused:
        plan.notes.append(
            f"attention: {fused} sites run as fused blocked kernels that never hold the N x N scores "
            "(no slicing needed)"
        )
    if unfused:
        plan.notes.append(
            f"attention: {format_bytes(unfused)} of scores materialised, counted in the workspace"
        )
    if not all(f.measured for f in stages.values()):
        plan.notes.append(
            "some artifacts predate the recorded workspace: estimated from their inputs/outputs"
        )
    return plan


# --------------------------------------------------------------------------------------------- tiled decode


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest ``tile``-long tiles that cover ``size`` with at least ``overlap`` shared
    between neighbours, spread evenly (so every overlap is as wide as that number of tiles allows)."""
    if tile >= size:
        return [0]
    stride = max(1, tile - overlap)
    count = -(-(size - tile) // stride) + 1
    return [round(i * (size - tile) / (count - 1)) for i in range(count)]


def _ramp(length: int, before: int, after: int) -> np.ndarray:
    """Blend weights along one axis of a tile: linear ramps over the ``before`` / ``after`` pixels shared
    with the previous / next tile, 1 elsewhere. Two neighbours' ramps over a shared span sum to 1; no weight
    is 0, so every pixel is covered."""
    weights = np.ones(length, np.float32)
    if before > 0:
        weights[:before] = (np.arange(before, dtype=np.float32) + 1.0) / (before + 1.0)
    if after > 0:
        weights[length - after :] = np.minimum(
            weights[length - after :], (np.arange(after, 0, -1, dtype=np.float32)) / (after + 1.0)
        )
    return weights


def _shared(starts: list[int], i: int, tile: int) -> tuple[int, int]:
    """Latent pixels tile ``i`` shares with its previous and next tile."""
    before = starts[i - 1] + tile - starts[i] if i > 0 else 0
    after = starts[i] + tile - starts[i + 1] if i + 1 < len(starts) else 0
    return max(0, before), max(0, after)


def tiled_decode(
    decode: Callable[[np.ndarray], np.ndarray], latents: np.ndarray, tile: int, overlap: int
) -> np.ndarray:
    """Decode ``latents`` (N, C, H, W) in overlapping ``tile`` x ``tile`` tiles with ``decode`` (a decoder
    compiled for that tile) and blend the pixel tiles with linear ramps over the overlaps, so no seams show.

    Each tile is decoded alone, so a decoder with global operations (GroupNorm's statistics, the mid-block
    attention) sees only its tile: the result differs from the untiled decode by that (measured in the tests
    and the memory benchmark), not by seams."""
    _, _, height, width = latents.shape
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    out = weight = None
    factor = 1
    for iy, y in enumerate(ys):
        for ix, x in enumerate(xs):
            pixels = np.asarray(decode(np.ascontiguousarray(latents[:, :, y : y + tile, x : x + tile])))
            if out is None:
                factor = pixels.shape[-1] // min(tile, width)
                out = np.zeros((*pixels.shape[:2], height * factor, width * factor), np.float32)
                weight = np.zeros((height * factor, width * factor), np.float32)
            wy = _ramp(pixels.shape[-2], *(factor * n for n in _shared(ys, iy, tile)))
            wx = _ramp(pixels.shape[-1], *(factor * n for n in _shared(xs, ix, tile)))
            w = wy[:, None] * wx[None, :]
            py, px = y * factor, x * factor
            out[..., py : py + pixels.shape[-2], px : px + pixels.shape[-1]] += pixels * w
            weight[py : py + pixels.shape[-2], px : px + pixels.shape[-1]] += w
    assert out is not None and weight is not None
    return out / weight


def default_overlap(tile: int) -> int:
    return max(1, int(round(tile * DEFAULT_TILE_OVERLAP)))
