"""Direct NCHW conv2d on CPUs: output-channel x output-width register tiles, vectorized along the width."""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import (
    CostModelRule,
    child_blocks,
    choose_register_tile,
    dequantize_stages,
    dequantize_weights,
    finish_reduction,
    iter_kinds,
    loop_above,
    output_dtype,
    parallelize_outer,
    schedule_register_tiled,
    split_for_dequantize,
    try_inline_all,
    vectorize_innermost,
)

# The largest float panel of widened int8 weights (one block of output channels, its whole reduction) that
# a weight-only conv widens once for all its output rows: an L1 data cache (32 KB and up). Widened per
# 16-channel chunk under every register tile instead, w8 1x1 convs ran 3-11% slower than fp32; a panel in
# L2 was slower still (640-channel 3x3: 0.80x of fp32, its broadcasts 23 KB apart); benchmarks/w8_conv.py.
WIDENED_PANEL_BYTES = 32 * 1024


class Conv2d(CostModelRule):
    """Schedule a (fused) ``conv2d_nchw`` kernel: the padding stage, the convolution and its epilogue.

    The convolution keeps ``rows`` output channels x ``col_vectors`` vectors of output pixels of one
    output row in registers; each step of the (input channel, ky, kx) reduction loads one input vector and
    broadcasts ``rows`` weights; the accumulators stay in registers over the whole reduction. The
    (batch, channel block, output row, pixel block) loops are parallel over the cores. Elementwise
    epilogues fused by ``fuse-ops`` (bias, residual add, time-embedding add, scaling) are inlined into the
    accumulator write-back, so the output is written once.

    Why NCHW and not NCHWc: weights are function parameters here (kept out of the library), so a layout
    change of the weights would run on every call unless it is lifted to compile time; the width axis of
    NCHW is contiguous in the input and the output, which is all a register tile needs.
    """

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any | None:
        opened = self.open_schedule(func, target)
        if opened is None:
            return None
        sch, blocks = opened
        convs = [
            b
            for b in blocks
            if sch.get(b).name_hint.startswith("conv2d_nchw") and iter_kinds(sch, b) == "SSSSRRR"
        ]
        if len(convs) != 1:
            return None
        conv = convs[0]
        loops = sch.get_loops(conv)
        if len(loops) != 7 or any(sch.get(loop).extent.__class__.__name__ != "IntImm" for loop in loops):
            return None
        producers = list(sch.get_producers(conv))
        pads = [b for b in producers if sch.get(b).name_hint.startswith("pad_temp")]

        n, f, y, x, rc, ry, rx = loops
        dtype = output_dtype(sch, conv)
        lanes = self.cost.vector_lanes(dtype)
        tile = choose_register_tile(self.cost, dtype, int(sch.get(f).extent), int(sch.get(x).extent))
        # int8 weights (weight-only w8): the block of output channels' whole weights widened once, shared
        # by all its output rows and pixel blocks (which then run serially under it, the channel blocks
        # being the parallel work), when that float panel fits in L1 and the blocks are enough tasks for
        # every core; else a chunk of input channels at a
        # time under each register tile, see dequantize_weights
        reduction = int(sch.get(rc).extent) * int(sch.get(ry).extent) * int(sch.get(rx).extent)
        blocks = int(sch.get(n).extent) * int(sch.get(f).extent) // tile.rows  # the parallel tasks then
        panel = (
            bool(dequantize_stages(sch, conv))
            and tile.rows * reduction * 4 <= WIDENED_PANEL_BYTES
            and blocks >= 4 * self.cost.spec.compute.cores
        )
        chunks = [rc] if panel else split_for_dequantize(sch, conv, rc)
        tiled = schedule_register_tiled(
            sch,
            conv,
            self.cost,
            tile,
            outer=[n, f, y, x],
            row=f,
            col=x,
            reductions=[*chunks, ry, rx],
            parallel=2 if panel else None,
        )
        done = {sch.get(b) for b in (conv, tiled.write_back, *pads, *dequantize_stages(sch, conv))}
        epilogue = [b for b in child_blocks(sch) if sch.get(b) not in done]
        for block in try_inline_all(sch, epilogue) + pads:
            self._schedule_rest(sch, block, lanes)
        # the widened weights: per block of output channels (a heap buffer per task), per chunk of input
        # channels, or around a reduction too short to split
        if panel:
            dequantize_weights(sch, conv, loop_above(sch, conv, tiled.serial[0]), lanes, scope="global")
        else:
            dequantize_weights(
                sch, conv, chunks[0] if len(chunks) > 1 else loop_above(sch, conv, chunks[0]), lanes
            )
        finish_reduction(sch, conv, tiled, lanes)
        return sch

    def _schedule_rest(self, sch: Any, block: Any, lanes: int) -> None:
        loops = sch.get_loops(block)
        work = 1
        for loop in loops:
            work *= int(sch.get(loop).extent)
        parallelize_outer(sch, block, loops[:2], self.cost, work)
        vectorize_innermost(sch, block, lanes)
