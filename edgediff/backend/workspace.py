"""What a compiled model needs in memory besides its weights: the activation storage TVM plans for ``main``.

TVM's ``StaticPlanBlockMemory`` turns every intermediate tensor of ``main`` into a slot of a few
``alloc_storage`` blocks that tensors with disjoint lifetimes share; the VM's pooled allocator keeps them
between calls. Their total is the model's activation workspace: recorded in the manifest (``memory``) so the
runtime can plan a memory-capped run (``runtime/memory.py``) before loading anything.
"""

from __future__ import annotations

from typing import Any

import tvm
from tvm import relax


def workspace_pass(stats: dict[str, Any]) -> tvm.transform.Pass:
    """A no-op pass for the finalize pipeline (after ``LowerAllocTensor``) that sums the planned storage
    blocks of every Relax function into ``stats["workspace_bytes"]`` (blocks of symbolic size, which
    static shapes do not produce, are counted in ``stats["dynamic_blocks"]``)."""
    alloc = tvm.ir.Op.get("relax.memory.alloc_storage")

    @tvm.transform.module_pass(opt_level=0, name="edgediff.RecordWorkspace")
    def record(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        total = dynamic = blocks = 0
        for _, func in mod.functions_items():
            if not isinstance(func, relax.Function):
                continue
            calls: list[relax.Call] = []

            def visit(expr: Any, calls: list[relax.Call] = calls) -> None:
                if isinstance(expr, relax.Call) and expr.op.same_as(alloc):
                    calls.append(expr)

            relax.analysis.post_order_visit(func, visit)
            for call in calls:
                size = call.args[0]
                values = getattr(size, "values", None)
                if values is not None and all(isinstance(v, tvm.tirx.IntImm) for v in values):
                    total += int(values[0].value) if len(values) else 0
                    blocks += 1
                else:
                    dynamic += 1
        stats.update({"workspace_bytes": total, "storage_blocks": blocks, "dynamic_blocks": dynamic})
        stats["kernel_scratch_bytes"] = _largest_kernel_scratch(mod)
        return mod

    return record


def _largest_kernel_scratch(mod: tvm.IRModule) -> int:
    """The largest heap scratch one kernel allocates for itself (its ``global`` buffers), per call: kernels
    run one at a time, so the largest is what the workspace needs on top of the planned blocks."""
    from tvm import s_tir

    largest = 0
    for _, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            try:
                sizes = s_tir.analysis.calculate_allocated_bytes(func)
            except (RuntimeError, ValueError, TypeError):  # a kernel the analysis cannot read: none
                continue
            for scopes in sizes.values():
                largest = max(largest, int(scopes.get("global", 0)))
    return largest


def memory_record(weights: dict[str, Any], stats: dict[str, Any], pass_results: list[Any]) -> dict[str, Any]:
    """The manifest's ``memory`` entry: what loading and calling the model holds besides the library.

    ``attention`` says how attention's N x N score matrices are handled: the ``fuse-attention`` kernel
    computes softmax(QK^T)V in query/key blocks (what attention slicing does by hand), so fused sites never
    materialise them; sites left unfused keep their scores, which are then part of ``workspace_bytes``.
    """
    tensors = weights.get("tensors", [])
    attention: dict[str, Any] = {"fused_sites": 0, "unfused_sites": 0, "unfused_score_bytes": 0}
    for result in pass_results:
        # by name, not by report type: the backend sits below the passes and does not import them
        if result.name == "fuse-attention":
            for site in result.report.sites or []:  # None: the pass skipped (not a CPU target)
                if site.scores_still_materialised:
                    attention["unfused_sites"] += 1
                    attention["unfused_score_bytes"] += int(site.score_bytes)
                else:
                    attention["fused_sites"] += 1
    return {
        "weights_bytes": int(weights["bytes"]),
        "largest_weight_bytes": max((int(t["nbytes"]) for t in tensors), default=0),
        "workspace_bytes": stats.get("workspace_bytes"),  # None: not measured (no finalize pipeline ran)
        "storage_blocks": stats.get("storage_blocks"),
        "kernel_scratch_bytes": stats.get("kernel_scratch_bytes"),
        "attention": attention,
    }
