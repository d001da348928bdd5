"""Fuse chains of kernels (conv + bias + activation, norm + elementwise) into single TIR kernels."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import tvm
from tvm import relax

from edgediff.passes.analysis import kernel_count, tir_call_count
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class FuseOpsReport(PassReport):
    launches_before: int = 0
    launches_after: int = 0
    kernels: int = 0


@register_pass("fuse-ops")
@tvm.transform.module_pass(opt_level=0, name="edgediff.FuseOps")
class FuseOps:
    """Group injective/elementwise consumers with their producers and merge each group into one kernel.

    Every unfused elementwise op writes a whole feature map to DRAM and reads it back; on phones that
    traffic, not arithmetic, bounds the UNet (Speed-Is-All-You-Need, EdgeFusion), so fusion comes first.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = FuseOpsReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        launches_before = tir_call_count(mod)
        mod = tvm.transform.Sequential(
            [
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
                relax.transform.DeadCodeElimination(),
            ]
        )(mod)
        launches_after = tir_call_count(mod)
        self.report = FuseOpsReport(
            summary=f"{launches_before} kernel launches -> {launches_after} after fusion",
            launches_before=launches_before,
            launches_after=launches_after,
            kernels=kernel_count(mod),
        )
        return mod
