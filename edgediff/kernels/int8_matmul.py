"""int8 x int8 -> int32 GEMM on the target's dot-product instruction (x86 ``vpdpbusd``, Arm ``sdot``).

Both instructions compute, per 32-bit lane, a 4-element dot product of bytes accumulated into int32:
``C[l] += sum_{t<4} A[t] * B[l, t]`` for ``L`` lanes (16 with AVX512-VNNI, 4 with NEON dotprod). The kernel
is that step in a register tile: ``rows`` rows of the activations x ``col_vectors`` vectors of ``L`` output
columns stay in registers over the whole reduction; per step of 4 along k, each row broadcasts 4 bytes of A
(one 32-bit word) and each vector loads ``4 L`` contiguous bytes of the weight.

Weight layout (packed once, at compile time, by :func:`pack_int8_weight`): ``[N / P, K / 4, P, 4]`` - column
panels of ``P = col_vectors * L`` output columns, and inside a panel, for each group of 4 k, the 4 bytes of
one column next to each other: exactly the ``[L, 4]`` block the instruction multiplies, and one register
tile streams one contiguous panel.

Signedness. ``vpdpbusd`` multiplies *unsigned* bytes of A by signed bytes of B. Symmetric int8
activations ``a`` are fed as ``a + 128`` (uint8, a flip of the sign bit), and the extra
``128 * sum_k W[k, n]`` is subtracted from the accumulator: a per-column int32 constant computed with the
packing (``compensation``). The result is exact. ``sdot`` multiplies signed by signed, so Arm takes the
int8 activations as they are. Targets with neither instruction get the same computation (int8 A, no
compensation) scheduled as plain vector code: correct everywhere, fast only where the instructions are.

The AVX-512 fallback TVM ships (``vpmaddubsw`` + ``vpmaddwd``) is *not* used: ``vpmaddubsw`` saturates its
int16 pair sums (255 * 127 * 2 > 32767), so it is not exact for full-range int8 weights.
"""

from __future__ import annotations

from dataclasses import dataclass
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

DOT_DEPTH = 4  # bytes per 32-bit lane that one dot-product instruction reduces
ACTIVATION_OFFSET = 128  # uint8 activations of vpdpbusd: int8 a -> a + 128
KERNEL_NAME = "int8_matmul"
AVX2_NAME = "avx2 vpmaddwd"  # x86 without VNNI: two exact int16 pair products per 4-byte step
PMADDWD = "llvm.x86.avx2.pmadd.wd"
# The names of TVM's TensorIntrins for the two instructions (tvm.s_tir.tensor_intrin.x86 / .arm_cpu), for
# reports: the kernel calls the LLVM intrinsics itself, and importing those modules parses every TVMScript
# intrinsic TVM ships (CUDA's included), minutes on a loaded 2-core machine, on each compile.
VNNI_INTRIN = "dot_16x4_vnni"
SDOT_INTRIN = "dot_4x4_i8i8s32_sdot"


@dataclass(frozen=True)
class DotInstruction:
    """How a target computes an int8 dot product: which TensorIntrin, how many int32 lanes, A's dtype."""

    name: str  # for reports: "avx512-vnni vpdpbusd", "neon sdot", "portable"
    intrin: str | None  # registered TensorIntrin name; None: plain vector code
    lanes: int  # int32 accumulators per instruction (L)
    activation_dtype: str  # "uint8" (vpdpbusd, with compensation) or "int8"
    registers: int  # SIMD registers of the ISA (the register tile takes about 3/4 of them)

    @property
    def compensated(self) -> bool:
        """Whether A is fed offset by 128 and the weight column sums are subtracted."""
        return self.activation_dtype == "uint8"


def _target(target: Any) -> Any:
    import tvm

    return target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)


def dot_instruction(target: Any) -> DotInstruction:
    """The int8 dot-product instruction an LLVM ``target`` (Target or JSON dict) has, or the portable path.

    x86: AVX512-VNNI (``avx512vnni`` with ``avx512bw``, from ``mcpu``/``mattr``, e.g. znver4,
    sapphirerapids). aarch64: NEON dotprod (``+dotprod`` or an ``mcpu`` that implies it, e.g. cortex-a78).
    """
    from tvm.target import codegen

    target = _target(target)
    if target.kind.name != "llvm":
        raise PassError(f"int8 matmul: target kind '{target.kind.name}' is not a CPU (llvm) target")
    triple = str(target.attrs.get("mtriple", "") or "")
    arch = triple.split("-")[0] if triple else _host_arch()
    if arch in ("x86_64", "i686", "x86"):
        if codegen.target_has_features(["avx512vnni", "avx512bw"], target):
            return DotInstruction("avx512-vnni vpdpbusd", VNNI_INTRIN, 16, "uint8", 32)
        registers = 32 if codegen.target_has_features("avx512f", target) else 16
        if registers == 16 and codegen.target_has_features("avx2", target):
            return DotInstruction(AVX2_NAME, None, 8, "int8", 16)
        return DotInstruction("portable", None, 16 if registers == 32 else 8, "int8", registers)
    if arch in ("aarch64", "arm64"):
        if bool(target.features.has_dotprod):
            return DotInstruction("neon sdot", SDOT_INTRIN, 4, "int8", 32)
        return DotInstruction("portable", None, 4, "int8", 32)
    return DotInstruction("portable", None, 4, "int8", 16)


