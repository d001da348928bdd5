"""Elementwise / injective kernels (activations, adds, reshapes, transposes, concat) on CPUs."""

from __future__ import annotations

from typing import Any

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from edgediff.lowering.schedules.common import child_blocks, iter_kinds, schedule_loop_nest, try_inline_all
from edgediff.targets import CostModel


class Elementwise(CPUScheduleRule):
    """Inline chains of injective blocks into one loop nest, then split it into parallel x vector loops.

    Legalized Relax keeps every op of a fused group as its own block with a full-size intermediate
    buffer; inlining turns the group into a single pass over memory, which is what ``fuse-ops`` meant.
    """

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        blocks = child_blocks(sch)
        if not blocks or any(set(iter_kinds(sch, b)) - {"S"} for b in blocks):
            return None
        for block in try_inline_all(sch, blocks):
            schedule_loop_nest(sch, block, self.cost)
        return sch
