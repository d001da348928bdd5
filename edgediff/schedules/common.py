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
    serial: tuple[Any, ...] = ()  # the spatial loops left serial inside the parallel ones (``parallel``)


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
    parallel: int | None = None,
) -> TiledLoops:
    """Tile a reduction block so that ``tile.rows`` x ``tile.col_vectors`` vectors accumulate in registers
    over the whole reduction, and parallelize it over the cores.

    ``outer`` lists all spatial loops in the order wanted, ``row`` and ``col`` included (each is replaced by
    its tile-block loop in place); those loops are fused and parallel. Inside: ``reductions`` in order, then
    the register tile (rows unrolled, vectors unrolled, lanes vectorized). The accumulator is a ``local``
    buffer of exactly the register tile, with constant indices once unrolled, so LLVM keeps it in
    registers; it is written back once per tile, and callers inline elementwise epilogues into that
    write-back. Call :func:`finish_reduction` after that: TVM only vectorizes and parallelizes loops over
    complete reduction blocks, so the reduction init is split off last. ``parallel``: only that many
    leading spatial loops are fused and parallel, the rest run serially inside them (returned as
    ``serial``), so that work hoisted above them (a widened weight panel) is shared by their tiles.
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
    depth = len(spatial) if parallel is None else parallel
    parallelize_outer(sch, block, spatial[:depth], cost, work)
    return TiledLoops(write_back, reductions[0], tuple(spatial[depth:]))


# The stage of a weight-only kernel that widens its integer weight (kernels/dequantize.py makes it; the
# rules below look for it by this name).
DEQUANTIZE_BLOCK = "weight_dequantize"

# Reduction steps whose integer weights one dequantized chunk covers (see dequantize_weights): enough
# that the chunk's conversion is a few full vectors, few enough that the float chunk stays in L1.
DEQUANT_CHUNK = 16


def dequantize_stages(sch: Any, block: Any) -> list[Any]:
    """The blocks widening an integer weight for ``block`` (``kernels/dequantize.py``; weight-only int8)."""
    return [b for b in sch.get_producers(block) if sch.get(b).name_hint.startswith(DEQUANTIZE_BLOCK)]


def split_for_dequantize(sch: Any, block: Any, loop: Any) -> list[Any]:
    """``[loop]``, or ``[outer, inner]`` with an inner chunk of up to :data:`DEQUANT_CHUNK` steps when
    ``block`` reads a widened integer weight (:func:`dequantize_weights` then widens it chunk by chunk)."""
    n = extent(sch, loop)
    if not dequantize_stages(sch, block) or n is None:
        return [loop]
    chunk = largest_divisor(n, DEQUANT_CHUNK)
    if chunk in (1, n):
        return [loop]
    return list(sch.split(loop, [None, chunk]))


def loop_above(sch: Any, block: Any, loop: Any) -> Any | None:
    """The loop directly around ``loop`` among ``block``'s loops (None for the outermost)."""
    loops = sch.get_loops(block)
    position = next(i for i, each in enumerate(loops) if sch.get(each).same_as(sch.get(loop)))
    return loops[position - 1] if position else None


def dequantize_weights(sch: Any, block: Any, at: Any | None, lanes: int, scope: str = "local") -> int:
    """Widen the integer weights a register-tiled reduction reads once per iteration of loop ``at``, into
    a float buffer the micro-kernel reads instead; returns how many weights are widened so.

    A weight-only int8 conv2d/matmul that casts each weight element where it is used pays, in a register
    tile where one weight is broadcast to a vector of accumulators, a scalar load, sign extension and
    int-to-float conversion per FMA instead of one broadcast load: ``w8`` convolutions ran at half the
    speed of fp32. Widened here a vector at a time, once per ``at`` iteration (a reduction chunk of the
    conv's weights, contiguous in the weight and L1-resident; a matmul's whole weight panel, shared by the
    row tiles below ``at``), the loops inside are exactly the fp32 micro-kernel. The per-channel scale
    stays on the output (the epilogue). ``at`` None: nothing to hold the widening, the cast stays where
    it is used.
    """
    stages = dequantize_stages(sch, block)
    if not stages or at is None:
        return 0
    for stage in stages:
        sch.set_scope(stage, 0, scope)
        sch.compute_at(stage, at, preserve_unit_loops=True)
        _vectorize_copy(sch, stage, at, lanes)
    return len(stages)


def widened_in_kernel(func: Any) -> bool | None:
    """For a scheduled kernel: None when it widens no integer weight; else whether every widening stage
    was placed inside the reduction's loop nest (by :func:`dequantize_weights`) rather than left to widen
    the whole weight ahead of it (a rule fallback, which writes a float copy of the weight per call)."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    stages = [b for b in child_blocks_all(sch) if sch.get(b).name_hint.startswith(DEQUANTIZE_BLOCK)]
    if not stages:
        return None
    for stage in stages:
        loops = sch.get_loops(stage)
        consumers = sch.get_consumers(stage)
        if not loops or not consumers:
            return False
        if not any(
            sch.get_loops(c) and sch.get(sch.get_loops(c)[0]).same_as(sch.get(loops[0])) for c in consumers
        ):
            return False
    return True


def child_blocks_all(sch: Any) -> list[Any]:
    """Every block of the function (at any depth), in program order."""
    from tvm.s_tir.dlight.analysis import get_root_block

    found: list[Any] = []

    def walk(block: Any) -> None:
        for child in sch.get_child_blocks(block):
            found.append(child)
            walk(child)

    walk(get_root_block(sch))
    return found


def _vectorize_copy(sch: Any, block: Any, at: Any, lanes: int) -> None:
    """Vectorize a copy block placed under ``at``: its loops below ``at`` (one per buffer dimension) are
    fused from the innermost outwards while the region stays contiguous in the source buffer (each inner
    loop spans its whole dimension), and the fused loop is split by the vector width."""
    loops = sch.get_loops(block)
    depth = next(i for i, loop in enumerate(loops) if sch.get(loop).same_as(sch.get(at))) + 1
    inner = loops[depth:]
    shape = [int(d) for d in sch.get(block).reads[0].source.shape]
    if not inner or len(inner) != len(shape):
        return
    first = len(inner) - 1
    while first > 0 and extent(sch, inner[first]) == shape[first]:
        first -= 1
    run = inner[first:]
    fused = sch.fuse(*run) if len(run) > 1 else run[0]
    width = vector_width(extent(sch, fused) or 1, lanes)
    if width > 1:
        _, vec = sch.split(fused, [None, width])
        sch.vectorize(vec)


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
