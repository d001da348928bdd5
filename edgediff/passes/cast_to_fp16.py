"""Run convolutions, matmuls and elementwise ops in float16 with float32 accumulation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from edgediff.passes.analysis import relax_op_histogram
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class CastToFP16Report(PassReport):
    casts_added: int = 0


@register_pass("cast-to-fp16")
@tvm.transform.module_pass(opt_level=0, name="edgediff.CastToFP16")
class CastToFP16:
    """Convert the graph to float16 compute, keeping float32 accumulators for conv and matmul.

    For targets without float32 (the NPU) this is what makes the model runnable at all; diffusion models
    tolerate fp16 activations except for the accumulations, which is why accumulators stay fp32.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = CastToFP16Report("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        casts_before = relax_op_histogram(mod).get("relax.astype", 0)
        mod = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        casts_after = relax_op_histogram(mod).get("relax.astype", 0)
        self.report = CastToFP16Report(
            summary=f"float16 compute with float32 accumulation; {casts_after - casts_before} casts added",
            casts_added=casts_after - casts_before,
        )
        return mod
