"""A ``bf16`` Linear layer on the bfloat16 GEMM kernel (``bf16_matmul.py``), as Relax for mixed-precision.

``BF16LinearEmitter.linear`` turns ``x @ W^T (+ bias)`` with a stored bfloat16 weight ``W [N, K]`` into

- the activation cast to bfloat16: one Relax ``astype`` (round to nearest even, the rounding the sensitivity
  measurement models), elementwise on the layer's input, so FuseOps fuses it into the producer's kernel
  (a 3-D input is then flattened to ``[rows, K]`` by a reshape, a view);
- the weight packed into the instruction's ``[N / P, K / 2, P, 2]`` layout by a reshape and a transpose of
  the stored weight, which ``lift-weight-transforms`` runs once at compile time: weights.bin holds the
  packed bfloat16 weight (same bytes, same dtype);
- one ``call_tir`` of the GEMM, float32 accumulation in registers, with the bias added in its epilogue
  (zeros when the layer has none: one vector add per output vector, nothing to fuse after the kernel).

The instruction: ``vdpbf16ps`` where the target's LLVM target has AVX512-BF16 (``+avx512bf16`` in
``mattr``, or an ``mcpu`` such as znver4 / sapphirerapids), else the kernel's portable path (each bfloat16
widened to float32, exact, and multiply-added in float32): the same products, so both compute what the
Relax path computes (bfloat16 operands, float32 accumulation) up to the float32 summation order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgediff.kernels.bf16_matmul import (
    KERNEL_NAME,
    PAIR,
    BF16Tile,
    bf16_matmul_func,
    choose_bf16_tile,
)
from edgediff.kernels.register_tile import emit_linear_gemm, emit_packed_weight

# The instruction names the mixed-precision report counts layers under.
DPBF16_NAME = "avx512-bf16 vdpbf16ps"
PORTABLE_NAME = "portable"


class BF16LinearEmitter:
    """Emits bf16 Linear layers into a BlockBuilder, one GEMM kernel per distinct shape.

    ``use_dpbf16``: the target has AVX512-BF16 (16 float32 lanes, 32 zmm registers); otherwise the
    portable path with 8 lanes and 16 registers, the tile ``build_bf16_matmul`` picks for it (one AVX2
    register of float32; two NEON registers on Arm)."""

    def __init__(self, use_dpbf16: bool) -> None:
        self.use_dpbf16 = use_dpbf16
        self.lanes = 16 if use_dpbf16 else 8
        self.registers = 32 if use_dpbf16 else 16
        self.kernels: dict[tuple[int, int, int], Any] = {}  # (rows, depth, columns) -> GlobalVar

    @property
    def name(self) -> str:
        return DPBF16_NAME if self.use_dpbf16 else PORTABLE_NAME

    def fits(self, rows: int | None, depth: int, columns: int) -> bool:
        """Whether the kernel takes a Linear of this shape (else the pass keeps the Relax bf16 matmul): a
        static row count, an even reduction (pairs of bfloat16) and whole vectors of output columns."""
        return rows is not None and rows > 0 and depth % PAIR == 0 and columns % self.lanes == 0

    def tile(self, rows: int, columns: int) -> BF16Tile:
        return choose_bf16_tile(self.lanes, rows, columns, self.registers)

    def gemm(self, bb: Any, rows: int, depth: int, columns: int, tile: BF16Tile) -> Any:
        """The GlobalVar of the GEMM for this shape (one PrimFunc per shape)."""
        key = (rows, depth, columns)
        if key not in self.kernels:
            name = f"{KERNEL_NAME}_{rows}x{depth}x{columns}"
            func = bf16_matmul_func(rows, depth, columns, tile, use_dpbf16=self.use_dpbf16)
            self.kernels[key] = bb.add_func(func.with_attr("global_symbol", name), name)
        return self.kernels[key]

    def linear(self, bb: Any, x: Any, weight: Any, bias: Any | None, out_dtype: str) -> Any:
        """``x [..., K] @ W^T (+ bias)`` on the kernel: ``weight`` is the stored ``[N, K]`` bfloat16 weight,
        ``bias`` a float32 ``[N]`` weight or None; the result has ``x``'s leading dimensions and
        ``out_dtype``."""
        from tvm import relax

        shape = [int(d) for d in x.ty.shape]
        columns, depth = (int(d) for d in weight.ty.shape)
        rows = int(np.prod(shape[:-1]))
        tile = self.tile(rows, columns)
        # the cast before the reshape: elementwise on the producer's output, so FuseOps fuses it there
        xb = x if str(x.ty.dtype) == "bfloat16" else bb.emit(relax.op.astype(x, "bfloat16"))
        if len(shape) != 2:
            xb = bb.emit(relax.op.reshape(xb, [rows, depth]))
        # [N, K] -> [N / P, K / 2, P, 2], lifted to compile time
        packed = emit_packed_weight(bb, weight, tile.panel, PAIR)
        if bias is None:
            bias = relax.const(np.zeros(columns, np.float32))
        gemm = self.gemm(bb, rows, depth, columns, tile)
        return emit_linear_gemm(bb, gemm, [xb, packed, bias], shape, columns, out_dtype)
