"""Give the layers whose activations overflow float16 their float32 compute back, after cast-to-fp16.

``cast-to-fp16`` (TVM's ToMixedPrecision) casts every conv2d / matmul operand to float16 and rounds each
accumulator back through float16; a layer whose activations exceed 65504 then yields inf, and NaN after the
next normalisation. The guarded layers (measured by calibration, see ``edgediff.precision.overflow``) get
their float32 operands again, and their float32 result is used as is wherever it was cast down and up
again. Values derived from a guarded result stay float32 (an op reading one is computed in float32) until
they reach an unguarded conv / matmul, whose float16 input the calibration found in range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax

from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import op_name
from edgediff.passes.report import PassReport
from edgediff.precision.overflow import OverflowGuard

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

_ANCHORS = ("relax.nn.conv2d", "relax.nn.conv2d_transpose", "relax.matmul")
# normalisations are guarded too (found by their scale parameter): their statistics square the input
_NORMS = ("relax.nn.group_norm", "relax.nn.layer_norm")
# Ops through which a weight parameter reaches its conv2d / matmul (cast-to-fp16 adds the astype)
_WEIGHT_VIEWS = ("relax.astype", "relax.permute_dims", "relax.reshape", "relax.broadcast_to")


@dataclass
class FP16OverflowGuardReport(PassReport):
    """Which layers stay float32 and the activation peak that put them there (the manifest's record)."""

    kept_fp32: dict[str, str] = field(default_factory=dict)  # layer -> why (max |x| seen vs the limit)
    rewritten: int = 0  # conv2d / matmul calls given float32 operands again
    guard: dict[str, Any] = field(default_factory=dict)  # OverflowGuard.to_dict()


def _dtype(expr: Any) -> str:
    return str(getattr(expr.ty, "dtype", ""))


@register_pass("fp16-overflow-guard")
@tvm.transform.module_pass(opt_level=0, name="edgediff.FP16OverflowGuard")
class FP16OverflowGuard:
    """Keep conv2d / matmul / norm layers that overflow float16 in float32 (after ``cast-to-fp16``).

    Options: ``guard`` (an :class:`OverflowGuard` or its dict, from calibration; ``compile_model`` measures
    it), ``weight_names`` (``main``'s weight parameters in order, as the import names them). Without a
    guard the pass changes nothing and says so.
    """

    def __init__(
        self,
        spec: TargetSpec,
        guard: OverflowGuard | dict[str, Any] | None = None,
        weight_names: Sequence[str] | None = None,
    ) -> None:
        self.spec = spec
        self.guard = OverflowGuard.from_dict(guard) if isinstance(guard, dict) else guard
        self.weight_names = list(weight_names or [])
        self.report = FP16OverflowGuardReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        guard = self.guard
        if guard is None:
            self.report = FP16OverflowGuardReport("not checked: no calibration of the float model")
            return mod
        func = mod["main"]
        num_input = int(func.attrs["num_input"])
        by_weight = guard.weights()
        guarded = {
            param: by_weight[name]
            for param, name in zip(func.params[num_input:], self.weight_names, strict=False)
            if name in by_weight
        }
        kept = {layer.name: layer.reason(guard.limit) for layer in guarded.values()}
        unmatched = [layer.name for layer in guard.layers if layer.name not in kept]
        if not guarded:
            self.report = FP16OverflowGuardReport(guard.summary(), guard=guard.to_dict())
            return mod
        rewriter = _Rewriter(func, set(guarded))
        mod = rewriter.rewrite(mod)
        mod = relax.transform.DeadCodeElimination(["main"])(mod)
        self.report = FP16OverflowGuardReport(
            f"{guard.summary()}; {rewriter.rewritten} conv2d/matmul/norm calls back in float32"
            + (f"; not in this graph as a weighted op: {', '.join(unmatched)}" if unmatched else ""),
            kept_fp32=kept,
            rewritten=rewriter.rewritten,
            guard=guard.to_dict(),
        )
        return mod


class _Rewriter:
    """Rebuild ``main`` binding by binding: guarded anchors on float32 operands, their results kept."""

    def __init__(self, func: relax.Function, guarded: set[relax.Var]) -> None:
        self.func = func
        self.guarded = guarded
        self.values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        self.remap: dict[relax.Var, relax.Expr] = {}
        self.wide: dict[relax.Var, relax.Expr] = {}  # original float16 var -> the float32 it was cast from
        self.hot: set[Any] = set()  # new float32 vars holding a guarded result or a value derived from one
        self.rewritten = 0

    def _weight(self, expr: Any) -> bool:
        """Whether ``expr`` is a guarded weight parameter, possibly behind views and casts."""
        while isinstance(expr, relax.Var) and op_name(self.values.get(expr)) in _WEIGHT_VIEWS:
            expr = self.values[expr].args[0]
        return isinstance(expr, relax.Var) and expr in self.guarded

    def _float32(self, bb: relax.BlockBuilder, expr: Any) -> Any:
        """``expr`` (an original operand) in float32, undoing cast-to-fp16's casts rather than rounding."""
        if not isinstance(expr, relax.Var) or _dtype(expr) != "float16":
            return self._subst(expr)
        if expr in self.wide:
            return self.wide[expr]
        value = self.values.get(expr)
        if op_name(value) == "relax.astype" and _dtype(value.args[0]) == "float32":
            return self._subst(value.args[0])
        if op_name(value) in _WEIGHT_VIEWS[1:]:  # a view (transpose) of a cast weight: view the float32
            source = self._float32(bb, value.args[0])
            return bb.emit(relax.Call(value.op, [source, *value.args[1:]], value.attrs, value.ty_args))
        return bb.emit(relax.op.astype(self._subst(expr), "float32"))

    def _subst(self, expr: Any) -> Any:
        if isinstance(expr, relax.Var):
            return self.remap.get(expr, expr)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [self._subst(a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._subst(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self._subst(expr.tuple_value), expr.index)
        return expr

    def _binding(self, bb: relax.BlockBuilder, var: relax.Var, value: Any, dataflow: bool) -> None:
        op = op_name(value)
        args = list(value.args) if isinstance(value, relax.Call) else []
        if op == "relax.astype":
            source, target = args[0], str(value.attrs.dtype)
            if source in self.wide and target == "float32":  # cast down and up again: the float32 as is
                self.remap[var] = self.wide[source]
                return
            if self._subst(source) in self.hot and target == "float32":
                self.remap[var] = self._subst(source)
                return
        if op in _ANCHORS + _NORMS and any(self._weight(a) for a in args):
            self.rewritten += 1
            wide_args = [self._float32(bb, a) for a in args]
            new_value: Any = relax.Call(value.op, wide_args, value.attrs, value.ty_args)
            hot, widened = op in _ANCHORS, True  # a normalised result is back in range
        elif op not in _ANCHORS and op != "relax.astype" and any(a in self.wide for a in args):
            # an op reading a guarded result cast to float16: computed in float32 on the float32 value
            new_value = relax.Call(value.op, [self._float32(bb, a) for a in args], value.attrs, value.ty_args)
            hot, widened = True, True
        else:
            new_value = self._subst(value)
            hot = op not in _ANCHORS and any(self._subst(a) in self.hot for a in args)
            widened = False
        is_output = dataflow and not isinstance(var, relax.DataflowVar)
        emit = bb.emit_output if is_output else bb.emit
        if widened and _dtype(var) == "float16":
            # now computed in float32 where it was float16: float32 readers take that value, the others
            # (unguarded convs, the function's float16 results) its cast, so that their types still hold
            wide = bb.emit(new_value)
            if _dtype(wide) == "float32":
                self.wide[var] = wide
                if hot:
                    self.hot.add(wide)
                self.remap[var] = emit(relax.op.astype(wide, "float16"), var.name)
                return
            new_value = wide
        new = emit(new_value, var.name)
        self.remap[var] = new
        if op == "relax.astype" and self._subst(args[0]) in self.hot and _dtype(new) == "float16":
            self.wide[var] = self._subst(args[0])  # float16 readers keep the cast, float32 ones the source
        elif hot and _dtype(new) == "float32":
            self.hot.add(new)

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        bb = relax.BlockBuilder(mod)
        name = "edgediff_fp16_guard_main"
        with bb.function(name, list(self.func.params), attrs=dict(self.func.attrs), pure=self.func.is_pure):
            for block in self.func.body.blocks:
                dataflow = isinstance(block, relax.DataflowBlock)
                with bb.dataflow() if dataflow else _nothing():
                    for binding in block.bindings:
                        if isinstance(binding, relax.MatchCast):
                            new = bb.match_cast(self._subst(binding.value), binding.ty)
                            self.remap[binding.var] = new
                        else:
                            self._binding(bb, binding.var, binding.value, dataflow)
                    if dataflow:  # dataflow variables do not outlive their block
                        self.wide.clear()
                        self.hot.clear()
            bb.emit_func_output(self._subst(self.func.body.body))
        built = bb.get()
        functions = {gv: f for gv, f in built.functions_items() if gv.name_hint not in ("main", name)}
        result = tvm.IRModule(functions, attrs=mod.attrs)
        result["main"] = built[name]
        return result


class _nothing:  # noqa: N801 - a no-op context manager for non-dataflow binding blocks
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None
