"""Weight-only quantized conv2d as TE: the integer weight widened by a stage of its own inside the kernel.

Relax's conv2d of an int8 weight with a float output casts each weight element inside the reduction; the
register-tiled schedule then pays a scalar load, sign extension and conversion for every broadcast weight.
With the widening as a separate stage of the same kernel (``DEQUANTIZE_BLOCK``), the CPU schedule rules
(``schedules/common.py``: ``dequantize_weights``) compute it chunk by chunk into a small float buffer under
the reduction, vectorized, and the micro-kernel is the fp32 one. The per-channel scale is not here: it
commutes with the reduction and stays on the output, fused into the kernel's epilogue.
"""

from __future__ import annotations

from typing import Any

from edgediff.schedules.common import DEQUANTIZE_BLOCK


def is_weight_only(weight_dtype: str, out_dtype: str) -> bool:
    """Whether an op of an integer weight produces floats (weight-only quantization, not int8 x int8)."""
    return weight_dtype.startswith(("int", "uint")) and out_dtype.startswith(("float", "bfloat"))


def weight_dequantize_te(weight: Any, dtype: str) -> Any:
    """``weight`` widened to ``dtype`` as a stage of its own."""
    from tvm import te

    return te.compute(weight.shape, lambda *i: weight(*i).astype(dtype), name=DEQUANTIZE_BLOCK)


def legalize_conv2d(bb: Any, call: Any) -> Any:
    """Relax's conv2d legalization, with a widening stage for an integer weight with a float output."""
    import tvm
    from tvm import topi

    attrs = call.attrs
    out_dtype = str(attrs.out_dtype) or str(call.ty.dtype)
    default = tvm.ir.Op.get("relax.nn.conv2d").get_attr("FLegalize")
    if (
        not is_weight_only(str(call.args[1].ty.dtype), out_dtype)
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
