"""Matmul kernels as TE: a Linear whose weight is stored in column panels, and GEGLU as one kernel.

The CPU schedule rules (``schedules/matmul.py``: ``Matmul``, ``GegluMatmul``) register-tile them; the
passes that emit them are ``pack-matmul-weights`` and ``fuse-norm-activation``.
"""

from __future__ import annotations

from typing import Any

# The attribute a pass sets on a PrimFunc it built from one of these kernels, so later passes can find it.
KERNEL_ATTR = "edgediff.kernel"


def geglu_te(x: Any, weight: Any, bias: Any) -> Any:
    """GEGLU of a Linear as one TE kernel: ``(x W_a + b_a) * gelu(x W_g + b_g)`` with ``W = [W_a | W_g]``.

    The two halves' dot products are one reduction block over ``(row, half, column)``, so a register tile
    holds both halves of its columns and the epilogue (bias, exact-erf GELU as Relax legalizes it, product)
    runs on the accumulators: the ``2N``-wide Linear output is never written to memory. ``weight`` is
    ``[K, 2N]``, or ``[2, N / P, K, P]`` in column panels of ``P`` (``pack-matmul-weights``).
    """
    from tvm import te, tirx

    rows, depth = x.shape
    if len(weight.shape) == 4:
        panel = weight.shape[3]
        n = weight.shape[1] * panel

        def w(k: Any, h: Any, j: Any) -> Any:
            return weight[h, j // panel, k, j % panel]
    else:
        n = weight.shape[1] // 2

        def w(k: Any, h: Any, j: Any) -> Any:
            return weight[k, h * n + j]

    k = te.reduce_axis((0, depth), name="k")
    halves = te.compute(
        (rows, 2, n), lambda i, h, j: te.sum(x[i, k] * w(k, h, j), axis=k), name="geglu_matmul"
    )

    dtype = x.dtype

    def gelu(v: Any) -> Any:
        half = tirx.const(0.5, dtype)
        return v * (half + tirx.erf(v * tirx.const(0.5**0.5, dtype)) * half)

    # the unit axis z indexes the halves as z and z + 1 rather than 0 and 1: TVM's compute-at analysis
    # needs the consumer's reads of the accumulators indexed by its own iter vars
    return te.compute(
        (rows, 1, n),
        lambda i, z, j: (halves[i, z, j] + bias[j]) * gelu(halves[i, z + 1, j] + bias[n + j]),
        name="geglu",
    )


def packed_matmul_te(a: Any, weight: Any, out_dtype: str) -> Any:
    """``a @ W`` with ``W[k, j]`` stored as ``weight[j // P, k, j % P]`` (panels of ``P`` columns); both
    operands are cast to ``out_dtype`` in the product, as Relax's matmul does it. An integer weight with
    a float output (weight-only int8) is widened by a stage of its own (``kernels/dequantize.py``)."""
    from tvm import te

    from edgediff.kernels.dequantize import is_weight_only, weight_dequantize_te

    panels, depth, panel = weight.shape
    if is_weight_only(str(weight.dtype), out_dtype):  # widened by a stage the schedule places per chunk
        weight = weight_dequantize_te(weight, out_dtype)
    k = te.reduce_axis((0, depth), name="k")

    def product(*idx: Any) -> Any:
        w = weight[idx[-1] // panel, k, idx[-1] % panel]
        return te.sum(a[(*idx[:-1], k)].astype(out_dtype) * w.astype(out_dtype), axis=k)

    return te.compute((*a.shape[:-1], panels * panel), product, name="matmul")
