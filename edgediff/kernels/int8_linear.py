"""A w8a8 Linear layer on the int8 GEMM kernel (``int8_matmul.py``): Relax for the mixed-precision pass.

``emit_int8_linear`` turns ``x @ W^T (+ bias)`` with an int8 weight ``W [N, K]`` (per-output-channel
scale) into

- the activation quantization: a static scale (calibrated) as Relax elementwise ops, which FuseOps fuses
  into the producer's kernel; a dynamic per-token scale as Relax ops too (a max-reduction, then the
  elementwise quantize). :func:`quantize_rows_func` does the latter in one kernel and is tested, but not
  wired in yet (see ``Int8LinearEmitter.linear``);
- the weight packed into the instruction's ``[N / P, K / 4, P, 4]`` layout by a reshape and a transpose of
  the stored int8 weight, which ``lift-weight-transforms`` runs once at compile time (weights.bin holds
  the packed weight, same bytes); for ``vpdpbusd`` the ``128 * sum_k W`` compensation too (an int32 per
  output channel, lifted the same way);
- one ``call_tir`` of the GEMM with the ``dequantize`` epilogue: ``acc * a_scale[m] * w_scale[n] + bias[n]``
  on the int32 accumulators in registers, float32 out.

The integer product is exact, so the result is the Relax int8 matmul's up to the float32 rounding order
of the epilogue (the old rewrite multiplied by the weight scale first, then by the activation scale).

GEGLU (diffusers' feed-forward ``proj`` -> ``hidden, gate = chunk(2)`` -> ``hidden * gelu(gate)``): the
projection is an ordinary Linear, so it runs here with its bias in the epilogue, float32 out; the split,
the gelu, the product and the quantization of the next Linear's (``ff.net.2``) input stay elementwise Relax
ops that FuseOps makes one kernel of (tests/precision/test_int8_attention.py checks both). The gating is
not in the GEMM's epilogue: the two halves of a row are P-column panels far apart, and the float32
projection output it reads is written once either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgediff.kernels.int8_matmul import (
    ACTIVATION_OFFSET,
    DOT_DEPTH,
    KERNEL_NAME,
    DotInstruction,
    choose_int8_tile,
    int8_matmul_func,
)
from edgediff.kernels.register_tile import emit_linear_gemm, emit_packed_weight
from edgediff.runtime.quantize import INT8_MAX, INT8_MIN, MIN_SCALE

QUANTIZE_NAME = "int8_quantize_rows"


def int8_linear_fits(dot: DotInstruction | None, rows: int | None, depth: int, columns: int) -> bool:
    """Whether the kernel takes a Linear of this shape (else the pass keeps the Relax int8 matmul)."""
    return dot is not None and rows is not None and depth % DOT_DEPTH == 0 and columns % dot.lanes == 0


def _vector_width(depth: int) -> int:
    return next(v for v in (16, 8, 4, 2, 1) if depth % v == 0)


def quantize_rows_func(rows: int, depth: int, in_dtype: str, out_dtype: str, name: str) -> Any:
    """Dynamic per-row int8 quantization as one scheduled TIR kernel ``(x, q, scale)``.

    ``scale[r] = max(max_k |x[r, k]| / 127, MIN_SCALE)``, ``q[r, k] = clip(round(x[r, k] / scale[r]),
    -128, 127)`` (``+ 128`` as uint8 for ``vpdpbusd``): the ops and their order are those of the Relax
    rewrite (``_dynamic_scale`` and ``_quantize`` in passes/mixed_precision.py), so the results are
    bit-identical. One pass over a row finds its peak, the second quantizes it while it is still in cache.
    """
    from tvm.script import tirx as T

    width = _vector_width(depth)
    chunks = depth // width
    offset = float(ACTIVATION_OFFSET if out_dtype == "uint8" else 0)
    low, high = float(INT8_MIN), float(INT8_MAX)

    @T.prim_func
    def kernel(
        x: T.Buffer((rows, depth), in_dtype),
        q: T.Buffer((rows, depth), out_dtype),
        scale: T.Buffer((rows,), "float32"),
    ) -> None:
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
        for r in T.parallel(rows):
            peaks = T.decl_buffer((width,), "float32", scope="local")
            peak = T.decl_buffer((1,), "float32", scope="local")
            for v in T.vectorized(width):
                peaks[v] = T.float32(0)
            for c in range(chunks):
                for v in T.vectorized(width):
                    peaks[v] = T.max(peaks[v], T.fabs(T.Cast("float32", x[r, c * width + v])))
            peak[0] = T.float32(0)
            for v in range(width):
                peak[0] = T.max(peak[0], peaks[v])
            peak[0] = T.max(peak[0] / T.float32(INT8_MAX), T.float32(MIN_SCALE))
            scale[r] = peak[0]
            for c in range(chunks):
                for v in T.vectorized(width):
                    q[r, c * width + v] = T.Cast(
                        out_dtype,
                        T.min(
                            T.max(T.round(T.Cast("float32", x[r, c * width + v]) / peak[0]), T.float32(low)),
                            T.float32(high),
                        )
                        + T.float32(offset),
                    )

    return kernel


class Int8LinearEmitter:
    """Emits int8 Linear layers into a BlockBuilder, one kernel per distinct shape."""

    def __init__(self, dot: DotInstruction) -> None:
        self.dot = dot
        self.kernels: dict[tuple[Any, ...], Any] = {}  # shape key -> GlobalVar

    def _kernel(self, bb: Any, key: tuple[Any, ...], make: Any, name: str) -> Any:
        if key not in self.kernels:
            func = make().with_attr("global_symbol", name)
            self.kernels[key] = bb.add_func(func, name)
        return self.kernels[key]

    def quantize_static(self, x: Any, scale: Any) -> Any:
        """Relax ops: int8 (uint8 + 128 for vpdpbusd) of ``x / scale``, elementwise (fuses into the
        producer)."""
        from tvm import relax

        value = x if str(x.ty.dtype) == "float32" else relax.op.astype(x, "float32")
        clipped = relax.op.clip(relax.op.round(relax.op.divide(value, scale)), INT8_MIN, INT8_MAX)
        if self.dot.compensated:
            clipped = relax.op.add(clipped, relax.const(float(ACTIVATION_OFFSET), "float32"))
        return relax.op.astype(clipped, self.dot.activation_dtype)

    def quantize_dynamic(self, bb: Any, x2d: Any) -> tuple[Any, Any]:
        """(int8 rows, float32 scale per row) of a ``[rows, K]`` activation, by one kernel."""
        from tvm import relax

        rows, depth = (int(d) for d in x2d.ty.shape)
        dtype, out = str(x2d.ty.dtype), self.dot.activation_dtype
        name = f"{QUANTIZE_NAME}_{rows}x{depth}_{dtype}"
        gvar = self._kernel(
            bb,
            ("quantize", rows, depth, dtype),
            lambda: quantize_rows_func(rows, depth, dtype, out, name),
            name,
        )
        both = bb.emit(
            relax.call_tir(
                gvar,
                [x2d],
                [relax.TensorType((rows, depth), out), relax.TensorType((rows,), "float32")],
            )
        )
        return bb.emit(relax.TupleGetItem(both, 0)), bb.emit(relax.TupleGetItem(both, 1))

    def pack_weight(self, bb: Any, weight: Any, panel: int) -> tuple[Any, Any]:
        """(packed ``[N / P, K / 4, P, 4]``, int32 ``[N]`` compensation) of an ``[N, K]`` int8 weight, as
        Relax ops on the weight only: ``lift-weight-transforms`` runs them once, at compile time."""
        from tvm import relax

        columns = int(weight.ty.shape[0])
        packed = emit_packed_weight(bb, weight, panel, DOT_DEPTH)
        if self.dot.compensated:
            sums = relax.op.sum(relax.op.astype(weight, "int32"), axis=[1])
            compensation = bb.emit(relax.op.multiply(sums, relax.const(ACTIVATION_OFFSET, "int32")))
        else:
            compensation = relax.const(np.zeros(columns, np.int32))
        return packed, compensation

    def gemm(self, bb: Any, rows: int, depth: int, columns: int, tile: Any) -> Any:
        """The GlobalVar of the GEMM with the dequantize epilogue for this shape (one per shape)."""
        name = f"{KERNEL_NAME}_{rows}x{depth}x{columns}"
        return self._kernel(
            bb,
            ("gemm", rows, depth, columns),
            lambda: int8_matmul_func(rows, depth, columns, self.dot, tile, epilogue="dequantize"),
            name,
        )

    def linear(
        self,
        bb: Any,
        x: Any,
        static_scale: Any | None,
        weight: Any,
        w_scale: Any,
        bias: Any | None,
        out_dtype: str,
    ) -> Any:
        """``x [..., K] @ dequantized(W)^T * scales (+ bias)`` as the int8 kernel; ``weight`` is the stored
        ``[N, K]`` int8 weight, ``w_scale`` its ``[N]`` float32 scale, ``static_scale`` the activations'
        calibrated scale (a Relax scalar or ``[1]``) or None for a dynamic per-token scale."""
        from tvm import relax

        shape = [int(d) for d in x.ty.shape]
        columns, depth = (int(d) for d in weight.ty.shape)
        rows = int(np.prod(shape[:-1]))
        tile = choose_int8_tile(self.dot, rows, columns)
        if static_scale is None:
            flat = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, [rows, depth]))
            # Relax ops (a max-reduction kernel, then the elementwise quantize fused with it or its
            # producer): quantize_rows_func, one kernel, is not wired in yet - TVM 0.27's Relax reshape
            # detection rejects a call_tir callee without a root block, and its well-formedness check one
            # with a root block around a parallel loop nest
            value = flat if str(flat.ty.dtype) == "float32" else relax.op.astype(flat, "float32")
            peak = relax.op.max(relax.op.abs(value), axis=-1, keepdims=True)
            scale = relax.op.divide(peak, relax.const(float(INT8_MAX), "float32"))
            scale = bb.emit(relax.op.maximum(scale, relax.const(MIN_SCALE, "float32")))
            xq = bb.emit(self.quantize_static(flat, scale))
            a_scale = bb.emit(relax.op.reshape(scale, [rows]))
        else:
            xq = bb.emit(self.quantize_static(x, static_scale))
            if len(shape) != 2:
                xq = bb.emit(relax.op.reshape(xq, [rows, depth]))
            a_scale = bb.emit(relax.op.broadcast_to(static_scale, [rows]))
        packed, compensation = self.pack_weight(bb, weight, tile.panel)
        if bias is None:
            bias = relax.const(np.zeros(columns, np.float32))
        gemm = self.gemm(bb, rows, depth, columns, tile)
        return emit_linear_gemm(
            bb, gemm, [xq, packed, compensation, a_scale, w_scale, bias], shape, columns, out_dtype
        )


def kernel_names(functions: Sequence[str]) -> list[str]:
    """The int8 GEMM kernels among a module's function names (for reports and tests)."""
    return [f for f in functions if f.startswith(KERNEL_NAME)]
