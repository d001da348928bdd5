"""Elementwise / injective kernels (activations, adds, reshapes, transposes, concat) on CPUs."""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import (
    CostModelRule,
    iter_kinds,
    schedule_loop_nest,
    try_inline_all,
)


class Elementwise(CostModelRule):
    """Inline chains of injective blocks into one loop nest, then split it into parallel x vector loops.

    Legalized Relax keeps every op of a fused group as its own block with a full-size intermediate
    buffer; inlining turns the group into a single pass over memory, which is what ``fuse-ops`` meant.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        if not blocks or any(set(iter_kinds(sch, b)) - {"S"} for b in blocks):
            return None
        for block in try_inline_all(sch, blocks):
            schedule_loop_nest(sch, block, self.cost)
        return sch
