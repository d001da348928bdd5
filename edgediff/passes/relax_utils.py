"""Relax helpers the passes share: a call's op, a tensor's static shape and dtype, a constant's value."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax


def op_name(expr: Any) -> str:
    """The operator name of a Relax call (``relax.matmul``), or "" for anything else."""
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else ""


def static_shape(expr: Any) -> tuple[int, ...] | None:
    """The static shape of a tensor expression, or None when it is not a tensor of known shape."""
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    dims = getattr(ty.shape, "values", None)
    if dims is None or any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


def dtype_of(expr: Any) -> str:
    """The element type of a tensor expression."""
    return str(expr.ty.dtype)


def scalar_value(const: Any) -> float | None:
    """The value of a one-element Relax constant, or None when it holds more than one element."""
    value = const.value.numpy()
    return float(value) if value.size == 1 else None
