"""Reductions on CPUs (GroupNorm, LayerNorm, softmax, mean, max): parallel over the rows they reduce."""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import (
    CostModelRule,
    extent,
    iter_kinds,
    schedule_loop_nest,
    try_inline_all,
)

# Calls that cost tens of instructions per element even when vectorized (see backend/fast_math.py).
TRANSCENDENTAL = frozenset({"tirx.exp", "tirx.erf", "tirx.tanh", "tirx.sigmoid", "tirx.log", "tirx.pow"})


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
        # softmax's exp feeds both the sum and the normalisation: inlined, it would be computed twice per
        # element; kept as a block, dlight computes it once per row into a row-sized buffer
        shared = [b for b in blocks if _transcendental(sch, b) and len(sch.get_consumers(b)) > 1]
        left = try_inline_all(sch, [b for b in blocks if b not in shared]) + shared
        from tvm.s_tir import dlight as dl

        if _same_rows(sch, left):
            rows = dl.cpu.Reduction().apply(sch.mod["main"], target, False)
            if rows is not None:
                return rows
        for block in left:
            schedule_loop_nest(sch, block, self.cost)
        return sch


def _transcendental(sch: Any, block: Any) -> bool:
    """Whether a block's stored value calls exp/erf/tanh/sigmoid/log/pow."""
    from tvm import tirx

    body = sch.get(block).body
    return isinstance(body, tirx.BufferStore) and _calls(body.value, TRANSCENDENTAL)


def _calls(expr: Any, ops: frozenset[str]) -> bool:
    """Whether ``expr`` contains a call to one of ``ops`` (a walk over the expression's operands)."""
    op = getattr(expr, "op", None)
    if op is not None and getattr(op, "name", None) in ops:
        return True
    children = [getattr(expr, f, None) for f in ("a", "b", "value", "condition", "true_value", "false_value")]
    children += list(getattr(expr, "args", None) or [])
    return any(c is not None and _calls(c, ops) for c in children if not isinstance(c, (int, float, str)))


def _same_rows(sch: Any, blocks: list[Any]) -> bool:
    """Whether every block has the same leading spatial extent (rows) as the others.

    dlight's Reduction computes every block under the last block's row loop. GroupNorm's statistics have
    one row per group but its output one per channel: under the channel loop each group's statistics
    would be recomputed once per channel of the group (10x the reduction work for SD's 320-channel
    GroupNorm), so such kernels are scheduled block by block instead.
    """
    kinds = [iter_kinds(sch, b) for b in blocks]
    if not kinds or any(not k.startswith("S") for k in kinds):
        return False
    lead = min(len(k) - len(k.lstrip("S")) for k in kinds)
    rows = set()
    for block in blocks:
        n = 1
        for loop in sch.get_loops(block)[:lead]:
            n *= extent(sch, loop) or 0
        rows.add(n)
    return len(rows) == 1
