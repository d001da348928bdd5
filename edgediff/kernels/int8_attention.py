"""The w8a8 attention matmuls (QK^T and PV) on the batched int8 GEMM kernel (``int8_matmul.py``).

Both operands of an attention matmul are activations, so everything the Linear path does once at compile
time happens here at run time, per call. For ``a [B, M, K] @ b [B, K, N]`` (B = batch x heads) the
emitter adds, to a BlockBuilder:

- the left operand's dynamic per-row scale and its quantization (int8; ``+ 128`` as uint8 for
  ``vpdpbusd``) as Relax ops: FuseOps makes a max-reduction kernel and an elementwise quantize kernel of
  them;
- the right operand's dynamic per-column scale and its quantization *and packing* into the kernel's
  ``[B, N / P, K / 4, P, 4]`` layout as Relax ops: a max-reduction over K, then quantize + reshape +
  transpose, injective ops FuseOps makes one kernel of (the packed int8 operand is the only thing written);
- for ``vpdpbusd``, the compensation ``128 * sum_k bq[b, k, n]`` (int32 ``[B, N]``), a reduction over the
  packed operand (so the quantize stays fused with the packing); other instructions get a shared zero
  constant;
- one ``call_tir`` of the batched GEMM with the ``dequantize`` epilogue ``acc * a_scale[b, m] *
  b_scale[b, n]``, float32 out.

K is zero-padded to a multiple of 4 before quantizing (a zero changes no peak and adds nothing to a dot
product). N is zero-padded to a multiple of the instruction's lanes the same way (cross-attention QK^T has 77
keys at SD 1.5's text length, 80 computed; PV of a 40-wide head is 48 wide on 16-lane vpdpbusd) and the
padded columns are sliced off the output (a copy kernel of its own, only where N was padded).
:func:`int8_attention_fits` leaves to the pass's Relax int8 matmul only what the kernel cannot express:
dynamic shapes and operands whose leading (batch, head) dimensions differ (broadcasting).

The scale and quantization formulas are the Relax rewrite's (``_dynamic_scale`` / ``_quantize`` in
passes/mixed_precision.py) and the epilogue multiplies in the same order (activation scale, then column
scale), so the output equals the Relax int8 path up to float32 rounding of the epilogue.

Why Relax ops and not one TIR kernel that finds the column peaks, quantizes and packs: int8_linear.py
found TVM 0.27 refusing such single-input ``call_tir`` callees (its dataflow-reshape detection rejects a
PrimFunc without a root block, its well-formedness check one with a root block around a parallel loop
nest; see ``Int8LinearEmitter.linear``), and wiring its ``quantize_dynamic`` kernel in for the left operand
here fails the build the same way (``func->body->IsInstance<s_tir::SBlockRealizeNode>()``). The fused
Relax kernel writes the same packed bytes; a TIR kernel would save the one extra read of the operand that
the separate max-reduction makes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgediff.kernels.int8_matmul import (
    ACTIVATION_OFFSET,
    DOT_DEPTH,
    DotInstruction,
    choose_int8_tile,
    int8_matmul_func,
)
from edgediff.runtime.quantize import INT8_MAX, INT8_MIN, MIN_SCALE

ATTENTION_KERNEL = "int8_attention_matmul"  # not int8_matmul_*: those are the Linear layers


def int8_attention_fits(
    dot: DotInstruction | None, a_shape: Sequence[int] | None, b_shape: Sequence[int] | None
) -> bool:
    """Whether the kernel takes ``a @ b`` (else the pass keeps the Relax int8 matmul): static 3-D or 4-D
    operands with the same leading dimensions (K and N are padded as needed)."""
    if dot is None or a_shape is None or b_shape is None or len(a_shape) not in (3, 4):
        return False
    same_lead = len(b_shape) == len(a_shape) and tuple(a_shape[:-2]) == tuple(b_shape[:-2])
    return same_lead and a_shape[-1] == b_shape[-2]


class Int8AttentionEmitter:
    """Emits int8 attention matmuls into a BlockBuilder, one kernel per distinct shape."""

    def __init__(self, dot: DotInstruction) -> None:
        self.dot = dot
        self.kernels: dict[tuple[int, ...], Any] = {}  # (B, M, K, N) -> GlobalVar
        self.zeros: dict[tuple[Any, ...], Any] = {}  # shared zero constants (compensation, bias)

    def _zeros(self, shape: tuple[int, ...], dtype: str) -> Any:
        from tvm import relax

        key = (shape, dtype)
        if key not in self.zeros:
            self.zeros[key] = relax.const(np.zeros(shape, dtype))
        return self.zeros[key]

    def _quantize(self, x: Any, scale: Any, offset: bool) -> Any:
        """int8 of ``x / scale`` (round half to even, clip), uint8 ``+ 128`` when ``offset``."""
        from tvm import relax

        clipped = relax.op.clip(relax.op.round(relax.op.divide(x, scale)), INT8_MIN, INT8_MAX)
        if offset:
            clipped = relax.op.add(clipped, relax.const(float(ACTIVATION_OFFSET), "float32"))
            return relax.op.astype(clipped, "uint8")
        return relax.op.astype(clipped, "int8")

    @staticmethod
    def _scale(bb: Any, x: Any, axis: int) -> Any:
        from tvm import relax

        # without the reduced axis: the kernel reads it as [B, M] / [B, N]; the quantize broadcasts it back
        # with expand_dims, which fuses (a reshape of the scale would be a kernel launch of its own)
        peak = relax.op.max(relax.op.abs(x), axis=axis)
        scale = relax.op.divide(peak, relax.const(float(INT8_MAX), "float32"))
        return bb.emit(relax.op.maximum(scale, relax.const(MIN_SCALE, "float32")))

    def matmul(self, bb: Any, a: Any, b: Any, out_dtype: str) -> Any:
        """``a [..., M, K] @ b [..., K, N]`` with both operands quantized per row / per column at run time,
        the product on the int8 kernel; ``out_dtype`` is the original matmul's."""
        from tvm import relax

        a_shape = [int(d) for d in a.ty.shape]
        b_shape = [int(d) for d in b.ty.shape]
        lead, (rows, depth), columns = a_shape[:-2], a_shape[-2:], b_shape[-1]
        batch = int(np.prod(lead))
        depth4 = -(-depth // DOT_DEPTH) * DOT_DEPTH
        padded = -(-columns // self.dot.lanes) * self.dot.lanes
        tile = choose_int8_tile(self.dot, rows, padded)

        def prepared(x: Any, shape: list[int], pad_rows: int, pad_columns: int) -> Any:
            # float32, [B, ., .], K zero-padded to a multiple of 4 (and b's N to a multiple of the lanes)
            if str(x.ty.dtype) != "float32":
                x = relax.op.astype(x, "float32")
            if len(shape) != 3:
                x = relax.op.reshape(x, [batch, *shape[-2:]])
            x = bb.emit(x)
            if pad_rows or pad_columns:
                x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, pad_rows, 0, pad_columns]))
            return x

        a3 = prepared(a, a_shape, 0, depth4 - depth)
        b3 = prepared(b, b_shape, depth4 - depth, padded - columns)
        a_scale = self._scale(bb, a3, -1)  # [B, M]: per row of the left operand
        b_scale = self._scale(bb, b3, -2)  # [B, N]: per column of the right operand
        aq = bb.emit(self._quantize(a3, relax.op.expand_dims(a_scale, 2), self.dot.compensated))
        bq = self._quantize(b3, relax.op.expand_dims(b_scale, 1), offset=False)
        # [B, K, N] -> [B, K / 4, 4, N / P, P] -> [B, N / P, K / 4, P, 4]: fused with the quantize
        panel = tile.panel
        split = bb.emit(relax.op.reshape(bq, [batch, depth4 // DOT_DEPTH, DOT_DEPTH, padded // panel, panel]))
        packed = bb.emit(relax.op.permute_dims(split, [0, 3, 1, 4, 2]))
        if self.dot.compensated:
            # from the packed operand, so that the quantize stays fused with the packing: [B, N / P, P]
            sums = relax.op.sum(relax.op.astype(packed, "int32"), axis=[2, 4])
            scaled = relax.op.multiply(sums, relax.const(ACTIVATION_OFFSET, "int32"))
            compensation = bb.emit(relax.op.reshape(bb.emit(scaled), [batch, padded]))
        else:
            compensation = self._zeros((batch, padded), "int32")
        key = (batch, rows, depth4, padded)
        if key not in self.kernels:
            name = f"{ATTENTION_KERNEL}_{batch}x{rows}x{depth4}x{padded}"
            func = int8_matmul_func(rows, depth4, padded, self.dot, tile, epilogue="dequantize", batch=batch)
            self.kernels[key] = bb.add_func(func.with_attr("global_symbol", name), name)
        out = bb.emit(
            relax.call_tir(
                self.kernels[key],
                [
                    aq,
                    packed,
                    compensation,
                    a_scale,
                    b_scale,
                    self._zeros((padded,), "float32"),
                ],
                relax.TensorType((batch, rows, padded), "float32"),
            )
        )
        if padded != columns:
            out = bb.emit(relax.op.strided_slice(out, axes=[2], begin=[0], end=[columns]))
        if len(lead) != 1:
            out = bb.emit(relax.op.reshape(out, [*lead, rows, columns]))
        return out if out_dtype == "float32" else relax.op.astype(out, out_dtype)
