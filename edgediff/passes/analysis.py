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


def launch_count(mod: Any) -> int:
    """``call_tir`` launches that run a kernel: those of pure reshape kernels are left out, since the
    build (``RewriteDataflowReshape``) turns them into views of their input."""
    import tvm
    from tvm import relax, tirx

    reshapes = {
        gvar.name_hint
        for gvar, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and relax.analysis.has_reshape_pattern(func)
    }
    launches = 0

    def visit(expr: Any) -> None:
        nonlocal launches
        if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op):
            launches += expr.op.name == "relax.call_tir" and expr.args[0].name_hint not in reshapes

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return launches
