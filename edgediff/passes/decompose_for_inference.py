"""Rewrite training-time ops (batch norm, dropout, layer-norm variants) into their inference form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from edgediff.passes.analysis import relax_op_histogram
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class DecomposeForInferenceReport(PassReport):
    decomposed: dict[str, int] = field(default_factory=dict)  # op -> calls removed


@register_pass("decompose-for-inference")
@tvm.transform.module_pass(opt_level=0, name="edgediff.DecomposeForInference")
class DecomposeForInference:
    """Replace ops that only exist for training with their inference equivalents.

    torch.export keeps ops such as ``batch_norm`` with running statistics; later passes and the legalizer
    handle their decomposed elementwise form better (it fuses into the producer conv).
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = DecomposeForInferenceReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        before = relax_op_histogram(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        after = relax_op_histogram(mod)
        removed = {op: n - after.get(op, 0) for op, n in before.items() if after.get(op, 0) < n}
        self.report = DecomposeForInferenceReport(
            summary=(
                "decomposed " + ", ".join(f"{n} x {op}" for op, n in sorted(removed.items()))
                if removed
                else "no training-only ops found"
            ),
            decomposed=removed,
        )
        return mod