def _host_arch() -> str:
    import platform

    return platform.machine().lower()


# The register tile of the int8 GEMM (rows x col_vectors vectors of ``lanes`` int32): the shared one.
Int8Tile = RegisterTile


def choose_int8_tile(dot: DotInstruction, rows: int, columns: int) -> Int8Tile:
    """The register tile for an ``rows`` x ``columns`` int32 output (:func:`choose_register_tile`: 3/4 of a
    32-register file, half of a 16-register one, since AVX2's step needs two int16 halves of each
    operand)."""
    return choose_register_tile(dot.lanes, rows, columns, dot.registers, "int8 matmul")


def pack_int8_weight(
    weight: np.ndarray, panel: int, compensated: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """``W[k, n]`` (int8, ``[K, N]``: ``out = a @ W``) -> ``([N / P, K4, P, 4] int8, compensation)``.

    K is zero-padded to a multiple of 4 (the kernel pads A the same way); ``compensation`` is
    ``128 * sum_k W[k, n]`` as int32 ``[N]`` for uint8 activations, None otherwise.
    """
    weight = np.asarray(weight)
    if weight.dtype != np.int8 or weight.ndim != 2:
        raise PassError(
            f"int8 weight packing: expected a 2-D int8 array, got {weight.dtype}{list(weight.shape)}"
        )
    packed = pack_panels(weight, panel, DOT_DEPTH, "int8 weight packing")
    compensation = None
    if compensated:
        compensation = (ACTIVATION_OFFSET * weight.astype(np.int64).sum(axis=0)).astype(np.int32)
    return packed, compensation


def int8_matmul_func(
    rows: int,
    depth: int,
    columns: int,
    dot: DotInstruction,
    tile: Int8Tile | None = None,
    *,
    epilogue: str = "int32",
    parallel: bool = True,
    batch: int | None = None,
) -> Any:
    """The int8 GEMM kernel as a scheduled TIR PrimFunc ``int8_matmul`` for instruction ``dot``.

    Arguments, in order: ``a`` ``[rows, depth]`` (``dot.activation_dtype``); ``w`` packed
    ``[columns / P, depth / 4, P, 4]`` int8; ``compensation`` ``[columns]`` int32 (zeros unless
    ``dot.compensated``); ``a_scale`` ``[rows]``, ``w_scale`` ``[columns]`` and ``bias`` ``[columns]``
    float32 (unused by ``epilogue="int32"``); the output ``[rows, columns]``: int32 ``a @ W``
    (``"int32"``) or float32 ``(a @ W) * a_scale[m] * w_scale[n] + bias[n]`` (``"dequantize"``). The
    epilogue runs on the accumulators in registers: the int32 products never go to memory.

    ``batch=B`` makes it a batched GEMM (the attention matmuls): ``a`` ``[B, rows, depth]``, ``w``
    ``[B, columns / P, depth / 4, P, 4]``, ``compensation`` ``[B, columns]``, ``a_scale`` ``[B, rows]``,
    ``w_scale`` ``[B, columns]`` (a scale per column of each batch's right operand), ``bias`` ``[columns]``
    (shared), the output ``[B, rows, columns]``; the batch joins the (panel, row block) tiles of the one
    parallel loop. The default (None) is the unbatched kernel above.

    Written as low-level TIR rather than TE + ``Schedule.tensorize``: in apache-tvm 0.27.0.post1,
    tensorizing with TVM's own ``dot_16x4_vnni`` intrinsic segfaults (``tvm::ffi::ToJSONGraph`` called from
    ``tvm::s_tir::Tensorize``), and the shipped VNNI implementation passes ``<16 x i32>`` operands to
    ``llvm.x86.avx512.vpdpbusd.512``, which its LLVM declares with ``<64 x i8>`` ("Call parameter type does
    not match function signature!"). The loops are the tensorized schedule written out: (column panel, row
    block) parallel; k / 4; rows x vectors unrolled, one instruction each.
    """
    from tvm.script import tirx as T
    from tvm.script.ir_builder.base import IRBuilder

    if epilogue not in ("int32", "dequantize"):
        raise PassError(f"int8 matmul: unknown epilogue '{epilogue}' (int32 or dequantize)")
    if depth % DOT_DEPTH:
        raise PassError(f"int8 matmul: reduction depth {depth} is not a multiple of {DOT_DEPTH}; pad it")
    tile = tile or choose_int8_tile(dot, rows, columns)
    if rows % tile.rows or columns % tile.panel or tile.lanes != dot.lanes:
        raise PassError(f"int8 matmul: tile {tile} does not fit a {rows} x {columns} output ({dot.name})")
    lanes, rt, panel = dot.lanes, tile.rows, tile.panel
    depth4, panels, blocks = depth // DOT_DEPTH, columns // tile.panel, rows // tile.rows
    a_dtype, word = dot.activation_dtype, f"{dot.activation_dtype}x{DOT_DEPTH}"
    acc_vec, byte_vec = f"int32x{lanes}", f"int8x{DOT_DEPTH * lanes}"
    dequantize = epilogue == "dequantize"
    out_dtype = "float32" if dequantize else "int32"
    intrin = _LLVM_INTRINSICS.get(dot.name, "")
    use_intrin = bool(intrin)
    use_pmaddwd = dot.name == AVX2_NAME
    half_vec = f"int16x{2 * lanes}"
    tiles = panels * blocks
    batches = batch or 1
    if batches < 1:
        raise PassError(f"int8 matmul: batch {batch} is not a positive count")
    lead = () if batch is None else (batches,)

    # Indices, as Python helpers of the loop variables. Unbatched, tile t is (panel
    # t // blocks, row block t % blocks): the original kernel's expressions. Batched, tile t is (batch
    # t // tiles, then the same split of t % tiles), and each buffer gets the batch as its leading index.
    def tile_of(t: Any) -> Any:
        return t if batch is None else t % tiles

    def batched(t: Any, *index: Any) -> tuple[Any, ...]:
        return index if batch is None else (t // tiles, *index)

    def row(t: Any, r: Any) -> Any:  # inside the batch
        return tile_of(t) % blocks * rt + r

    def columns_of(t: Any, v: Any) -> Any:  # the output columns of vector v, inside the batch
        return T.ramp(tile_of(t) // blocks * panel + v * lanes, 1, lanes)

    def panel_of(t: Any) -> Any:  # in the flat weight: the batches' panels one after another
        return t // blocks if batch is None else t // tiles * panels + t % tiles // blocks

    def a_word(ctx: TileContext, t: Any, r: Any, ko: Any) -> Any:
        """Row r's 4 activations at k-step ko as one 32-bit word, broadcast to every lane."""
        return T.broadcast(
            T.reinterpret("int32", ctx.buffers["a"].vload(batched(t, row(t, r), ko * 4), word)), lanes
        )

    def w_bytes(ctx: TileContext, t: Any, v: Any, ko: Any) -> Any:
        """Vector v's ``[lanes, 4]`` weight block at k-step ko."""
        return ctx.buffers["w"].vload(batched(t, tile_of(t) // blocks, ko, v * lanes, 0), byte_vec)

    def sign_extend_low(halves: Any) -> Any:  # bytes 0 and 2 of each lane as int16
        eight = T.broadcast(T.int16(8), 2 * lanes)
        return T.shift_right(T.shift_left(halves, eight), eight)

    def sign_extend_high(halves: Any) -> Any:  # bytes 1 and 3 of each lane as int16
        return T.shift_right(halves, T.broadcast(T.int16(8), 2 * lanes))

    def pmaddwd(w_halves: Any, a_halves: Any) -> Any:
        return T.call_llvm_pure_intrin(acc_vec, T.llvm_lookup_intrinsic_id(PMADDWD), w_halves, a_halves)

    def step(ctx: TileContext, t: Any, r: Any, v: Any, ko: Any) -> None:
        if use_intrin:
            ctx.update(
                r,
                v,
                T.call_llvm_pure_intrin(
                    acc_vec,
                    T.llvm_lookup_intrinsic_id(intrin),
                    ctx.value(r, v),
                    T.reinterpret(byte_vec, a_word(ctx, t, r, ko)),
                    w_bytes(ctx, t, v, ko),
                ),
            )
        elif use_pmaddwd:
            # AVX2: the 4 bytes of a lane (of W and of the broadcast A word) are two int16 words; shifting
            # left then right (arithmetic) by 8 sign-extends bytes 0 and 2, shifting right by 8 bytes 1 and
            # 3; vpmaddwd multiplies the int16 pairs and adds each pair into int32: two of them make the
            # exact 4-term dot product
            w_halves = T.reinterpret(half_vec, w_bytes(ctx, t, v, ko))
            a_halves = T.reinterpret(half_vec, a_word(ctx, t, r, ko))
            ctx.update(
                r,
                v,
                ctx.value(r, v)
                + pmaddwd(sign_extend_low(w_halves), sign_extend_low(a_halves))
                + pmaddwd(sign_extend_high(w_halves), sign_extend_high(a_halves)),
            )
        else:
            # portable: 4 widening multiply-adds on int32 vectors per step
            with T.unroll(DOT_DEPTH) as s:
                IRBuilder.name("s", s)
                w_column = T.ramp(
                    ((panel_of(t) * depth4 + ko) * panel + v * lanes) * DOT_DEPTH + s, DOT_DEPTH, lanes
                )
                ctx.update(
                    r,
                    v,
                    ctx.value(r, v)
                    + T.broadcast(T.Cast("int32", ctx.buffers["a"][batched(t, row(t, r), ko * 4 + s)]), lanes)
                    * T.Cast(acc_vec, ctx.buffers["w_flat"][w_column]),
                )

    def epilogue(ctx: TileContext, t: Any, r: Any, v: Any) -> None:
        compensated = ctx.value(r, v) - ctx.buffers["compensation"][batched(t, columns_of(t, v))]
        if dequantize:
            value = (
                T.Cast(f"float32x{lanes}", compensated)
                * T.broadcast(ctx.buffers["a_scale"][batched(t, row(t, r))], lanes)
                * ctx.buffers["w_scale"][batched(t, columns_of(t, v))]
                + ctx.buffers["bias"][columns_of(t, v)]
            )
        else:
            value = compensated
        T.buffer_store(ctx.buffers["out"], value, list(batched(t, row(t, r), columns_of(t, v))))

    return register_tile_gemm(
        KERNEL_NAME,
        [
            ("a", (*lead, rows, depth), a_dtype),
            ("w", (*lead, panels, depth4, panel, DOT_DEPTH), "int8"),
            ("compensation", (*lead, columns), "int32"),
            ("a_scale", (*lead, rows), "float32"),
            ("w_scale", (*lead, columns), "float32"),
            ("bias", (columns,), "float32"),
            ("out", (*lead, rows, columns), out_dtype),
        ],
        tile,
        tiles=batches * tiles,
        depth_steps=depth4,
        acc_dtype="int32",
        step=step,
        epilogue=epilogue,
        # a flat view of the packed weight: a strided vector load needs a one-dimensional buffer
        views=[("w_flat", (batches * panels * depth4 * panel * DOT_DEPTH,), "int8", "w")],
        parallel=parallel,
    )


_LLVM_INTRINSICS = {
    # LLVM 22 declares (<16 x i32> acc, <64 x i8> unsigned a, <64 x i8> signed b)
    "avx512-vnni vpdpbusd": "llvm.x86.avx512.vpdpbusd.512",
    "neon sdot": "llvm.aarch64.neon.sdot.v4i32.v16i8",
}


def build_int8_matmul(
    rows: int,
    depth: int,
    columns: int,
    target: Any,
    *,
    tile: Int8Tile | None = None,
    epilogue: str = "int32",
    parallel: bool = True,
) -> tuple[Any, DotInstruction, Int8Tile]:
    """A standalone kernel module for ``target``: ``(IRModule, instruction, tile)``; build it with
    ``tvm.compile(mod, target)`` (used by the tests and ``benchmarks/int8_matmul.py``)."""
    import tvm

    dot = dot_instruction(target)
    tile = tile or choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(rows, depth, columns, dot, tile, epilogue=epilogue, parallel=parallel)
    return tvm.IRModule({KERNEL_NAME: func}), dot, tile


def quantize_activation_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dynamic per-row (per-token) symmetric int8 quantization: ``(q int8, scale float32 [..., 1])``."""
    peak = np.abs(x).max(axis=-1, keepdims=True).astype(np.float32)
    scale = np.maximum(peak / 127.0, np.float32(1e-8)).astype(np.float32)
    q = np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return q, scale


def as_activation(q: np.ndarray, dot: DotInstruction) -> np.ndarray:
    """int8 activations in the dtype ``dot`` reads them in (uint8 ``q + 128`` for vpdpbusd)."""
    if dot.compensated:
        return (q.astype(np.int16) + ACTIVATION_OFFSET).astype(np.uint8)
    return q
