"""Dense and batched matmul on CPUs: row x vector register tiles, vectorized along the output columns."""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import (
    CostModelRule,
    child_blocks,
    choose_register_tile,
    dequantize_stages,
    dequantize_weights,
    extent,
    finish_reduction,
    iter_kinds,
    loop_above,
    output_dtype,
    parallelize_outer,
    schedule_register_tiled,
    try_inline_all,
    vectorize_innermost,
)


class Matmul(CostModelRule):
    """Schedule a (fused) ``matmul`` kernel ``C[..., i, j] = sum_k A[..., i, k] * B[..., k, j]``.

    This is the layout Relax gives ``nn.Linear`` (the weight is transposed to ``[in, out]`` before the
    matmul) and attention's batched products. ``rows`` rows of A x ``col_vectors`` vectors of C accumulate
    in registers: each k step broadcasts ``rows`` elements of A and loads ``col_vectors`` contiguous vectors
    of B, and the accumulators stay in registers over all of k; batch, column blocks and row blocks are
    parallel. Bias/activation/residual epilogues are inlined into the accumulator write-back. A matmul
    whose B is not contiguous along j (``[j, k]`` layout) is left to the GEMV/fallback rules; B in column
    panels of the tile's width (``pack-matmul-weights``) is read one contiguous panel per tile.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        from tvm import tirx

        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        matmuls = [b for b in blocks if sch.get(b).name_hint == "matmul"]
        if len(matmuls) != 1:
            return None
        block = matmuls[0]
        kinds = iter_kinds(sch, block)
        if len(kinds) < 3 or kinds[-1] != "R" or "R" in kinds[:-1]:
            return None
        loops = sch.get_loops(block)
        if len(loops) != len(kinds) or any(not isinstance(sch.get(lp).extent, tirx.IntImm) for lp in loops):
            return None
        layout = _column_layout(sch.get(block))
        if layout is None:
            return None
        *batch, i, j, k = loops
        dtype = output_dtype(sch, block)
        lanes = self.cost.vector_lanes(dtype)
        tile = choose_register_tile(self.cost, dtype, int(sch.get(i).extent), int(sch.get(j).extent))
        if layout and layout != tile.col_vectors * tile.width:
            return None  # panels of another width than the tile: a tile would straddle two panels
        # column blocks outside row blocks: one B panel (k x tile columns) stays in cache while the row
        # blocks of A stream past it
        stages = dequantize_stages(sch, block)
        if stages:
            # weight-only int8: each weight panel is widened once per group of row tiles, so the groups
            # are the parallel work and the row tiles of a group run serially under the widened panel
            groups = self._row_groups(
                extent(sch, i) // tile.rows, extent(sch, j) // (tile.col_vectors * tile.width), batch, sch
            )
            i_group, i_rows = sch.split(i, [groups, None])
            outer, row, parallel = [*batch, j, i_group, i_rows], i_rows, len(batch) + 2
        else:
            outer, row, parallel = [*batch, j, i], i, None
        tiled = schedule_register_tiled(
            sch, block, self.cost, tile, outer=outer, row=row, col=j, reductions=[k], parallel=parallel
        )
        done = {sch.get(b) for b in (block, tiled.write_back, *stages)}
        left = try_inline_all(sch, [b for b in child_blocks(sch) if sch.get(b) not in done])
        if left:
            return None  # an epilogue that is not elementwise: not a plain matmul kernel
        if stages:
            # the panel (depth x tile columns) is depth x 64-128 bytes: a global (heap) buffer per task
            dequantize_weights(sch, block, loop_above(sch, block, tiled.serial[0]), lanes, scope="global")
        finish_reduction(sch, block, tiled, lanes)
        return sch

    def _row_groups(self, row_tiles: int, column_tiles: int, batch: list[Any], sch: Any) -> int:
        """How many groups the row tiles are split into: the fewest (each group widens each weight panel
        once) that still give every core several tasks; all row tiles in one group on a single core."""
        tasks = column_tiles
        for loop in batch:
            tasks *= extent(sch, loop) or 1
        wanted = 4 * self.cost.spec.compute.cores if self.cost.spec.compute.cores > 1 else 1
        for groups in range(1, row_tiles + 1):
            if row_tiles % groups == 0 and tasks * groups >= wanted:
                return groups
        return row_tiles


def _column_layout(block: Any) -> int | None:
    """How B (the read not indexed by the row var) holds the output columns: 0 when it is indexed by the
    column var last (row-major ``[k, j]``), ``P`` for column panels ``[j // P, k, j % P]``
    (``pack-matmul-weights``), None for anything else (or when A is indexed by the column var)."""
    from tvm import tirx
    from tvm.s_tir.dlight.analysis import collect_vars_used_in_prim_expr

    iter_vars = [iv.var for iv in block.iter_vars]
    row, col = iter_vars[-3], iter_vars[-2]

    def uses(expr: Any, var: Any) -> bool:
        return any(v.same_as(var) for v in collect_vars_used_in_prim_expr(expr))

    def panel_index(expr: Any, kind: type) -> int | None:
        if isinstance(expr, kind) and expr.a.same_as(col) and isinstance(expr.b, tirx.IntImm):
            return int(expr.b)
        return None

    out = block.writes[0]
    if not out.region or not out.region[-1].min.same_as(col):
        return None
    layout = None
    for read in block.reads:
        if read.source.same_as(out.source):
            continue
        if any(uses(r.min, row) for r in read.region):
            if any(uses(r.min, col) for r in read.region):
                return None
        elif read.region and read.region[-1].min.same_as(col):
            layout = 0
        elif len(read.region) == 3 and (panel := panel_index(read.region[-1].min, tirx.FloorMod)):
            if panel_index(read.region[0].min, tirx.FloorDiv) != panel:
                return None
            layout = panel
        else:
            return None
    return layout


class GegluMatmul(CostModelRule):
    """Schedule the GEGLU kernel of ``fuse-norm-activation``: ``(x W_a + b_a) * gelu(x W_g + b_g)``.

    The reduction block computes both halves, ``C[i, h, j]`` for ``h`` in {0, 1}; the register tile holds
    ``rows`` x 2 x ``col_vectors`` vectors (rows sized for both halves) over the whole reduction, and the
    epilogue (biases, GELU, product) is computed at the tile from the accumulators, vectorized: the
    ``2N``-wide Linear output never goes to memory. Loop order and parallelism are the Matmul rule's.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        if [sch.get(b).name_hint for b in blocks] != ["geglu_matmul", "geglu"]:
            return None
        block, epilogue = blocks
        if iter_kinds(sch, block) != "SSSR":
            return None
        i, h, j, k = sch.get_loops(block)
        if any(extent(sch, loop) is None for loop in (i, h, j, k)) or extent(sch, h) != 2:
            return None
        dtype = output_dtype(sch, block)
        lanes = self.cost.vector_lanes(dtype)
        rows, cols = extent(sch, i), extent(sch, j)
        tile = choose_register_tile(self.cost, dtype, rows, cols, sets=2)
        # the tile loops come from the epilogue (its reads of both halves are a region, which TVM can
        # compute the accumulators for, but not reverse-compute the epilogue at)
        ei, ez, ej = sch.get_loops(epilogue)
        ei_o, ei_i = sch.split(ei, [None, tile.rows])
        ej_o, ej_m, ej_i = sch.split(ej, [None, tile.col_vectors, tile.width])
        sch.reorder(ej_o, ei_o, ez, ei_i, ej_m, ej_i)
        sch.compute_at(block, ei_o, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")  # exactly the register tile, constant indices once unrolled
        ti, th, tj, tk = sch.get_loops(block)[-4:]
        tj_m, tj_i = sch.split(tj, [tile.col_vectors, tile.width])
        sch.reorder(tk, th, ti, tj_m, tj_i)
        for loop in (th, ti, tj_m, ez, ei_i, ej_m):
            sch.unroll(loop)
        sch.vectorize(tj_i)
        sch.vectorize(ej_i)
        # parallel before the init is split off: TVM parallelizes only loops over complete reductions
        parallelize_outer(sch, epilogue, [ej_o, ei_o], self.cost, rows * cols)
        init = sch.decompose_reduction(block, tk)
        vectorize_innermost(sch, init, lanes)
        return sch
