"""The Winograd transform kernels on CPUs (weight, input and output transforms of ``winograd-conv2d``)."""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import (
    CostModelRule,
    extent,
    output_dtype,
    parallelize_outer,
    try_inline_all,
    vector_width,
    vectorize_innermost,
)

# The block annotation ``winograd-conv2d`` puts on its transform blocks (value: the output tile size m).
ANNOTATION = "edgediff.winograd"


class WinogradTransform(CostModelRule):
    """Schedule the transforms written by ``winograd-conv2d``: each computes alpha^2 (or m^2) outputs per
    tile as a Select over the transform-matrix row, so the row loop must be unrolled for the Select to fold
    into straight-line code with constant coefficients (zeros dropped). The tile axis is contiguous in the
    GEMM's operands and is the vector axis; channels are parallel over the cores.

    - weight: U[e, k, c] = G g G^T; unrolled e, scalar c, parallel k (runs once when lifted).
    - input: V[e, c, p] = B^T d B. Per channel (parallel): the zero-padded plane (in L1), then per vector
      of tiles the gathered windows, B^T d and (B^T d) B, each unrolled over its transform row.
    - output: O[k, i, j, p] = A^T M A per output channel (parallel) and vector of tiles, then the scatter
      to NCHW, parallel over (image, channel), with the position inside the tile unrolled so that every
      index is affine; fused epilogues (bias, residual, activation) are inlined into the scatter, which
      writes each output element once.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        named = {sch.get(b).name_hint: b for b in blocks}
        tagged = [b for b in blocks if ANNOTATION in sch.get(b).annotations]
        if not tagged:
            return None
        lanes = self.cost.vector_lanes(output_dtype(sch, tagged[-1]))
        if "winograd_weight" in named:
            # the G table inlined: with the rows unrolled its entries fold to constants; scalar, since the
            # weight's 3x3 taps are 9 elements apart (with lifting this kernel is not scheduled at all)
            if try_inline_all(
                sch, [b for b in blocks if not sch.get(b).same_as(sch.get(named["winograd_weight"]))]
            ):
                return None
            self._vector_tiles(sch, named["winograd_weight"], 1, 1)
            return sch
        if {"winograd_input", "winograd_rows", "winograd_tiles"} <= set(named):
            return self._input(sch, named, lanes)
        if {"winograd_output", "winograd_out_rows", "winograd_scatter"} <= set(named):
            return self._output(sch, blocks, named, lanes)
        return None

    def _vector_tiles(self, sch: Any, block: Any, unrolled: int, lanes: int) -> Any:
        """Loops (rows to unroll..., channel..., last) -> (channel..., last_o, unrolled..., last_i vector);
        ``unrolled`` loops lead; the remaining leading loops are parallel. Returns the last_o loop."""
        loops = sch.get_loops(block)
        rows, channels, last = loops[:unrolled], loops[unrolled:-1], loops[-1]
        width = vector_width(extent(sch, last) or 1, lanes)
        last_o, last_i = sch.split(last, [None, width])
        sch.reorder(*channels, last_o, *rows, last_i)
        for loop in rows:
            sch.unroll(loop)
        if width > 1:
            sch.vectorize(last_i)
        work = 1
        for loop in sch.get_loops(block):
            work *= extent(sch, loop) or 1
        parallelize_outer(sch, block, channels[:1], self.cost, work)
        return last_o

    def _input(self, sch: Any, named: dict[str, Any], lanes: int) -> Any:
        # V[e, c, p]: per channel (parallel), per vector of tiles: the windows, then B^T d, then (B^T d) B
        tiles_o = self._vector_tiles(sch, named["winograd_input"], 1, lanes)
        channel = sch.get_loops(named["winograd_input"])[0]
        for name in ("winograd_rows", "winograd_tiles"):
            block = named[name]
            sch.compute_at(block, tiles_o, preserve_unit_loops=True)
            inner = sch.get_loops(block)[-4:]  # (channel, row, column, tile) of this vector block
            if name == "winograd_rows":
                sch.unroll(inner[1])
            vectorize_innermost(sch, block, lanes)
        if "winograd_pad" in named:
            sch.compute_at(named["winograd_pad"], channel, preserve_unit_loops=True)
            vectorize_innermost(sch, named["winograd_pad"], lanes)
        return sch

    def _output(self, sch: Any, blocks: list[Any], named: dict[str, Any], lanes: int) -> Any | None:
        scatter = named["winograd_scatter"]
        ours = {sch.get(named[n]) for n in ("winograd_output", "winograd_out_rows", "winograd_scatter")}
        # bias / residual adds (and the reshapes feeding them): into the scatter, which writes each output
        # element once
        if try_inline_all(sch, [b for b in blocks if sch.get(b) not in ours]):
            return None
        # O[k, i, j, p]: per output channel (parallel), per vector of tiles: A^T M, then (A^T M) A
        out = named["winograd_output"]
        k, i, j, _ = sch.get_loops(out)
        sch.reorder(i, j, k)  # (i, j, k, p) -> rows to unroll lead, as _vector_tiles expects
        tiles_o = self._vector_tiles(sch, out, 2, lanes)
        rows = named["winograd_out_rows"]
        sch.compute_at(rows, tiles_o, preserve_unit_loops=True)
        inner = sch.get_loops(rows)[-4:]  # (channel, row, column, tile)
        sch.unroll(inner[1])
        vectorize_innermost(sch, rows, lanes)
        # the scatter to NCHW, parallel over (image, channel): rows and columns split by the tile size with
        # the position in the tile unrolled, so every index is affine (no division per element); scalar,
        # since tiles per row rarely fill a vector
        tile = extent(sch, sch.get_loops(out)[-2]) or 1  # the unrolled j loop: m
        batch, channel, row, col = sch.get_loops(scatter)
        sch.split(row, [None, tile])
        col_o, col_i = sch.split(col, [None, tile])
        # innermost across the tiles of a row: O is read contiguously, the output with stride m
        sch.reorder(col_i, col_o)
        sch.unroll(col_i)
        # (not under the tile loop's channel: its indices are not affine, so TVM cannot place it there)
        fused = sch.fuse(batch, channel)
        work = 1
        for loop in sch.get_loops(scatter):
            work *= extent(sch, loop) or 1
        parallelize_outer(sch, scatter, [fused], self.cost, work)
        return sch
