"""Store Linear weights in the column panels the matmul kernel's register tile reads."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from math import prod
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax

from edgediff.kernels.matmul import KERNEL_ATTR, geglu_te, packed_matmul_te
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import op_name, static_shape
from edgediff.passes.report import PassReport, find_report, handoff
from edgediff.schedules.common import choose_register_tile
from edgediff.targets import CostModel

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

# Ops that move a weight's elements without computing on them: a weight seen through them is still a
# weight, and the packing after them is lifted to compile time with them.
_LAYOUT_OPS = frozenset({"relax.permute_dims", "relax.reshape"})


def _adds_unit_dims(value: Any) -> bool:
    """Whether ``value`` is a ``broadcast_to`` that only puts unit axes in front (a view, not a copy)."""
    if op_name(value) != "relax.broadcast_to":
        return False
    src, out = static_shape(value.args[0]), static_shape(value)
    return (
        src is not None and out is not None and out[len(out) - len(src) :] == src and prod(out) == prod(src)
    )


@relax.expr_functor.mutator
class _Packer(relax.PyExprMutator):
    """Replace ``matmul(x, W)`` and GEGLU kernels whose ``W`` is a weight by their packed-weight kernels."""

    def __init__(self, mod: tvm.IRModule, cost: CostModel, weights: list[Any]) -> None:
        super().__init__(mod)
        self.mod = mod
        self.cost = cost
        self.weight_index = {w: i for i, w in enumerate(weights)}
        # weights and weights seen through layout ops -> (weight, transposed: whether it is seen as W^T)
        self.weight_vars: dict[Any, tuple[Any, bool]] = {w: (w, False) for w in weights}
        self.packed: Counter[str] = Counter()
        self.skipped: Counter[str] = Counter()
        self.layouts: dict[int, dict[str, Any]] = {}  # weight index -> its stored layout

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        value = binding.value
        op = op_name(value)
        if (op in _LAYOUT_OPS or _adds_unit_dims(value)) and value.args[0] in self.weight_vars:
            root, transposed = self.weight_vars[value.args[0]]
            if op == "relax.permute_dims":
                axes = value.attrs.axes
                transposed ^= axes is None or [int(a) for a in axes][-2:] == [len(axes) - 1, len(axes) - 2]
            self.weight_vars[binding.var] = (root, transposed)
        new_value = None
        if op == "relax.matmul" and value.args[1] in self.weight_vars:
            new_value = self._packed_matmul(value)
        elif isinstance(value, relax.Call) and value.op.same_as(tvm.ir.Op.get("relax.call_tir")):
            new_value = self._packed_geglu(value)
        if new_value is None:
            super().visit_var_binding_(binding)
            return
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(new_value, binding.var.name))

    def _panel(self, dtype: str, columns: int) -> int | None:
        """Columns per panel: exactly the register tile's columns, so that a tile reads one panel."""
        tile = choose_register_tile(self.cost, dtype, 1, columns)
        panel = tile.col_vectors * tile.width
        return panel if panel > 1 and columns % panel == 0 and columns > panel else None

    def _pack(self, weight: relax.Expr, groups: int, panel: int) -> relax.Expr:
        """``[K, groups * N]`` -> ``[groups, N / panel, K, panel]`` (the group axis dropped when 1)."""
        root, transposed = self.weight_vars[weight]
        # what the runtime needs to merge a LoRA delta into the stored weight (runtime/layouts.py)
        self.layouts[self.weight_index[root]] = {"layout": "column_panels", "panel": panel, "groups": groups}
        self.layouts[self.weight_index[root]]["transposed"] = transposed
        weight = self.visit_expr(weight)
        depth, columns = static_shape(weight)[-2:]
        n = columns // groups
        split = self.builder_.emit(relax.op.reshape(weight, [depth, groups, n // panel, panel]))
        packed = self.builder_.emit(relax.op.permute_dims(split, [1, 2, 0, 3]))
        if groups == 1:
            packed = self.builder_.emit(relax.op.reshape(packed, [n // panel, depth, panel]))
        return packed

    def _packed_matmul(self, call: relax.Call) -> relax.Expr | None:
        a, weight = call.args
        a_shape, w_shape = static_shape(a), static_shape(weight)
        dtype = str(call.ty.dtype)
        if (
            a_shape is None
            or w_shape is None
            or len(w_shape) < 2
            or any(d != 1 for d in w_shape[:-2])  # a batch of one weight (3-D Linear): still one weight
            or len(a_shape) < len(w_shape)
        ):
            self.skipped["matmul (shape or dtype)"] += 1
            return None
        panel = self._panel(dtype, w_shape[1])
        if panel is None:
            self.skipped["matmul (columns)"] += 1
            return None
        packed = self._pack(weight, 1, panel)
        self.packed["matmul"] += 1
        return self.builder_.call_te(
            packed_matmul_te, self.visit_expr(a), packed, dtype, primfunc_name_hint="matmul"
        )

    def _packed_geglu(self, call: relax.Call) -> relax.Expr | None:
        callee = self.mod[call.args[0]] if isinstance(call.args[0], tvm.ir.GlobalVar) else None
        if callee is None or callee.attrs is None or callee.attrs.get(KERNEL_ATTR) != "geglu":
            return None
        x, weight, bias = call.args[1].fields
        w_shape = static_shape(weight)
        if weight not in self.weight_vars or w_shape is None or len(w_shape) != 2:
            self.skipped["geglu (weight)"] += 1
            return None
        panel = self._panel(str(call.ty.dtype), w_shape[1] // 2)
        if panel is None:
            self.skipped["geglu (columns)"] += 1
            return None
        packed = self._pack(weight, 2, panel)
        self.packed["geglu"] += 1
        return self.builder_.call_te(
            geglu_te,
            self.visit_expr(x),
            packed,
            self.visit_expr(bias),
            primfunc_name_hint="geglu",
            primfunc_attrs={KERNEL_ATTR: "geglu"},
        )


@dataclass
class PackMatmulWeightsReport(PassReport):
    packed: dict[str, int] = field(default_factory=dict)  # "matmul" / "geglu" -> weights packed
    left_row_major: dict[str, int] = field(default_factory=dict)  # why -> weights not packed
    # the stored layout of each packed weight, by its index among main's weights (for the manifest)
    weight_layouts: dict[int, dict[str, Any]] | None = handoff()


def weight_layouts(results: list[Any], weight_names: list[str]) -> dict[str, dict[str, Any]]:
    """The stored layout of each packed weight by its name (``weight_names``: ``main``'s weights in order,
    as the passes saw them), for the manifest."""
    report = find_report(results, PackMatmulWeightsReport)
    layouts = report.weight_layouts if report is not None and report.weight_layouts is not None else {}
    return {weight_names[i]: layout for i, layout in sorted(layouts.items())}


@register_pass("pack-matmul-weights")
@tvm.transform.module_pass(opt_level=0, name="edgediff.PackMatmulWeights")
class PackMatmulWeights:
    """Store each Linear weight (and GEGLU's) as column panels of the width of the matmul register tile.

    A row-major ``[K, N]`` weight puts consecutive ``k`` of one register tile's columns ``4N`` bytes apart:
    the tile's reduction touches a new page at every ``k`` (two with GEGLU's halves), which defeats the
    hardware prefetcher and the TLB once a panel spans more pages than the TLB holds. At 64 tokens x 1280
    channels (SD 1.5's 8x8 level) the GEGLU kernel ran at a third of its speed at 256 tokens for the same
    FLOPs. Packed as ``[N / P, K, P]`` with ``P`` the tile's columns (the cost model's choice, as the
    ``Matmul`` rule makes it), each tile streams one contiguous panel. The packing is a reshape and a
    transpose of the weight, which ``lift-weight-transforms`` runs once at compile time: stored weights are
    packed, with no run-time cost and no extra bytes. int8 weights (cast in the matmul kernel) are packed as
    int8; weights dequantized by a kernel of their own (int4) are not weights by then and stay as they are.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.cost = CostModel(spec)
        self.report = PackMatmulWeightsReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        packed: Counter[str] = Counter()
        layouts: dict[int, dict[str, Any]] | None = None
        skipped: Counter[str] = Counter()
        for gvar, func in list(mod.functions_items()):
            if not isinstance(func, relax.Function) or func.attrs is None or "num_input" not in func.attrs:
                continue
            packer = _Packer(mod, self.cost, list(func.params[int(func.attrs["num_input"]) :]))
            packer.builder_.update_func(gvar, packer.visit_expr(func))
            mod = packer.builder_.get()
            packed.update(packer.packed)
            skipped.update(packer.skipped)
            layouts = packer.layouts
        mod = relax.transform.DeadCodeElimination()(mod)
        self.report = PackMatmulWeightsReport(
            summary=(
                f"{packed['matmul']} Linear and {packed['geglu']} GEGLU weights stored in register-tile "
                f"column panels; {sum(skipped.values())} left row-major"
                + (f" ({', '.join(f'{n} {k}' for k, n in sorted(skipped.items()))})" if skipped else "")
            ),
            packed=dict(packed),
            left_row_major=dict(skipped),
            weight_layouts=layouts,
        )
        return mod
