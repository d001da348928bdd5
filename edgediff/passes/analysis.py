"""Module statistics that passes put into their reports (what a pass changed is a diff of these)."""

from __future__ import annotations

from collections import Counter
from typing import Any


def relax_op_histogram(mod: Any) -> Counter[str]:
    """Count the Relax operator calls (``relax.nn.conv2d``, ...) in every Relax function of ``mod``."""
    import tvm
    from tvm import relax

    counts: Counter[str] = Counter()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            counts[expr.op.name] += 1

    for _, func in mod.functions.items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return counts


def kernel_count(mod: Any) -> int:
    """Number of TIR functions (kernels) in ``mod``."""
    from tvm import tirx

    return sum(1 for _, func in mod.functions.items() if isinstance(func, tirx.PrimFunc))


def tir_call_count(mod: Any) -> int:
    """Number of ``call_tir`` launches: each is one kernel launch and one output written to memory."""
    return relax_op_histogram(mod).get("relax.call_tir", 0)
