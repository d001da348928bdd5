"""Move computations on weights alone (transposes, reshapes, Winograd weight transforms) to compile time."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax

from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport, handoff, optional

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

TRANSFORM_FUNCTION = "main_transform_params"  # the name relax.transform.LiftTransformParams gives it


@dataclass
class LiftedOutput:
    """One weight the rewritten ``main`` takes: a stored weight passed through, or a computed one."""

    sources: list[int]  # indices into the weights ``main`` took before lifting
    kernels: list[str]  # the kernels that compute it (empty: passed through unchanged)


@dataclass
class WeightTransform:
    """What the compiler runs once on the weights before writing them (see :func:`apply`).

    ``kept`` weights reach the new ``main`` untouched and first (quantized weights whose dequantization
    must not be lifted); the ``transform_inputs`` go through ``module`` (a Relax module whose ``main``
    takes them as one tuple), whose outputs follow.
    """

    module: Any  # tvm.IRModule
    kept: list[int]
    transform_inputs: list[int]
    outputs: list[LiftedOutput] = field(default_factory=list)

    def names(self, weight_names: list[str]) -> list[str]:
        """Names of the weights the new ``main`` takes: a computed weight is named after its source and the
        kernel that made it (``proj.weight:transpose``), so the manifest says where each stored tensor came
        from."""
        names = [weight_names[i] for i in self.kept]
        for out in self.outputs:
            source = "+".join(weight_names[i] for i in out.sources)
            name = source if not out.kernels else f"{source}:{out.kernels[-1]}"
            copies = names.count(name) + sum(n.startswith(f"{name}#") for n in names)
            names.append(name if not copies else f"{name}#{copies + 1}")
        return names

    def kernel_chains(self, weight_names: list[str]) -> dict[str, list[str]]:
        """The kernels that computed each precomputed stored weight, by stored name (for the manifest: the
        runtime's LoRA merge needs to know which transforms a stored weight went through)."""
        computed = self.names(weight_names)[len(self.kept) :]
        return {name: out.kernels for name, out in zip(computed, self.outputs, strict=True) if out.kernels}

    def apply(self, weights: list[Any], weight_names: list[str]) -> tuple[list[Any], list[str]]:
        """Run the transform on the host and return the weights (and names) in the order ``main`` takes."""
        from edgediff.backend.build import build_for_host

        executable = build_for_host(self.module)
        vm = relax.VirtualMachine(executable, tvm.cpu())
        transformed = vm["main"](tuple(_as_tensor(weights[i]) for i in self.transform_inputs))
        arrays = [weights[i] for i in self.kept] + list(transformed)
        return arrays, self.names(weight_names)


@dataclass
class LiftWeightTransformsReport(PassReport):
    """Weight-only kernels moved to compile time; when none were found only ``summary`` and ``lifted``."""

    lifted: int = 0  # stored weights precomputed
    launches_removed: int | None = optional()
    by_kernel: dict[str, int] | None = optional()  # the kernel that made each precomputed weight, most first
    kept_unlifted_weights: int | None = optional()  # weights whose lifted result would be wider (quantized)
    weight_transform: WeightTransform | None = (
        handoff()
    )  # for the compiler, run on the weights before writing


def _as_tensor(value: Any) -> Any:
    return value if isinstance(value, tvm.runtime.Tensor) else tvm.runtime.tensor(value)


@register_pass("lift-weight-transforms")
@tvm.transform.module_pass(opt_level=0, name="edgediff.LiftWeightTransforms")
class LiftWeightTransforms:
    """Compute every weight-only part of the model once, at compile time, and store its result.

    Weights are parameters of ``main`` (kept out of the library, see ``frontend/relax_import.py``), so a
    ``permute_dims`` of an ``nn.Linear`` weight, a bias reshape or a Winograd weight transform would run on
    every call: for SD1.5 that is hundreds of MB of transposes per denoising step. This is TVM's
    ``LiftTransformParams`` with one restriction: a weight whose lifted result would be wider than itself
    (the dequantization of an int8 or int4 weight) stays in ``main``, because storing that result would
    store the weight as float again. The lifted function is
    taken out of the module (it is built for the compiling host, not for the target) and handed to the
    compiler as the report's ``weight_transform`` (see ``passes/runner.py: weight_transform``).
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = LiftWeightTransformsReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        main = mod["main"]
        num_input = int(main.attrs["num_input"])
        weights = list(main.params[num_input:])
        # Lift everything, then keep in main every weight whose lifted result would be wider than it (a
        # dequantization: int8 -> float32, packed int4 -> int8): storing that result would undo the
        # quantization. Layout changes of quantized weights (an int8 transpose) still lift.
        kept: list[int] = []
        while True:
            lifted_inputs = [i for i in range(len(weights)) if i not in kept]
            lifted = _lift(mod, num_input, kept, lifted_inputs)
            if lifted is None:
                self.report = LiftWeightTransformsReport("no weight-only computation found")
                return mod
            transform_fn = lifted[TRANSFORM_FUNCTION]
            outputs = _describe_outputs(transform_fn, lifted_inputs)
            widened = {
                source
                for out, ty in zip(outputs, _output_types(transform_fn), strict=True)
                for source in out.sources
                if _widens(ty, weights[source].ty)
            }
            if not widened:
                break
            kept = sorted({*kept, *widened})
        computed = [o for o in outputs if o.kernels]
        if not computed:  # only pass-throughs: nothing to gain, keep the module as it was
            self.report = LiftWeightTransformsReport("no weight-only computation found")
            return mod

        result = _only(lifted, "main", lifted["main"].with_attr("num_input", num_input))
        transform_mod = _only(
            lifted,
            TRANSFORM_FUNCTION,
            transform_fn.with_attr("global_symbol", "main").without_attr("num_input"),
        )

        by_kernel: dict[str, int] = {}
        for out in computed:
            by_kernel[out.kernels[-1]] = by_kernel.get(out.kernels[-1], 0) + 1
        launches = sum(len(o.kernels) for o in computed)
        self.report = LiftWeightTransformsReport(
            summary=(
                f"{launches} weight-only kernel launches moved to compile time "
                f"({len(computed)} stored weights precomputed)"
            ),
            lifted=len(computed),
            launches_removed=launches,
            by_kernel=dict(sorted(by_kernel.items(), key=lambda kv: -kv[1])),
            kept_unlifted_weights=len(kept),
            weight_transform=WeightTransform(transform_mod, kept, lifted_inputs, outputs),
        )
        return result


def _only(mod: tvm.IRModule, entry: str, func: relax.Function) -> tvm.IRModule:
    """``mod`` with ``func`` as ``main`` in place of the Relax function ``entry`` and of every other Relax
    function, keeping the kernels ``func`` calls."""
    functions = {
        gvar: f
        for gvar, f in mod.functions_items()
        if not isinstance(f, relax.Function) and gvar.name_hint != "main"
    }
    functions[tvm.ir.GlobalVar("main")] = func
    return relax.transform.DeadCodeElimination(["main"])(tvm.IRModule(functions, attrs=mod.attrs))


def _lift(
    mod: tvm.IRModule, num_input: int, kept: list[int], lifted_inputs: list[int]
) -> tvm.IRModule | None:
    """``LiftTransformParams`` on ``main`` with the ``kept`` weights presented as run-time inputs (so nothing
    that reads them lifts); None when nothing lifts."""
    main = mod["main"]
    params = list(main.params)
    inputs, weights = params[:num_input], params[num_input:]
    ordered = inputs + [weights[i] for i in kept] + [weights[i] for i in lifted_inputs]
    staged = relax.Function(ordered, main.body, main.ret_ty, main.is_pure, main.attrs, main.span)
    work = mod.clone()
    work["main"] = staged.with_attr("num_input", num_input + len(kept))
    lifted = relax.transform.LiftTransformParams()(relax.transform.EliminateCommonSubexpr()(work))
    if TRANSFORM_FUNCTION not in [g.name_hint for g in lifted.get_global_vars()]:
        return None
    return lifted


def _output_types(func: relax.Function) -> list[Any]:
    ret = func.ret_ty
    return list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]


def _bits(dtype: Any) -> int:
    return tvm.runtime.DataType(str(dtype)).bits


def _widens(out: Any, source: Any) -> bool:
    """Whether storing ``out`` would take more bytes than its ``source`` weight (a dequantization). A
    reduction of a quantized weight to a wider dtype (the int32 column sums the vpdpbusd int8 kernel
    subtracts, ``kernels/int8_linear.py``) is smaller than the weight and lifts."""
    if _bits(out.dtype) <= _bits(source.dtype):
        return False
    sizes = [_elements(t) for t in (out, source)]
    if None in sizes:
        return True
    return sizes[0] * _bits(out.dtype) > sizes[1] * _bits(source.dtype)


def _elements(ty: Any) -> int | None:
    dims = getattr(ty.shape, "values", None) if ty.shape is not None else None
    if dims is None or any(not isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    count = 1
    for d in dims:
        count *= int(d)
    return count


def _describe_outputs(func: relax.Function, lifted_inputs: list[int]) -> list[LiftedOutput]:
    """For each output of the lifted function: which weights it reads and which kernels compute it."""
    (param,) = func.params
    origin: dict[relax.Var, LiftedOutput] = {}
    tuples: dict[relax.Var, relax.Tuple] = {}

    def describe(expr: Any) -> LiftedOutput:
        if isinstance(expr, relax.Var) and expr in origin:
            return origin[expr]
        if isinstance(expr, relax.TupleGetItem) and expr.tuple_value.same_as(param):
            return LiftedOutput([lifted_inputs[expr.index]], [])
        if isinstance(expr, relax.Call):
            sources: list[int] = []
            kernels: list[str] = []
            for arg in _call_arguments(expr):
                got = describe(arg)
                sources += [s for s in got.sources if s not in sources]
                kernels += got.kernels
            return LiftedOutput(sources, [*kernels, _kernel_name(expr)])
        return LiftedOutput([], [])

    for block in func.body.blocks:
        for binding in block.bindings:
            origin[binding.var] = describe(binding.value)
            if isinstance(binding.value, relax.Tuple):
                tuples[binding.var] = binding.value
    body = func.body.body
    if body.same_as(param):  # every weight passed through unchanged
        return [LiftedOutput([i], []) for i in lifted_inputs]
    fields = body.fields if isinstance(body, relax.Tuple) else tuples[body].fields
    return [describe(f) for f in fields]


def _call_arguments(call: relax.Call) -> list[Any]:
    args: list[Any] = []
    for arg in call.args:
        args += list(arg.fields) if isinstance(arg, relax.Tuple) else [arg]
    return args


def _kernel_name(call: relax.Call) -> str:
    if call.op.same_as(tvm.ir.Op.get("relax.call_tir")):
        # legalize numbers kernels of one op with different shapes (transpose, transpose1, ...)
        return re.sub(r"\d+$", "", call.args[0].name_hint)
    return call.op.name if isinstance(call.op, tvm.ir.Op) else str(call.op)
