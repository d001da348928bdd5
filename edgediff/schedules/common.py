"""Shared pieces of the CPU schedule rules: block queries, epilogue inlining, and the register-tiled
reduction that both the convolution and the matmul rule are instances of.

Every rule takes its tile sizes from :class:`~edgediff.targets.CostModel` (vector lanes, register file,
cache sizes, core count), so the same rule produces 16-lane AVX-512 tiles on the host and 4-lane NEON
tiles for a Cortex-A78 without a constant in the rule itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm.s_tir.dlight.cpu.base import CPUScheduleRule

from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS

# Reduction loops shorter than this are fully unrolled inside the register tile (3x3 kernel windows).
UNROLL_REDUCTION_MAX = 3


class CostModelRule(CPUScheduleRule):
    """A CPU schedule rule whose tile sizes come from the target's cost model."""

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost

    def open_schedule(self, func: Any, target: Any) -> tuple[Any, list[Any]] | None:
        """A schedule of ``func`` and its top-level blocks, or None when the rule cannot apply here."""
        from tvm import s_tir, tirx

        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        return sch, child_blocks(sch)


def child_blocks(sch: Any) -> list[Any]:
    """The blocks directly under the function's root block, in program order."""
    from tvm.s_tir.dlight.analysis import get_root_block

    return list(sch.get_child_blocks(get_root_block(sch)))


def iter_kinds(sch: Any, block: Any) -> str:
    """'S'/'R' per block iter var (spatial / reduction), e.g. 'SSSSRRR' for a conv2d."""
    from tvm import tirx

    return "".join(
        "S"
        if iv.iter_type == tirx.IterVar.DataPar
        else "R"
        if iv.iter_type == tirx.IterVar.CommReduce
        else "O"
        for iv in sch.get(block).iter_vars
    )


def output_dtype(sch: Any, block: Any) -> str:
    """The dtype a block writes (what its vectors hold)."""
    return str(sch.get(block).writes[0].source.dtype)


def extent(sch: Any, loop: Any) -> int | None:
    """A loop's constant extent, or None for a symbolic one."""
    from tvm import tirx

    value = sch.get(loop).extent
    return int(value) if isinstance(value, tirx.IntImm) else None


def largest_divisor(n: int, limit: int) -> int:
    """The largest divisor of ``n`` that is at most ``limit`` (1 when none is larger)."""
    for d in range(max(1, min(n, limit)), 0, -1):
        if n % d == 0:
            return d
    return 1


def divisor_block(n: int, limit: int, multiple: int) -> int:
    """The largest divisor of ``n`` up to ``limit`` that is a multiple of ``multiple``, else the largest."""
    for b in range(min(n, max(1, limit)), 0, -1):
        if n % b == 0 and b % multiple == 0:
            return b
    return largest_divisor(n, limit)


def vector_width(n: int, lanes: int) -> int:
    """The vector length for an axis of extent ``n``: the largest power of two dividing it, up to ``lanes``.

    Powers of two keep LLVM's vector types legal on every ISA; a non-dividing width would need a predicated
    tail, which TVM's vectorizer turns back into scalar code.
    """
    width = 1
    while width * 2 <= lanes and n % (width * 2) == 0:
        width *= 2
    return width


def try_inline_all(sch: Any, candidates: list[Any]) -> list[Any]:
    """Inline producers into consumers (and consumers into producers) until nothing changes.

    Returns the blocks that could not be inlined. Used for fused epilogues (bias, residual add, SiLU) and
    for the reshapes legalization puts around norms; inlining removes their round trip through memory.
    """
    remaining = list(candidates)
    progress = True
    while progress:
        progress = False
        for primitive in (sch.compute_inline, sch.reverse_compute_inline):
            for block in list(remaining):
                try:
                    primitive(block)
                except Exception:  # noqa: BLE001 - TVM raises ScheduleError subclasses; "cannot" is the answer
                    continue
                remaining.remove(block)
                progress = True
    return remaining


def vectorize_innermost(sch: Any, block: Any, lanes: int) -> None:
    """Vectorize a block's innermost loop by the widest power-of-two width dividing it (if any)."""
    loops = sch.get_loops(block)
    if not loops:
        return
    n = extent(sch, loops[-1])
    if n is None:
        return
    width = vector_width(n, lanes)
    if width < 2:
        return
    if width < n:
        loops = [*loops[:-1], *sch.split(loops[-1], [None, width])]
    sch.vectorize(loops[-1])


def parallelize_outer(sch: Any, block: Any, loops: list[Any], cost: CostModel, work: int) -> Any | None:
    """Fuse ``loops`` and mark the result parallel when ``work`` (elements) is worth the fork/join."""
    if not loops or cost.spec.compute.cores < 2 or work < cost.parallel_threshold():
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    sch.parallel(fused)
    return fused


@dataclass(frozen=True)
class RegisterTile:
    """The tile sizes of a register-tiled reduction (what the rule chose, for tests and reports)."""

    rows: int  # output rows held in registers (conv: output channels; matmul: rows of A)
    col_vectors: int  # vectors per row in registers
    width: int  # lanes per vector


