"""bfloat16 x bfloat16 -> float32 GEMM on x86 AVX512-BF16 (``vdpbf16ps``), with a portable path elsewhere.

``vdpbf16ps`` computes, per float32 lane ``l`` of 16, a 2-element dot product of bfloat16 pairs accumulated
in float32: ``C[l] += A[2l] * B[2l] + A[2l + 1] * B[2l + 1]``. The kernel is the register tile of
``kernels/int8_matmul.py`` with that step: ``rows`` rows x ``col_vectors`` vectors of 16 output columns stay
in registers over the reduction; per step of 2 along k, each row broadcasts one 32-bit word of A (two
bfloat16) and each vector loads 64 contiguous bytes of the weight.

Weight layout (packed at compile time by :func:`pack_bf16_weight`): ``[N / P, K / 2, P, 2]`` - column panels
of ``P`` columns and, inside a panel, the 2 k-values of one column next to each other: the ``[16, 2]`` block
the instruction multiplies.

As for ``vpdpbusd``, the instruction is reached through its LLVM intrinsic
(``llvm.x86.avx512bf16.dpbf16ps.512``) from low-level TIR, not through ``Schedule.tensorize`` (which
segfaults in apache-tvm 0.27, see int8_matmul.py). Targets without AVX512-BF16 get the same loop nest with
each bfloat16 widened to float32 (exact: a bfloat16 is the top half of a float32) and two float32 FMAs per
step, so the portable path computes the same products, summed in float32 in the same pair order up to FMA
contraction. It reads the same 32-bit words as ``vdpbf16ps`` (A's word broadcast, 8 words of W) and widens
both halves with a shift and a mask: no shuffles, about 1.35x faster than TVM's legalized bfloat16 matmul
on an AVX2 CPU (benchmarks/bf16_linear.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgediff.errors import PassError
from edgediff.kernels.register_tile import (
    RegisterTile,
    TileContext,
    choose_register_tile,
    pack_panels,
    register_tile_gemm,
)

PAIR = 2  # bfloat16 values per float32 lane that one vdpbf16ps reduces
KERNEL_NAME = "bf16_matmul"
DPBF16PS = "llvm.x86.avx512bf16.dpbf16ps.512"  # LLVM 22: (<16 x float>, <32 x bfloat>, <32 x bfloat>)
DPBF16_FUNCTION = "edgediff_dpbf16ps"
# TVM 0.27 cannot hand the intrinsic its <32 x bfloat> operands: BF16ComputeLegalize rewrites every bfloat16
# vector of the TIR into float32 (the call then fails LLVM's verifier, "Call parameter type does not match
# function signature"), and without that pass CodeGenLLVM has no LLVM type for bfloat16 and segfaults. So
# the kernel calls this function on <16 x i32> words (pairs of bfloat16 bits) and the module imports it as
# LLVM IR (``pragma_import_llvm``): it bitcasts to <32 x bfloat>, and LLVM inlines it into the loop.
DPBF16_LLVM_IR = f"""
declare <16 x float> @{DPBF16PS}(<16 x float>, <32 x bfloat>, <32 x bfloat>)
define internal <16 x float> @{DPBF16_FUNCTION}(<16 x float> %acc, <16 x i32> %a, <16 x i32> %b) #0 {{
  %ab = bitcast <16 x i32> %a to <32 x bfloat>
  %bb = bitcast <16 x i32> %b to <32 x bfloat>
  %r = call <16 x float> @{DPBF16PS}(<16 x float> %acc, <32 x bfloat> %ab, <32 x bfloat> %bb)
  ret <16 x float> %r
}}
attributes #0 = {{ alwaysinline nounwind }}
"""


# The register tile (rows x col_vectors vectors of ``lanes`` float32 accumulators): the shared one.
BF16Tile = RegisterTile


def has_avx512bf16(target: Any) -> bool:
    """Whether an LLVM ``target`` (Target or JSON dict) has ``vdpbf16ps`` (``mcpu`` such as
    sapphirerapids / znver4, or ``mattr`` +avx512bf16)."""
    import tvm
    from tvm.target import codegen

    target = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
    if target.kind.name != "llvm":
        return False
    return bool(codegen.target_has_features(["avx512bf16", "avx512f"], target))


def choose_bf16_tile(lanes: int, rows: int, columns: int, registers: int = 32) -> BF16Tile:
    """The largest register tile (accumulators within 3/4 of the register file) dividing the output."""
    return choose_register_tile(lanes, rows, columns, registers, "bf16 matmul")


def pack_bf16_weight(weight: np.ndarray, panel: int) -> np.ndarray:
    """``W[k, n]`` (bfloat16 ``[K, N]``: ``out = a @ W``) -> ``[N / P, K / 2, P, 2]`` bfloat16 (K zero-padded
    to even)."""
    weight = np.asarray(weight)
    if str(weight.dtype) != "bfloat16" or weight.ndim != 2:
        raise PassError(
            f"bf16 weight packing: expected a 2-D bfloat16 array, got {weight.dtype}{list(weight.shape)}"
        )
    return pack_panels(weight, panel, PAIR, "bf16 weight packing")


def bf16_matmul_func(
    rows: int, depth: int, columns: int, tile: BF16Tile, *, use_dpbf16: bool, parallel: bool = True
) -> Any:
    """The GEMM as a scheduled TIR PrimFunc ``bf16_matmul(a, w, bias, out)``: ``a`` ``[rows, depth]``
    bfloat16, ``w`` packed ``[columns / P, depth / 2, P, 2]`` bfloat16, ``bias`` ``[columns]`` float32,
    ``out`` ``[rows, columns]`` float32 ``= a @ W + bias`` (accumulated in float32 in registers)."""
    from tvm.script import tirx as T

    if depth % PAIR:
        raise PassError(f"bf16 matmul: reduction depth {depth} is not even; pad it")
    if rows % tile.rows or columns % tile.panel:
        raise PassError(f"bf16 matmul: tile {tile} does not fit a {rows} x {columns} output")
    if use_dpbf16 and tile.lanes != 16:
        raise PassError(f"bf16 matmul: vdpbf16ps has 16 float32 lanes, the tile has {tile.lanes}")
    lanes, rt, panel = tile.lanes, tile.rows, tile.panel
    depth2, panels, blocks = depth // PAIR, columns // panel, rows // rt

    # The float32 value of the bfloat16 in the low / high half of 32-bit words (scalar or vector): the
    # portable step reads the same words as vdpbf16ps, and a shift or a mask is all a widening takes (a
    # strided load of the bfloat16 elements and a cast would shuffle the pairs apart first).
    def low_half(words: Any) -> Any:
        return T.reinterpret(f"float32x{lanes}", T.shift_left(words, T.broadcast(T.int32(16), lanes)))

    def high_half(words: Any) -> Any:
        return T.reinterpret(f"float32x{lanes}", T.bitwise_and(words, T.broadcast(T.int32(-65536), lanes)))

    def step(ctx: TileContext, t: Any, r: Any, v: Any, ko: Any) -> None:
        # tile t is (panel t // blocks, row block t % blocks); A's k pair as one 32-bit word, broadcast,
        # and the 32-bit words of W (pairs of bfloat16): int32 views of the bfloat16 buffers
        a_word = T.broadcast(ctx.buffers["a_words"][(t % blocks * rt + r) * depth2 + ko], lanes)
        w_words = ctx.buffers["w_words"][T.ramp((t // blocks * depth2 + ko) * panel + v * lanes, 1, lanes)]
        if use_dpbf16:  # bitcast to <32 x bfloat> by the imported function
            ctx.update(
                r, v, T.call_extern(f"float32x{lanes}", DPBF16_FUNCTION, ctx.value(r, v), a_word, w_words)
            )
        else:
            # portable: each bfloat16 widened to float32 by bit operations (exact: a bfloat16 is the top
            # half of a float32; on a little-endian CPU the even k is the word's low half), two FMAs
            ctx.update(
                r,
                v,
                ctx.value(r, v)
                + low_half(a_word) * low_half(w_words)
                + high_half(a_word) * high_half(w_words),
            )

    def epilogue(ctx: TileContext, t: Any, r: Any, v: Any) -> None:
        columns_of = T.ramp(t // blocks * panel + v * lanes, 1, lanes)
        value = ctx.value(r, v) + ctx.buffers["bias"][columns_of]
        T.buffer_store(ctx.buffers["out"], value, [t % blocks * rt + r, columns_of])

    return register_tile_gemm(
        KERNEL_NAME,
        [
            ("a", (rows, depth), "bfloat16"),
            ("w", (panels, depth2, panel, PAIR), "bfloat16"),
            ("bias", (columns,), "float32"),
            ("out", (rows, columns), "float32"),
        ],
        tile,
        tiles=panels * blocks,
        depth_steps=depth2,
        acc_dtype="float32",
        step=step,
        epilogue=epilogue,
        views=[
            ("a_words", (rows * depth2,), "int32", "a"),
            ("w_words", (panels * depth2 * panel,), "int32", "w"),
        ],
        import_llvm=DPBF16_LLVM_IR if use_dpbf16 else "; nothing to import on the portable path\n",
        parallel=parallel,
    )


def build_bf16_matmul(
    rows: int,
    depth: int,
    columns: int,
    target: Any,
    *,
    tile: BF16Tile | None = None,
    parallel: bool = True,
) -> tuple[Any, bool, BF16Tile]:
    """A standalone kernel module for ``target``: ``(IRModule, uses vdpbf16ps, tile)``; build it with
    ``tvm.compile(mod, target)``. The portable path uses 8 lanes (one AVX2 register of float32)."""
    import tvm

    use_dpbf16 = has_avx512bf16(target)
    tile = tile or choose_bf16_tile(16 if use_dpbf16 else 8, rows, columns, 32 if use_dpbf16 else 16)
    func = bf16_matmul_func(rows, depth, columns, tile, use_dpbf16=use_dpbf16, parallel=parallel)
    return tvm.IRModule({KERNEL_NAME: func}), use_dpbf16, tile
