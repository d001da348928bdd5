"""The edgediff pass pipeline: which passes run, in which order, for a target.

Order matters and belongs to the compiler, not to the caller: graph rewrites see Relax operators, so they
run before ``legalize`` turns operators into kernels; fusion runs on kernels; scheduling runs last on the
fused kernels. Users choose *which* passes run (by name); the order is always the one below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from edgediff.errors import PassError

# Importing the pass modules registers them.
from edgediff.passes import (  # noqa: F401
    apply_schedules,
    cast_to_fp16,
    decompose_for_inference,
    fp16_overflow_guard,
    fuse_attention,
    fuse_linear_attention,
    fuse_norm_activation,
    fuse_ops,
    legalize_ops,
    lift_weight_transforms,
    mixed_precision,
    npu_op_coverage,
    npu_tiling,
    pack_matmul_weights,
    rewrite_linear_attention,
    winograd_conv2d,
)
from edgediff.passes.registry import PASSES, get_pass_entry

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

PASS_ORDER: tuple[str, ...] = (
    # graph level (Relax operators)
    "decompose-for-inference",
    "cast-to-fp16",
    # added by compile_model wherever cast-to-fp16 runs: layers whose calibrated activations overflow
    # float16 get their float32 conv2d/matmul back (precision/overflow.py)
    "fp16-overflow-guard",
    # only with compile_model(precision=...), which measures the plan; after cast-to-fp16, whose
    # ToMixedPrecision would turn int8 x int8 -> int32 accumulators into float16
    "mixed-precision",
    "npu-op-coverage",
    # reads the op-level graph (conv2d, softmax, ...), so before legalize; plans the NPU program only
    "npu-tiling",
    # before legalize: it rewrites relax.nn.conv2d calls
    "winograd-conv2d",
    # only with compile_model(linear_attention=...): softmax attention -> feature map + linear kernel, before
    # fuse-attention takes the softmax sites it leaves
    "rewrite-linear-attention",
    # SANA's ReLU linear attention -> one O(N d^2) kernel; before legalize, like fuse-attention
    "fuse-linear-attention",
    # replaces softmax(q k^T) v by one scheduled kernel; before legalize, which would split it into kernels
    "fuse-attention",
    # before legalize: moves reshapes out of Linear epilogues so that fuse-ops fuses them into the matmul
    "fuse-norm-activation",
    # after fuse-norm-activation, whose GEGLU kernels it packs too; the packing is lifted to compile time
    "pack-matmul-weights",
    # kernel level (TIR)
    "legalize",
    # after legalize, so that weight-only kernels of any earlier rewrite (Winograd) are lifted too; before
    # fusion, which would merge a weight transpose into its matmul and hide it
    "lift-weight-transforms",
    "fuse-ops",
    "schedule",
)


def default_pipeline(spec: TargetSpec) -> list[str]:
    """The passes a target runs when the user names none: the spec's own list, else one per target kind."""
    if spec.passes:
        return resolve_pipeline(spec, list(spec.passes))
    names = ["decompose-for-inference"]
    if not spec.supports_dtype("float32"):
        names += ["cast-to-fp16", "fp16-overflow-guard"]
    if spec.kind == "npu":
        names += ["npu-op-coverage", "npu-tiling"]
    if spec.kind == "cpu":
        # per layer, only where the cost model expects a gain within the error bound (benchmarks/winograd.py)
        names.append("winograd-conv2d")
        names.append("fuse-linear-attention")
        names.append("fuse-attention")
    names.append("fuse-norm-activation")
    if spec.kind == "cpu":
        names.append("pack-matmul-weights")
    names += ["legalize", "lift-weight-transforms", "fuse-ops", "schedule"]
    return names


def resolve_pipeline(spec: TargetSpec, passes: Iterable[str] | Mapping[str, bool] | None) -> list[str]:
    """Turn the user's ``passes`` argument into the ordered list of pass names to run.

    ``None`` is the target's default pipeline; a list names exactly the passes to run; a mapping switches
    passes of the default pipeline on or off by name (``{"fuse-ops": False}``).
    """
    if passes is None:
        return default_pipeline(spec)
    if isinstance(passes, Mapping):
        chosen = set(default_pipeline(spec))
        for name, enabled in passes.items():
            get_pass_entry(name)
            (chosen.add if enabled else chosen.discard)(name)
    else:
        chosen = set()
        for name in passes:
            get_pass_entry(name)
            chosen.add(name)
    missing = [name for name, entry in PASSES.items() if entry.required and name not in chosen]
    if missing:
        raise PassError(f"pass '{missing[0]}' is required and cannot be switched off")
    return [name for name in PASS_ORDER if name in chosen]


def instantiate(
    names: Iterable[str], spec: TargetSpec, options: Mapping[str, Mapping[str, Any]] | None = None
) -> list[tuple[str, Any]]:
    """Construct each named pass for ``spec``; ``options[name]`` are extra keyword arguments for one pass
    (the mixed-precision pass takes its plan this way)."""
    options = options or {}
    return [(name, get_pass_entry(name).factory(spec, **options.get(name, {}))) for name in names]
