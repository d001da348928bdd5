"""Reductions on CPUs (GroupNorm, LayerNorm, softmax, mean, max): parallel over the rows they reduce."""

from __future__ import annotations

from typing import Any

from edgediff.lowering.schedules.common import (
    CostModelRule,
    iter_kinds,
    schedule_loop_nest,
    try_inline_all,
)


class GeneralReduction(CostModelRule):
    """Schedule any kernel with reduction blocks that the specialised rules did not take.

    First every injective block is inlined: the reshapes legalization wraps around GroupNorm, softmax's
    exp and the fused SiLU/where/mask epilogues would otherwise each write a full-size intermediate (32 MB
    per attention softmax at 1024 tokens). Then TVM's ``dlight.cpu.Reduction`` gets the inlined kernel: for
    rows reduced and normalised along one shared axis (softmax, LayerNorm) it computes a row's blocks
    together under one parallel row loop, so the row stays in cache. Anything else (GroupNorm, whose
    statistics and output have different axes) runs each block parallel over its leading spatial axes,
    elementwise blocks vectorized. Each reduction keeps its sequential order within a row, so numerics do
    not change.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        if not any("R" in iter_kinds(sch, b) for b in blocks):
            return None
        left = try_inline_all(sch, blocks)
        from tvm.s_tir import dlight as dl

        rows = dl.cpu.Reduction().apply(sch.mod["main"], target, False)
        if rows is not None:
            return rows
        for block in left:
            schedule_loop_nest(sch, block, self.cost)
        return sch
