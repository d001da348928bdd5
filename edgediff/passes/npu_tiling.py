"""Model-level tiling to the NPU's SRAM: regions, tiles and the NPU program (edgediff.npu)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tvm

from edgediff.errors import EdgediffError, first_line
from edgediff.npu import memory_budget, plan_model
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport, find_report, handoff, optional

if TYPE_CHECKING:
    from edgediff.npu import TilingPlan
    from edgediff.npu.tiling_report import BlockRow
    from edgediff.targets import TargetSpec


@dataclass
class NPUTilingReport(PassReport):
    """DRAM bytes per model block untiled vs tiled; a skipped run (no NPU program) has only its summary."""

    memory_level: str | None = optional()  # "sram", or "l2" (a CPU's L2 planned as the scratchpad)
    sram_bytes: int | None = optional()
    blocks: list[BlockRow] | None = optional()
    total: BlockRow | None = optional()
    plan: TilingPlan | None = handoff()  # the NPU program and its simulation, for the artifact writer


def npu_tiling_plan(results: list[Any]) -> TilingPlan | None:
    """The NPU program an ``npu-tiling`` run made (None: the pass did not run or skipped)."""
    report = find_report(results, NPUTilingReport)
    return report.plan if report is not None else None


@register_pass("npu-tiling")
@tvm.transform.module_pass(opt_level=0, name="edgediff.NPUTiling")
class NPUTiling:
    """Partition the graph into NPU regions and host ops and tile each region so its working set fits SRAM.

    On phones the UNet is bound by DRAM traffic: its high-resolution feature maps and attention scores are
    far larger than on-chip SRAM. The pass (EdgeFusion's model-level tiling) chains ops inside row-band tiles
    with conv halos, splits GroupNorm into a statistics and a normalise phase, tiles attention over query and
    key blocks with online softmax, and streams weight tiles; it emits the NPU program (DMA in/out, SRAM
    offsets, compute per tile), simulates it and reports DRAM bytes per block untiled vs tiled. The module
    itself is unchanged: its kernels, built for the NPU's host CPU, are the simulated NPU kernels.

    Options: ``sram_bytes`` (override the spec), ``memory_level`` ("sram", or "l2" to plan a CPU's L2 as
    the scratchpad), ``chain`` (False: one anchor op per region).
    """

    def __init__(
        self, spec: TargetSpec, sram_bytes: int | None = None, memory_level: str = "sram", chain: bool = True
    ) -> None:
        self.spec = spec
        self.sram = memory_budget(spec, memory_level, sram_bytes)
        self.level = memory_level
        self.chain = chain
        self.report = NPUTilingReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        try:
            plan = plan_model(mod, self.spec, self.sram, chain=self.chain)
        except EdgediffError:
            raise  # an SRAM too small for some op: the user's spec must change
        except Exception as err:  # a graph construct the planner does not know: build without a program
            self.report = NPUTilingReport(f"skipped, no NPU program: {first_line(err)}")
            return mod
        on_npu = [g for g in plan.groups if g.device == "npu"]
        host_ops = sorted({n.op for g in plan.groups if g.device == "host" for n in g.nodes})
        self.report = NPUTilingReport(
            summary=f"{len(on_npu)} NPU regions, {len(plan.groups) - len(on_npu)} host ops"
            + (f" ({', '.join(host_ops)})" if host_ops else "")
            + f"; {plan.analysis.summary()}",
            memory_level=self.level,
            sram_bytes=self.sram,
            blocks=list(plan.analysis.rows),
            total=plan.analysis.total(),
            plan=plan,
        )
        return mod
