"""Lower every high-level Relax op to a TIR kernel (TVM's operator legalisation)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from edgediff.kernels.dequantize import LEGALIZATIONS
from edgediff.passes.analysis import kernel_count, relax_op_histogram
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class LegalizeOpsReport(PassReport):
    ops: dict[str, int] = field(default_factory=dict)  # Relax op -> calls before legalisation
    not_legalized: dict[str, int] = field(default_factory=dict)


@register_pass("legalize", required=True)
@tvm.transform.module_pass(opt_level=0, name="edgediff.LegalizeOps")
class LegalizeOps:
    """Turn each Relax operator call into a ``call_tir`` of a generated TIR kernel.

    Graph-level passes (fusion patterns, Winograd, precision) must run before this one: afterwards the
    module is a sequence of kernels and the operator names are gone.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = LegalizeOpsReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        ops = relax_op_histogram(mod)
        # weight-only int8 conv2d: the weight widened by a stage of its own (kernels/dequantize.py)
        mod = relax.transform.LegalizeOps(customize_legalize_map=LEGALIZATIONS)(mod)
        mod = relax.transform.AnnotateTIROpPattern()(mod)
        left = {op: n for op, n in relax_op_histogram(mod).items() if not op.startswith("relax.call")}
        self.report = LegalizeOpsReport(
            summary=f"{sum(ops.values())} op calls -> {kernel_count(mod)} distinct TIR kernels",
            ops=dict(sorted(ops.items())),
            not_legalized=left,
        )
        return mod
