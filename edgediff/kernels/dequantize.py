"""Weight-only quantized weights as TE: an int8 conv2d weight widened inside the kernel, and the int4 unpack.

Relax's conv2d of an int8 weight with a float output casts each weight element inside the reduction; the
register-tiled schedule then pays a scalar load, sign extension and conversion for every broadcast weight.
With the widening as a separate stage of the same kernel (``DEQUANTIZE_BLOCK``), the CPU schedule rules
(``schedules/common.py``: ``dequantize_weights``) compute it chunk by chunk into a small float buffer under
the reduction, vectorized, and the micro-kernel is the fp32 one. The per-channel scale is not here: it
commutes with the reduction and stays on the output, fused into the kernel's epilogue.

An int4 (``w4``) weight is two nibbles a byte with one scale per group of inputs, which does not commute with
the reduction: :func:`int4_weight_te` unpacks it to float as one kernel (``INT4_DEQUANTIZE``), and
:func:`int4_weight_loader` gives the same element as an expression, so that a consumer that transforms the
weight anyway (the Winograd weight transform) reads the packed nibbles directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from edgediff.runtime.quantize import DEFAULT_GROUP_SIZE, INT4_OFFSET, int4_layout
from edgediff.schedules.common import DEQUANTIZE_BLOCK

# The PrimFunc name of the int4 unpack kernel (its Relax call is how passes recognise an int4 weight).
INT4_DEQUANTIZE = "dequantize_int4"


def is_weight_only(weight_dtype: str, out_dtype: str) -> bool:
    """Whether an op of an integer weight produces floats (weight-only quantization, not int8 x int8)."""
    return weight_dtype.startswith(("int", "uint")) and out_dtype.startswith(("float", "bfloat"))


def rounds_data_for_conv(weight_dtype: str, data_dtype: str, out_dtype: str) -> bool:
    """Whether a conv2d of a ``weight_dtype`` weight runs as float32 data rounded to it and the weight
    widened in the float32 kernel (bfloat16: its products are exact in float32), instead of a Relax conv2d
    on bfloat16 operands that TVM widens element by element."""
    return weight_dtype == "bfloat16" and data_dtype == "float32" and out_dtype == "float32"


def round_to_bfloat16_te(x: Any) -> Any:
    """float32 ``x`` rounded to the nearest bfloat16 (ties to even), kept in float32, with integer ops on its
    bits: a float32 -> bfloat16 -> float32 cast pair inside one kernel is folded away by TVM's bfloat16
    legalization, which computes bfloat16 arithmetic in float32."""
    from tvm import te, tirx

    def rounded(*i: Any) -> Any:
        bits = tirx.reinterpret("uint32", x(*i))
        even = tirx.bitwise_and(tirx.shift_right(bits, tirx.const(16, "uint32")), tirx.const(1, "uint32"))
        up = bits + tirx.const(0x7FFF, "uint32") + even
        return tirx.reinterpret("float32", tirx.bitwise_and(up, tirx.const(0xFFFF0000, "uint32")))

    return te.compute(x.shape, rounded, name="round_to_bfloat16")


def widens_weight(weight_dtype: str, data_dtype: str, out_dtype: str) -> bool:
    """Whether a conv2d widens its weight inside the float kernel: weight-only integer, or bfloat16 with
    float32 data (:func:`rounds_data_for_conv`)."""
    rounded = rounds_data_for_conv(weight_dtype, data_dtype, out_dtype)
    return rounded or is_weight_only(weight_dtype, out_dtype)


def weight_dequantize_te(weight: Any, dtype: str) -> Any:
    """``weight`` widened to ``dtype`` as a stage of its own."""
    from tvm import te

    return te.compute(weight.shape, lambda *i: weight(*i).astype(dtype), name=DEQUANTIZE_BLOCK)


def int4_weight_loader(packed: Any, scale: Any, shape: Sequence[int]) -> Callable[..., Any]:
    """``load(o, *index)``: element ``index`` of output channel ``o`` of a weight of ``shape`` stored as
    int4 (``runtime/quantize.py``'s ``quantize_int4``: packed uint8 ``[O, inputs / 2]``, element ``2i`` the
    low nibble of byte ``i``; float32 scale ``[O, groups, 1]``), as a float32 expression."""
    from tvm import tirx

    dims = [int(d) for d in shape[1:]]
    group = 2 * int(packed.shape[1]) // int(scale.shape[1])

    def load(o: Any, *index: Any) -> Any:
        flat = index[0]
        for i, size in zip(index[1:], dims[1:], strict=True):
            flat = flat * size + i
        byte = packed[o, flat // 2]
        shift = (flat % 2 * 4).astype("uint8")
        nibble = tirx.bitwise_and(tirx.shift_right(byte, shift), tirx.const(15, "uint8"))
        centred = nibble.astype("float32") - tirx.const(float(INT4_OFFSET), "float32")
        return centred * scale[o, flat // group, 0]

    return load


def int4_weight_te(packed: Any, scale: Any, shape: Sequence[int], dtype: str) -> Any:
    """The int4 weight of ``shape`` unpacked to ``dtype`` (see :func:`int4_weight_loader`)."""
    from tvm import te

    load = int4_weight_loader(packed, scale, shape)
    return te.compute(tuple(shape), lambda o, *i: load(o, *i).astype(dtype), name=INT4_DEQUANTIZE)


# Values one step of the vectorized unpack writes: 16 bytes of nibbles, low then high nibble of each.
INT4_VECTOR = 32


def int4_dequantize_fits(shape: Sequence[int], group_size: int = DEFAULT_GROUP_SIZE) -> bool:
    """Whether :func:`int4_dequantize_func` takes a weight of ``shape`` (``int4_layout``: no padded inputs,
    whole vectors per group); else :func:`int4_weight_te` unpacks it."""
    inputs, groups, size = int4_layout(tuple(shape), group_size)
    return size % INT4_VECTOR == 0 and inputs == groups * size


def int4_dequantize_func(shape: Sequence[int], dtype: str, group_size: int = DEFAULT_GROUP_SIZE) -> Any:
    """The int4 unpack as a scheduled PrimFunc: per 16 packed bytes, the low and high nibbles as two
    vectors, centred and scaled, interleaved by one shuffle into 32 consecutive weights (the TE form's
    per-element index arithmetic does not vectorize). Parallel over output channels."""
    from tvm.script import tirx as T

    rows = int(shape[0])
    inputs, groups, group = int4_layout(tuple(shape), group_size)
    half, steps = INT4_VECTOR // 2, group // INT4_VECTOR
    lanes = f"{dtype}x{half}"
    order = [i // 2 + (i % 2) * half for i in range(INT4_VECTOR)]  # low0 high0 low1 high1 ...
    out_shape = tuple(int(d) for d in shape)

    @T.prim_func
    def func(
        packed: T.Buffer((rows, inputs // 2), "uint8"),
        scale: T.Buffer((rows, groups, 1), "float32"),
        out: T.Buffer(out_shape, dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        flat = T.decl_buffer((rows * inputs,), dtype, data=out.data)
        for o in T.parallel(rows):
            for g, c in T.grid(groups, steps):
                v = packed[o, T.ramp(g * (group // 2) + c * half, 1, half)]
                s = T.broadcast(scale[o, g, 0], half)
                offset = T.broadcast(T.float32(INT4_OFFSET), half)
                low = (T.bitwise_and(v, T.broadcast(T.uint8(15), half)).astype("float32x16") - offset) * s
                high = (T.shift_right(v, T.broadcast(T.uint8(4), half)).astype("float32x16") - offset) * s
                start = o * inputs + g * group + c * INT4_VECTOR
                pairs = T.Shuffle([low.astype(lanes), high.astype(lanes)], order)
                flat[T.ramp(start, 1, INT4_VECTOR)] = pairs

    return func


def legalize_conv2d(bb: Any, call: Any) -> Any:
    """Relax's conv2d legalization, with a widening stage for an integer weight with a float output."""
    import tvm
    from tvm import topi

    attrs = call.attrs
    out_dtype = str(attrs.out_dtype) or str(call.ty.dtype)
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    if (
        not widens_weight(str(call.args[1].ty.dtype), str(call.args[0].ty.dtype), out_dtype)
        or attrs.out_layout != attrs.data_layout
        or len(attrs.data_layout) != 4
        or len(attrs.kernel_layout) != 4
    ):
        return default(bb, call)

    def conv(data: Any, weight: Any) -> Any:
        return topi.nn.conv(
            data,
            weight_dequantize_te(weight, out_dtype),
            [int(v) for v in attrs.strides],
            [int(v) for v in attrs.padding],
            [int(v) for v in attrs.dilation],
            int(attrs.groups),
            str(attrs.data_layout),
            str(attrs.kernel_layout),
            out_dtype,
        )

    return bb.call_te(conv, call.args[0], call.args[1], primfunc_name_hint="conv2d")


# Operator -> legalization, for ``relax.transform.LegalizeOps(customize_legalize_map=...)``.
LEGALIZATIONS = {"relax.nn.conv2d": legalize_conv2d}
