"""A w8a8 conv2d on the int8 GEMM kernel (``int8_matmul.py``): quantize + im2col, then one GEMM.

``conv2d(x, W)`` with an int8 weight ``W [O, C, KH, KW]`` (per-output-channel scale) and a static
(calibrated) activation scale becomes

- :func:`int8_im2col_func`, one TIR kernel: the float32/float16 NCHW input is quantized exactly as the
  Relax rewrite quantizes (``clip(round(x / scale), -128, 127)``, ``+ 128`` as uint8 for ``vpdpbusd``) -
  one input row ``[C, W]`` at a time, as float vectors along ``w``, then transposed as bytes - into a
  zero-padded NHWC scratch (each input element is divided once, not once per patch it falls in), then
  copied into the patch matrix ``A [N * OH * OW, KH * KW * C]`` (K padded to a multiple of 4 with the
  quantized zero). The patch's k order is ``(i, j, c)``: a patch row is ``KH * KW`` contiguous runs of
  ``C`` bytes of the NHWC scratch, so the copy is contiguous vector moves. A 1x1 conv with stride 1 and no
  padding has no patches: the kernel quantizes straight into ``A`` (a quantize + NCHW->NHWC transpose);
- the weight permuted to ``[O, KH, KW, C]`` (the same k order), flattened, zero-padded along k and packed
  to the GEMM's ``[O / P, K / 4, P, 4]`` layout by Relax ops that ``lift-weight-transforms`` runs once at
  compile time (plus ``vpdpbusd``'s ``128 * sum_k W`` compensation);
- one GEMM call with the ``dequantize`` epilogue (``acc * a_scale * w_scale[o] + bias[o]``, the conv's
  bias when its only consumer adds one), float32 ``[N * OH * OW, O]`` out;
- back to NCHW by a Relax reshape + transpose (FuseOps fuses it into the consumer where it can).

``O`` not a multiple of the instruction's lanes (a 4-channel ``conv_out``) is padded with zero weight rows
at compile time and the extra output columns sliced off. Only ``groups == 1``, NCHW/OIHW and a static
activation scale are taken (:func:`int8_conv2d_fits` and the pass); other convs keep the Relax int8 conv2d.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgediff.kernels.int8_matmul import (
    ACTIVATION_OFFSET,
    DOT_DEPTH,
    KERNEL_NAME,
    DotInstruction,
    choose_int8_tile,
    int8_matmul_func,
    pack_int8_weight,
)
from edgediff.runtime.quantize import INT8_MAX, INT8_MIN

IM2COL_NAME = "int8_im2col"


@dataclass(frozen=True)
class ConvShape:
    """A conv2d's static geometry (NCHW input, OIHW weight, groups 1)."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int, int, int] = (0, 0, 0, 0)  # top, left, bottom, right
    dilation: tuple[int, int] = (1, 1)

    @property
    def out_size(self) -> tuple[int, int]:
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        top, left, bottom, right = self.padding
        oh = (self.height + top + bottom - dh * (kh - 1) - 1) // sh + 1
        ow = (self.width + left + right - dw * (kw - 1) - 1) // sw + 1
        return oh, ow

    @property
    def rows(self) -> int:
        """GEMM rows: output pixels."""
        oh, ow = self.out_size
        return self.batch * oh * ow

    @property
    def patch(self) -> int:
        """Unpadded reduction depth ``KH * KW * C``."""
        return self.kernel[0] * self.kernel[1] * self.channels

    @property
    def depth(self) -> int:
        """GEMM reduction depth: the patch padded to a multiple of the instruction's 4 bytes."""
        return -(-self.patch // DOT_DEPTH) * DOT_DEPTH

    @property
    def direct(self) -> bool:
        """A 1x1, stride 1, unpadded conv: quantize straight into the patch matrix, no scratch."""
        return (
            self.kernel == (1, 1)
            and self.stride == (1, 1)
            and not any(self.padding)
            and self.patch == self.depth
        )


def int8_conv2d_fits(dot: DotInstruction | None, shape: ConvShape | None) -> bool:
    """Whether the kernel takes a conv of this shape (else the pass keeps the Relax int8 conv2d)."""
    return dot is not None and shape is not None and min(shape.out_size) > 0


def _vector_width(size: int) -> int:
    return next(v for v in (16, 8, 4, 2, 1) if size % v == 0)


def int8_im2col_func(shape: ConvShape, in_dtype: str, out_dtype: str, name: str) -> Any:
    """The quantize + im2col kernel ``(x [N, C, H, W] in_dtype, scale [1] float32, a [rows, depth])``.

    ``a[(n, oh, ow), (i * KW + j) * C + c] = q(x[n, c, oh * sh + i * dh - top, ow * sw + j * dw - left])``
    (the quantized zero outside the input and in the k padding), ``q`` the Relax rewrite's quantizer, the
    same ops in the same order (``_quantize`` in passes/mixed_precision.py,
    ``Int8LinearEmitter.quantize_static``): float32 ``x / scale``, round half to even, clip to
    [-128, 127], ``+ 128`` for uint8, cast - bit-identical. The loops are parallel over rows: the quantize
    runs as float vectors along an input row (contiguous reads) into a ``[C, W]`` int8 tile that is then
    transposed into NHWC; the patch copy moves contiguous runs of ``C`` bytes.
    """
    from tvm.script import tirx as T

    n_, c_, h_, w_ = shape.batch, shape.channels, shape.height, shape.width
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.stride, shape.dilation
    top, left, bottom, right = shape.padding
    oh_, ow_ = shape.out_size
    rows, depth, patch = shape.rows, shape.depth, shape.patch
    hp, wp = h_ + top + bottom, w_ + left + right
    offset = float(ACTIVATION_OFFSET if out_dtype == "uint8" else 0)
    low, high = float(INT8_MIN), float(INT8_MAX)
    zero = int(offset)  # the quantized 0.0: conv padding and k padding
    direct = shape.direct
    tail = depth - patch
    vec = _vector_width(c_)
    chunks = c_ // vec
    wv = _vector_width(w_)

    def q(value: Any, step: Any) -> Any:  # the Relax quantizer's ops in its order: divide, round, clip, +128
        return T.Cast(
            out_dtype,
            T.max(T.min(T.round(T.Cast("float32", value) / step), T.float32(high)), T.float32(low))
            + T.float32(offset),
        )

    @T.macro
    def quantize_row(tile, x, scale, r):
        # input row (n, h) = (r // H, r % H) as float vectors along w (contiguous reads, vector divide and
        # round) into the int8 [C, W] tile that each path then transposes into its NHWC destination
        for c in range(c_):
            for wo in range(w_ // wv):
                for v in T.vectorized(wv):
                    tile[c * w_ + wo * wv + v] = q(x[r // h_, c, r % h_, wo * wv + v], scale[0])

    @T.prim_func
    def kernel(
        x: T.Buffer((n_, c_, h_, w_), in_dtype),
        scale: T.Buffer((1,), "float32"),
        a: T.Buffer((rows, depth), out_dtype),
    ) -> None:
        # opaque (8) for FuseOps: analysed, the stores-only loop nest reads as injective and gets fused with
        # a producing reshape, which FuseTIR then rejects ("Inconsistent buffers T_reshape and x")
        T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        if direct:
            # 1x1: a[(n, h, w), c] = q(x[n, c, h, w]); per input row (n, h): quantize it into the tile,
            # then transpose the int8 [C, W] tile into [W, C]
            for r in T.parallel(n_ * h_):
                tile = T.decl_buffer((c_ * w_,), out_dtype, scope="local")
                quantize_row(tile, x, scale, r)
                for x_w in range(w_):
                    for c in range(c_):
                        a[r * w_ + x_w, c] = tile[c * w_ + x_w]
        else:
            scratch = T.decl_buffer((n_ * hp * wp * c_,), out_dtype)
            # 1. quantize each input element once into the NHWC scratch, as in the 1x1 case; its border
            # (the conv padding) holds the quantized zero
            for r in T.parallel(n_ * hp):
                for x_w in range(wp):
                    if r % hp < top or r % hp >= top + h_ or x_w < left or x_w >= left + w_:
                        for c in range(c_):
                            scratch[(r * wp + x_w) * c_ + c] = T.Cast(out_dtype, zero)
            for r in T.parallel(n_ * h_):
                tile = T.decl_buffer((c_ * w_,), out_dtype, scope="local")
                quantize_row(tile, x, scale, r)
                for x_w in range(w_):
                    for c in range(c_):
                        scratch[((r // h_ * hp + r % h_ + top) * wp + x_w + left) * c_ + c] = tile[
                            c * w_ + x_w
                        ]
            # 2. each patch row: KH * KW contiguous runs of C bytes, then the k padding
            for r in T.parallel(n_ * oh_):
                for o_w in range(ow_):
                    for i in range(kh):
                        for j in range(kw):
                            for cc in range(chunks):
                                for v in T.vectorized(vec):
                                    a[r * ow_ + o_w, (i * kw + j) * c_ + cc * vec + v] = scratch[
                                        (((r // oh_) * hp + r % oh_ * sh + i * dh) * wp + o_w * sw + j * dw)
                                        * c_
                                        + cc * vec
                                        + v
                                    ]
                    for t in range(tail):
                        a[r * ow_ + o_w, patch + t] = T.Cast(out_dtype, zero)

    return kernel


def quantize_im2col_reference(x: np.ndarray, scale: float, shape: ConvShape, dtype: str) -> np.ndarray:
    """numpy reference of :func:`int8_im2col_func` (tests, benchmarks): the ``[rows, depth]`` patches."""
    q = np.clip(np.rint(x.astype(np.float32) / np.float32(scale)), INT8_MIN, INT8_MAX)
    if dtype == "uint8":
        q = q + ACTIVATION_OFFSET
    zero = ACTIVATION_OFFSET if dtype == "uint8" else 0
    top, left, bottom, right = shape.padding
    padded = np.pad(q, ((0, 0), (0, 0), (top, bottom), (left, right)), constant_values=zero)
    padded = padded.transpose(0, 2, 3, 1)  # NHWC
    (kh, kw), (sh, sw), (dh, dw) = shape.kernel, shape.stride, shape.dilation
    oh, ow = shape.out_size
    pieces = [
        padded[:, i * dh : i * dh + sh * (oh - 1) + 1 : sh, j * dw : j * dw + sw * (ow - 1) + 1 : sw, :]
        for i in range(kh)
        for j in range(kw)
    ]
    patches = np.concatenate(pieces, axis=-1).reshape(shape.rows, shape.patch)
    out = np.full((shape.rows, shape.depth), zero, np.float32)
    out[:, : shape.patch] = patches
    return out.astype(dtype)


def conv_weight_matrix(weight: np.ndarray, depth: int) -> np.ndarray:
    """numpy: ``W [O, C, KH, KW]`` -> the GEMM's ``[depth, O]`` (k order ``(i, j, c)``, zero-padded)."""
    out_channels = weight.shape[0]
    flat = weight.transpose(0, 2, 3, 1).reshape(out_channels, -1)
    padded = np.zeros((out_channels, depth), weight.dtype)
    padded[:, : flat.shape[1]] = flat
    return np.ascontiguousarray(padded.T)


def build_int8_conv2d(
    shape: ConvShape,
    target: Any,
    *,
    in_dtype: str = "float32",
    epilogue: str = "int32",
    dot: DotInstruction | None = None,
) -> tuple[Any, DotInstruction, Any]:
    """A standalone module with both kernels (``int8_im2col`` and ``int8_matmul``) for ``target`` (its
    instruction, or ``dot``): ``(IRModule, instruction, tile)``, for the tests and
    ``benchmarks/int8_conv.py``; pack the weight with :func:`pack_conv_weight`."""
    import tvm

    from edgediff.kernels.int8_matmul import dot_instruction

    dot = dot or dot_instruction(target)
    tile = choose_int8_tile(dot, shape.rows, shape.out_channels)
    im2col = int8_im2col_func(shape, in_dtype, dot.activation_dtype, IM2COL_NAME)
    gemm = int8_matmul_func(shape.rows, shape.depth, shape.out_channels, dot, tile, epilogue=epilogue)
    return tvm.IRModule({IM2COL_NAME: im2col, KERNEL_NAME: gemm}), dot, tile


def pack_conv_weight(weight: np.ndarray, depth: int, panel: int, compensated: bool) -> tuple[Any, Any]:
    """numpy packing of an int8 ``[O, C, KH, KW]`` weight for the GEMM (what the Relax ops compute)."""
    return pack_int8_weight(conv_weight_matrix(weight, depth), panel, compensated)


class Int8Conv2dEmitter:
    """Emits w8a8 conv2d layers into a BlockBuilder; kernels are shared with the Linear emitter's cache."""

    def __init__(self, linear: Any) -> None:
        self.linear = linear  # Int8LinearEmitter: its instruction and its one-kernel-per-shape cache
        self.dot: DotInstruction = linear.dot

    def conv2d(
        self,
        bb: Any,
        x: Any,
        scale: Any,
        weight: Any,
        w_scale: Any,
        bias: Any | None,
        shape: ConvShape,
        out_dtype: str,
    ) -> Any:
        """``conv2d(x, dequantized(W)) (+ bias)`` as the im2col and GEMM kernels, NCHW ``out_dtype`` out;
        ``weight`` is the stored ``[O, C, KH, KW]`` int8 weight, ``w_scale`` its per-channel float32 scale
        (any shape of ``O`` elements), ``scale`` the activations' static scale (a Relax scalar or ``[1]``)."""
        from tvm import relax

        dot, emitter = self.dot, self.linear
        rows, depth, channels = shape.rows, shape.depth, shape.out_channels
        columns = -(-channels // dot.lanes) * dot.lanes  # output channels padded to whole vectors
        in_dtype = str(x.ty.dtype)
        key = ("im2col", shape, in_dtype)
        name = f"{IM2COL_NAME}_{rows}x{depth}_{len(emitter.kernels)}"
        im2col = emitter._kernel(
            bb, key, lambda: int8_im2col_func(shape, in_dtype, dot.activation_dtype, name), name
        )
        scale1 = bb.emit(relax.op.reshape(scale, [1]))
        patches = bb.emit(
            relax.call_tir(im2col, [x, scale1], relax.TensorType((rows, depth), dot.activation_dtype))
        )
        # [O, C, KH, KW] -> [O, KH, KW, C] -> [O, K] (-> zero-padded [columns, depth]): weight-only, lifted
        matrix = bb.emit(
            relax.op.reshape(relax.op.permute_dims(weight, [0, 2, 3, 1]), [channels, shape.patch])
        )
        if (depth, columns) != (shape.patch, channels):
            matrix = bb.emit(relax.op.nn.pad(matrix, [0, columns - channels, 0, depth - shape.patch]))
        tile = choose_int8_tile(dot, rows, columns)
        packed, compensation = emitter.pack_weight(bb, matrix, tile.panel)
        w_scale = bb.emit(relax.op.reshape(w_scale, [channels]))
        if bias is None:
            bias = relax.const(np.zeros(columns, np.float32))
        elif columns != channels:
            bias = bb.emit(relax.op.nn.pad(bias, [0, columns - channels]))
        if columns != channels:
            w_scale = bb.emit(relax.op.nn.pad(w_scale, [0, columns - channels]))
        a_scale = bb.emit(relax.op.broadcast_to(scale1, [rows]))
        out = bb.emit(
            relax.call_tir(
                emitter.gemm(bb, rows, depth, columns, tile),
                [patches, packed, compensation, a_scale, w_scale, bias],
                relax.TensorType((rows, columns), "float32"),
            )
        )
        if columns != channels:
            out = bb.emit(relax.op.strided_slice(out, axes=[1], begin=[0], end=[channels]))
        oh, ow = shape.out_size
        nhwc = bb.emit(relax.op.reshape(out, [shape.batch, oh, ow, channels]))
        nchw = relax.op.permute_dims(nhwc, [0, 3, 1, 2])
        return nchw if out_dtype == "float32" else relax.op.astype(bb.emit(nchw), out_dtype)


def im2col_names(functions: Sequence[str]) -> list[str]:
    """The im2col kernels among a module's function names (for reports and tests)."""
    return [f for f in functions if f.startswith(IM2COL_NAME)]
