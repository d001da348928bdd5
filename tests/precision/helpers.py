"""Helpers shared by the precision tests, the int8 kernel tests (tests/compile) and the arm64 int8 tests
(tests/cross): targets named by their int8 dot-product step, the instruction descriptions the kernels are
checked with, a build at a precision, and what its mixed-precision pass reported (plan, kernel counts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tvm

import edgediff
from edgediff.kernels.int8_matmul import (
    KERNEL_NAME,
    DotInstruction,
    Int8Tile,
    as_activation,
    dot_instruction,
    pack_int8_weight,
)
from edgediff.precision import PrecisionConfig, PrecisionPlan

ZNVER4 = {"kind": "llvm", "mcpu": "znver4"}  # AVX512-VNNI: vpdpbusd, uint8 activations + compensation
ZNVER3 = {"kind": "llvm", "mcpu": "znver3"}  # AVX2, no VNNI: the vpmaddwd step
A78 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78", "mattr": ["+neon", "+dotprod"]}
ARMV8 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}  # no dotprod: portable
GENERIC = {"kind": "llvm"}  # this host's ISA at its baseline: runs on any machine of the host's arch


# uniform w8a8 with the attention matmuls quantized too: CPU targets keep attention in float unless pinned
INT8_A8 = PrecisionConfig(mode="int8", pins={"*.sdpa": "a8"})


def portable(lanes: int, activation_dtype: str) -> DotInstruction:
    """The portable step (no dot-product instruction) with ``lanes`` int32 lanes: exact on any machine."""
    return DotInstruction("portable", None, lanes, activation_dtype, 16)


def host_target() -> dict:
    """This CPU as the ``host`` spec builds for it (LLVM's name for it, plus the dot-product features its
    flags grant that the name lacks): the target whose build runs on this host's own int8 step."""
    from edgediff.targets import load_target

    return dict(load_target("host").to_dict()["tvm"]["target"])


def host_dot() -> DotInstruction:
    return dot_instruction(host_target())


def run_int8_matmul(
    ex: Any,
    dot: DotInstruction,
    tile: Int8Tile,
    q: np.ndarray,
    w: np.ndarray,
    a_scale: np.ndarray,
    w_scale: np.ndarray,
    bias: np.ndarray | None,
    epilogue: str,
) -> np.ndarray:
    """The compiled int8 GEMM kernel ``ex`` on q [M, K] x w [K, N], or with a leading batch dimension (each
    batch its own packed right operand and compensation), packed by ``pack_int8_weight``; no ``bias``: 0."""
    batched = q.ndim == 3
    columns = w.shape[-1]
    packs = [pack_int8_weight(part, tile.panel, dot.compensated) for part in (w if batched else [w])]
    packed = np.stack([p for p, _ in packs])
    compensation = np.stack([c if c is not None else np.zeros(columns, np.int32) for _, c in packs])
    if not batched:
        packed, compensation = packed[0], compensation[0]
    if bias is None:
        bias = np.zeros(columns, np.float32)
    dev = tvm.cpu()
    out_dtype = np.int32 if epilogue == "int32" else np.float32
    out = tvm.runtime.tensor(np.zeros((*q.shape[:-1], columns), out_dtype), dev)
    args = [as_activation(q, dot), packed, compensation, a_scale, w_scale, bias]
    ex[KERNEL_NAME](*[tvm.runtime.tensor(x, dev) for x in args], out)
    return out.numpy()


def host_dot_compensated(spec: Any) -> bool:
    """Whether a target spec's int8 step stores an int32 column sum per output channel (``vpdpbusd``)."""
    return dot_instruction(spec.build_target()).compensated


def assert_packed_for_the_kernel(artifact: Any, weight: str, spec: Any) -> None:
    """weights.bin holds ``weight`` packed for the int8 kernel (one 4-D int8 tensor) and, where the
    instruction takes uint8 activations, its int32 column sums, computed at compile time."""
    computed = [t for t in artifact.manifest["weights"]["tensors"] if t["name"].startswith(f"{weight}:")]
    packed = [t for t in computed if t["dtype"] == "int8"]
    sums = [t for t in computed if t["dtype"] == "int32"]
    assert len(packed) == 1 and len(packed[0]["shape"]) == 4, computed
    assert len(sums) == int(host_dot_compensated(spec)) and len(computed) == len(packed) + len(sums), computed


def host_instruction(spec: Any) -> str:
    """The name of the int8 step a target spec's build uses ("portable" where it has none)."""
    return dot_instruction(spec.build_target()).name


def with_target(spec: Any, target: dict) -> Any:
    """``spec`` (its dtypes, costs, name) building for the TVM target ``target`` instead."""
    from edgediff.targets import TargetSpec

    data = spec.to_dict()
    data["tvm"] = {"target": target, "host": None}
    return TargetSpec.from_dict(data)


def compile_at(
    model: Any,
    inputs: Sequence[Any],
    names: Sequence[str],
    target: Any,
    output_dir: Path,
    precision: Any,
    **options: Any,
) -> edgediff.Artifact:
    """``model`` compiled for ``target`` at ``precision`` (a format name, "auto" or a PrecisionConfig)."""
    return edgediff.compile_model(
        model,
        inputs,
        target=target,
        input_names=names,
        output_dir=output_dir,
        progress=False,
        precision=precision,
        **options,
    )


def mixed_precision_report(artifact: edgediff.Artifact) -> dict[str, Any]:
    return {p["name"]: p["report"] for p in artifact.manifest["passes"]}["mixed-precision"]


def plan_of(artifact: edgediff.Artifact) -> PrecisionPlan:
    return PrecisionPlan.from_dict(mixed_precision_report(artifact)["plan"])


def rewrite_counts(artifact: edgediff.Artifact) -> dict[str, int]:
    """The mixed-precision pass's counts: layers per format, and which of them run on which int8 kernel."""
    return mixed_precision_report(artifact)["rewritten"]