def choose_register_tile(cost: CostModel, dtype: str, rows: int, cols: int, sets: int = 1) -> RegisterTile:
    """Pick a register tile for an output of ``rows`` x ``cols`` (cols contiguous in memory).

    The column axis gets the target's vector lanes (two vectors when the extent allows, so each broadcast
    operand feeds two FMAs); rows take the rest of the accumulator budget, half the register file, shared
    by ``sets`` outputs accumulated together (GEGLU's two halves).
    """
    width = vector_width(cols, cost.vector_lanes(dtype))
    col_vectors = largest_divisor(cols // width, 2)
    rows_tile = largest_divisor(rows, max(1, cost.accumulator_vectors() // (col_vectors * sets)))
    return RegisterTile(rows_tile, col_vectors, width)


@dataclass(frozen=True)
class TiledLoops:
    """What :func:`schedule_register_tiled` leaves for the caller to finish."""

    write_back: Any  # block copying the accumulators out (epilogues are inlined into it)
    reduction: Any  # outermost reduction loop (where the reduction init goes)


def schedule_register_tiled(
    sch: Any,
    block: Any,
    cost: CostModel,
    tile: RegisterTile,
    *,
    outer: list[Any],
    row: Any,
    col: Any,
    reductions: list[Any],
) -> TiledLoops:
    """Tile a reduction block so that ``tile.rows`` x ``tile.col_vectors`` vectors accumulate in registers
    over the whole reduction, and parallelize it over the cores.

    ``outer`` lists all spatial loops in the order wanted, ``row`` and ``col`` included (each is replaced by
    its tile-block loop in place); those loops are fused and parallel. Inside: ``reductions`` in order, then
    the register tile (rows unrolled, vectors unrolled, lanes vectorized). The accumulator is a ``local``
    buffer of exactly the register tile, with constant indices once unrolled, so LLVM keeps it in
    registers; it is written back once per tile, and callers inline elementwise epilogues into that
    write-back. Call :func:`finish_reduction` after that: TVM only vectorizes and parallelizes loops over
    complete reduction blocks, so the reduction init is split off last.
    """
    row_o, row_i = sch.split(row, [None, tile.rows])
    col_o, col_m, col_i = sch.split(col, [None, tile.col_vectors, tile.width])
    spatial = [row_o if loop.same_as(row) else col_o if loop.same_as(col) else loop for loop in outer]
    sch.reorder(*spatial, *reductions, row_i, col_m, col_i)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, spatial[-1], preserve_unit_loops=True)
    sch.vectorize(col_i)
    sch.unroll(col_m)
    sch.unroll(row_i)
    for loop in reductions[1:]:
        n = extent(sch, loop)
        if n is not None and n <= UNROLL_REDUCTION_MAX:
            sch.unroll(loop)
    work = tile.rows * tile.col_vectors * tile.width
    for loop in spatial:
        work *= extent(sch, loop) or 1
    parallelize_outer(sch, block, spatial, cost, work)
    return TiledLoops(write_back, reductions[0])


def finish_reduction(sch: Any, block: Any, tiled: TiledLoops, lanes: int) -> None:
    """Vectorize the write-back (with any inlined epilogue) and split the reduction init off, vectorized."""
    vectorize_innermost(sch, tiled.write_back, lanes)
    init = sch.decompose_reduction(block, tiled.reduction)
    vectorize_innermost(sch, init, lanes)


def schedule_loop_nest(sch: Any, block: Any, cost: CostModel) -> None:
    """Parallelize a block's leading spatial loops and vectorize its innermost loop when that is spatial.

    The generic CPU schedule for everything that is not a register-tiled GEMM/conv: elementwise maps,
    layout changes and the reductions of norms/softmax (parallel over the rows they reduce, the reduction
    itself sequential within a row, so results are bit-identical to the unscheduled kernel).
    """
    kinds = iter_kinds(sch, block)
    loops = sch.get_loops(block)
    if len(loops) != len(kinds) or any(extent(sch, loop) is None for loop in loops):
        return
    lanes = cost.vector_lanes(output_dtype(sch, block)) if output_dtype(sch, block) in DTYPE_BITS else 1
    lead = len(kinds) - len(kinds.lstrip("S"))
    injective = lead == len(kinds)
    work = 1
    for loop in loops:
        work *= extent(sch, loop) or 1
    if injective:
        if len(loops) >= 2 and _transposes(sch, block):
            _schedule_transpose(sch, block, loops, cost, lanes, work)
            return
        # one flat loop: the parallel chunks and the vector lanes then fit any shape
        flat = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        width = vector_width(work, lanes)
        if width > 1:
            outer, inner = sch.split(flat, [None, width])
            sch.vectorize(inner)
        else:
            outer = flat
        parallelize_outer(sch, block, [outer], cost, work)
        return
    parallelize_outer(sch, block, loops[:lead], cost, work)


def _transposes(sch: Any, block: Any) -> bool:
    """Whether some read of an injective block is not indexed by the block's last iter var in its last dim.

    Such a block (a transpose, permute_dims of a weight, a layout change) reads with a large stride when
    its innermost loop is vectorized; it is tiled in 2-D instead.
    """
    from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

    stmt = sch.get(block)
    last = stmt.iter_vars[-1].var
    for read in stmt.reads:
        if len(read.region) >= 2:
            used = collect_vars_used_in_prim_expr(read.region[-1].min)
            if not any(v.same_as(last) for v in used):
                return True
    return False


def _schedule_transpose(
    sch: Any, block: Any, loops: list[Any], cost: CostModel, lanes: int, work: int
) -> None:
    """Tile the last two loops in ``lanes`` x ``lanes`` squares so both the strided reads and the contiguous
    writes of a tile hit the same few cache lines; vectorize the writes and parallelize the tile loops."""
    rows, cols = extent(sch, loops[-2]) or 1, extent(sch, loops[-1]) or 1
    tr, tc = vector_width(rows, lanes), vector_width(cols, lanes)
    row_o, row_i = sch.split(loops[-2], [None, tr])
    col_o, col_i = sch.split(loops[-1], [None, tc])
    sch.reorder(row_o, col_o, row_i, col_i)
    if tc > 1:
        sch.vectorize(col_i)
    parallelize_outer(sch, block, [*loops[:-2], row_o, col_o], cost, work)
