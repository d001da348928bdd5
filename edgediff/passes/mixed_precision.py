"""Run each layer at the precision a plan chose: low-precision weights in weights.bin, quantized compute.

The plan comes from :func:`edgediff.precision.make_plan` (measurement on the float torch model). This file
realises it in two halves that must agree and therefore live together, both driven by
:func:`stored_params` (what a weight becomes):

- :class:`MixedPrecision`, the graph rewrite: each quantized weight parameter of ``main`` is replaced by its
  stored parameters (an int8 / float16 / packed-int4 tensor, plus a float32 scale), and the consuming
  conv2d / matmul is rewritten to use them;
- :func:`quantize_weights`, the weight transform ``compile_model`` applies before writing weights.bin.

Where the dequantization goes. FuseOps does *not* fuse a dequantize prologue (``astype`` + ``multiply``
before the conv/matmul) into the consumer's kernel: a conv2d/matmul is an "out-elementwise-fusable" anchor
that only absorbs ops after it, so the prologue becomes its own kernel writing the float weight to memory
on every call - more traffic than the float model. So for per-output-channel int8 the rewrite avoids the
prologue: the conv2d/matmul reads the int8 weight directly (TVM's kernel casts each element as it
accumulates) and the per-channel scale, which commutes with the reduction, multiplies the output, where
FuseOps does fuse it (with the bias) into the same kernel. int4's per-group scales do not commute, so int4
weights are unpacked and dequantized by a separate kernel before the op (``dequantize_int4``; its cost is
charged to w4 in the cost model), except where ``winograd-conv2d`` then transforms the weight: its weight
transform reads the nibbles itself. Activation quantization (round/clip/cast to int8) is elementwise on the
layer's input and fuses into the producer's kernel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax

from edgediff.errors import PassError
from edgediff.kernels.bf16_linear import BF16LinearEmitter
from edgediff.kernels.bf16_matmul import has_avx512bf16
from edgediff.kernels.dequantize import (
    INT4_DEQUANTIZE,
    int4_dequantize_fits,
    int4_dequantize_func,
    int4_weight_te,
    round_to_bfloat16_te,
    rounds_data_for_conv,
)
from edgediff.kernels.int8_attention import Int8AttentionEmitter, int8_attention_fits
from edgediff.kernels.int8_conv2d import ConvShape, Int8Conv2dEmitter, int8_conv2d_fits
from edgediff.kernels.int8_linear import Int8LinearEmitter, int8_linear_fits
from edgediff.kernels.int8_matmul import dot_instruction
from edgediff.passes.analysis import relax_op_histogram
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import op_name, static_shape
from edgediff.passes.report import PassReport
from edgediff.precision.assignment import format_bytes
from edgediff.precision.plan import LayerPlan, PrecisionPlan
from edgediff.precision.quantizers import (
    INT8_MAX,
    INT8_MIN,
    MIN_SCALE,
    get_format,
    quantize_weight,
    stored_shapes,
)

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

SCALE_SUFFIX = "_scale"
_REWRITTEN = "edgediff_mixed_precision_main"  # the rewritten main's name until it replaces main
TIMESTEP_INPUT = "timestep"
# Ops that leave a weight a weight: a matmul operand reached from a parameter only through these is a
# weight (a linear layer), not an activation (an attention matmul).
_WEIGHT_VIEWS = ("relax.permute_dims", "relax.reshape", "relax.astype", "relax.broadcast_to")


def stored_params(
    layer: LayerPlan, name: str, shape: Sequence[int]
) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, dtype)`` of each array weight ``name`` of ``layer`` is stored as - the signature the
    rewrite gives ``main`` and the arrays :func:`quantize_weights` writes, in that order."""
    fmt = get_format(layer.format)
    if fmt.weight_bits is None:
        raise PassError(f"layer {layer.name}: format {fmt.name} stores no weights")
    shapes = stored_shapes(tuple(shape), fmt)
    dtypes = [str(fmt.weight_dtype), "float32"]
    names = [name, name + SCALE_SUFFIX]
    return [(n, s, d) for n, s, d in zip(names, shapes, dtypes, strict=False)]


def _changes_storage(layer: LayerPlan | None, dtype: str) -> bool:
    """Whether a weight is stored differently from how the import left it (float32 at fp32 is not)."""
    return (
        layer is not None and layer.weight is not None and not (layer.format == "fp32" and dtype == "float32")
    )


def quantize_weights(
    plan: PrecisionPlan, weights: Sequence[Any], names: Sequence[str]
) -> tuple[list[Any], list[str]]:
    """The weight transform matching :class:`MixedPrecision`: each planned weight becomes its stored arrays
    (quantizers.quantize_weight), everything else is passed through; returns the arrays and their names in
    the order the rewritten ``main`` takes them."""
    by_weight = plan.by_weight()
    arrays: list[Any] = []
    stored: list[str] = []
    for name, weight in zip(names, weights, strict=True):
        layer = by_weight.get(name)
        dtype = str(weight.dtype)
        if not _changes_storage(layer, dtype):
            arrays.append(weight)
            stored.append(name)
            continue
        array = weight.numpy() if hasattr(weight, "numpy") else np.asarray(weight)
        values = quantize_weight(array, get_format(layer.format))
        layout = stored_params(layer, name, array.shape)
        for (param, shape, param_dtype), value in zip(layout, values, strict=True):
            if tuple(value.shape) != shape or str(value.dtype) != param_dtype:  # the halves disagree: a bug
                raise AssertionError(
                    f"{param}: {value.dtype}{list(value.shape)} vs {param_dtype}{list(shape)}"
                )
            arrays.append(value)
            stored.append(param)
    return arrays, stored


def _var_uses(func: relax.Function) -> dict[relax.Var, list[relax.Call | None]]:
    """For every variable: the calls that use it (None for a use that is not a call argument)."""
    uses: dict[relax.Var, list[relax.Call | None]] = {}

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Call):
            for arg in expr.args:
                if isinstance(arg, relax.Var):
                    uses.setdefault(arg, []).append(expr)
                else:
                    visit(arg)
        elif isinstance(expr, relax.Tuple):
            for field in expr.fields:
                visit(field)
        elif isinstance(expr, relax.TupleGetItem):
            visit(expr.tuple_value)
        elif isinstance(expr, relax.Var):
            uses.setdefault(expr, []).append(None)

    for block in func.body.blocks:
        for binding in block.bindings:
            visit(binding.value)
    visit(func.body.body)
    return uses


def _dtype(expr: Any) -> str:
    return str(getattr(expr.ty, "dtype", "float32"))


def _cast(x: relax.Expr, dtype: str) -> relax.Expr:
    """``astype`` unless ``x`` is a variable of that dtype already: a no-op cast of a stored scale would be
    a kernel launch per call, or (lifted to compile time) a renamed copy of the scale in weights.bin."""
    return x if isinstance(x, relax.Var) and _dtype(x) == dtype else relax.op.astype(x, dtype)


def _float32(x: relax.Expr) -> relax.Expr:
    """Scale and rounding arithmetic runs in float32 even where cast-to-fp16 made the input float16."""
    return x if _dtype(x) == "float32" else relax.op.astype(x, "float32")


def _half_op(op: Any, fmt: Any, x: relax.Expr, weight: relax.Expr, out_dtype: str) -> relax.Expr:
    """The conv/matmul ``op`` of a 16-bit float format: operands in the stored dtype (float16/bfloat16),
    accumulating in float32 (TVM's kernel widens each product), or, for ``fp16-acc16``, in float16 with a
    float16 result cast back: the loop is then float16 throughout, which is what gives LLVM ``fmla .8h``
    on Arm +fullfp16."""
    half = str(fmt.weight_dtype)
    if fmt.accumulate is None or fmt.accumulate == out_dtype:
        return op(_cast(x, half), weight, fmt.accumulate or out_dtype)
    return relax.op.astype(op(_cast(x, half), weight, fmt.accumulate), out_dtype)


class _Rewriter:
    """Rebuilds ``main`` binding by binding with a BlockBuilder, substituting the quantized layers."""

    def __init__(
        self,
        func: relax.Function,
        plan: PrecisionPlan,
        weight_names: Sequence[str],
        int8_kernel: Int8LinearEmitter | None = None,
        bf16_kernel: BF16LinearEmitter | None = None,
    ) -> None:
        self.func = func
        self.plan = plan
        self.int8_kernel = int8_kernel  # w8a8 Linear layers on the int8 GEMM kernel (None: Relax matmul)
        self.bf16_kernel = bf16_kernel  # bf16 Linear layers on the bf16 GEMM kernel (None: Relax matmul)
        self.int8_conv = Int8Conv2dEmitter(int8_kernel) if int8_kernel is not None else None  # ... and convs
        self.fused_bias: dict[relax.Var, relax.Var] = {}  # bias add -> the matmul whose kernel adds it
        num_input = int(func.attrs["num_input"])
        params = list(func.params)
        if len(params) - num_input != len(weight_names):
            raise PassError(
                f"main takes {len(params) - num_input} weights, the plan was given "
                f"{len(weight_names)} weight names"
            )
        self.inputs = params[:num_input]
        by_weight = plan.by_weight()
        self.layers: dict[relax.Var, LayerPlan] = {}  # original weight param -> its layer
        self.stored: dict[relax.Var, list[relax.Var]] = {}  # ... -> its new params
        self.new_params = list(self.inputs)
        for var, name in zip(params[num_input:], weight_names, strict=True):
            layer = by_weight.get(name)
            if _changes_storage(layer, _dtype(var)):
                shape = [int(d) for d in var.ty.shape]
                new = [relax.Var(p, relax.TensorType(s, d)) for p, s, d in stored_params(layer, name, shape)]
                self.layers[var], self.stored[var] = layer, new
                self.new_params += new
            else:
                self.new_params.append(var)
        self.values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
        self.uses = _var_uses(func)
        self.remap: dict[relax.Var, relax.Expr] = {}
        self.dequantized: dict[relax.Var, relax.Expr] = {}
        self.int4_kernels: dict[tuple[tuple[int, ...], str], Any] = {}  # (shape, dtype) -> GlobalVar
        self.transposed: dict[relax.Var, relax.Expr] = {}
        self.timestep_bucket: relax.Expr | None = None
        self.counts: dict[str, int] = {}
        self.attention = self._match_attention()

    # ------------------------------------------------------------------------------------------- analysis

    def _is_weight(self, expr: Any) -> bool:
        while isinstance(expr, relax.Var) and expr in self.values:
            value = self.values[expr]
            if op_name(value) not in _WEIGHT_VIEWS:
                return False
            expr = value.args[0]
        return isinstance(expr, relax.Var) and expr in self.func.params[len(self.inputs) :]

    def _patterns(self) -> dict[relax.Var, str]:
        """How each quantized weight is consumed: 'conv' (the weight of conv2d ops), 'linear' (transposed,
        the right operand of matmuls) or 'generic' (anything else: it is dequantized to float first).

        A weight may reach its consumer through views (``astype`` when cast-to-fp16 ran first,
        ``permute_dims`` and ``broadcast_to`` for linear layers); ``self.origin`` maps every such view to
        (weight, view ops)."""
        self.origin = {var: (var, ()) for var in self.layers}
        for var, value in self.values.items():
            if (
                op_name(value) in ("relax.astype", "relax.permute_dims", "relax.broadcast_to")
                and value.args[0] in self.origin
            ):
                weight, views = self.origin[value.args[0]]
                self.origin[var] = (weight, (*views, op_name(value)))
        views = {hash(value) for var, value in self.values.items() if var in self.origin}  # by node
        kinds: dict[relax.Var, set[str]] = {var: set() for var in self.layers}
        for var, (weight, path) in self.origin.items():
            # astype (cast-to-fp16) and broadcast_to (a linear on 3-d inputs) do not change what a weight is
            other = [op for op in path if op not in ("relax.astype", "relax.broadcast_to")]
            for call in self.uses.get(var, []):
                if call is not None and hash(call) in views:
                    continue  # a further view: its own uses are what count
                right = call is not None and call.args[-1].same_as(var) and not call.args[0].same_as(var)
                if right and op_name(call) == "relax.nn.conv2d" and not other:
                    kinds[weight].add("conv")
                elif right and op_name(call) == "relax.matmul" and other == ["relax.permute_dims"]:
                    kinds[weight].add("linear")
                else:
                    kinds[weight].add("generic")
        patterns = {}
        for var, found in kinds.items():
            generic = len(found) != 1 or get_format(self.layers[var].format).weight_bits == 4
            patterns[var] = "generic" if generic else found.pop()
        return patterns

    def _match_attention(self) -> dict[relax.Var, tuple[LayerPlan, str]]:
        """Map the graph's activation x activation matmuls to the plan's attention layers, in order.

        torch.export keeps execution order, so the k-th attention call of the calibration run is the k-th
        QK^T / PV matmul pair of the graph; shapes confirm each match (other activation matmuls, e.g.
        linear attention, are skipped)."""
        expected = []
        for layer in self.plan.layers:
            if layer.kind == "attention" and layer.attention_shape:
                _, queries, keys, dim = layer.attention_shape
                expected += [
                    (layer, "qk", (queries, dim), (dim, keys)),
                    (layer, "pv", (queries, keys), (keys, None)),
                ]
        found: dict[relax.Var, tuple[LayerPlan, str]] = {}
        position = 0
        for var, value in self.values.items():
            if position == len(expected) or op_name(value) != "relax.matmul":
                continue
            a, b = value.args
            if self._is_weight(a) or self._is_weight(b):
                continue
            layer, which, shape_a, shape_b = expected[position]
            got_a = tuple(int(d) for d in list(a.ty.shape)[-2:])
            got_b = tuple(int(d) for d in list(b.ty.shape)[-2:])
            if got_a == shape_a and got_b[0] == shape_b[0] and (shape_b[1] is None or got_b[1] == shape_b[1]):
                found[var] = (layer, which)
                position += 1
        if position < len(expected):
            raise PassError(
                f"attention layer {expected[position][0].name} ({expected[position][1]} matmul) is not in "
                "the graph; pin it to the float format"
            )
        return found

    # ------------------------------------------------------------------------------------------- emitting

    def _scale_expr(self, bb: relax.BlockBuilder, scales: Sequence[float]) -> relax.Expr:
        """The static input scale: a constant, or [early, late] selected by the timestep input."""
        if len(scales) == 1:
            return relax.const(float(scales[0]), "float32")
        if self.timestep_bucket is None:
            timestep = next((v for v in self.inputs if v.name == TIMESTEP_INPUT), None)
            if timestep is None or self.plan.timestep_split is None:
                raise PassError("the plan has per-timestep scales but the model has no 'timestep' input")
            first = relax.op.strided_slice(timestep, axes=[0], begin=[0], end=[1])
            late = relax.op.less(
                relax.op.astype(first, "float32"), relax.const(self.plan.timestep_split, "float32")
            )
            self.timestep_bucket = bb.emit(relax.op.astype(late, "int64"), "timestep_bucket")
        table = relax.const(np.asarray(scales, dtype=np.float32))
        return bb.emit(relax.op.take(table, self.timestep_bucket, axis=0))

    @staticmethod
    def _quantize(x: relax.Expr, scale: relax.Expr) -> relax.Expr:
        rounded = relax.op.round(relax.op.divide(_float32(x), scale))
        return relax.op.astype(relax.op.clip(rounded, INT8_MIN, INT8_MAX), "int8")

    @staticmethod
    def _dynamic_scale(bb: relax.BlockBuilder, x: relax.Expr, axis: int) -> relax.Expr:
        peak = relax.op.max(relax.op.abs(_float32(x)), axis=axis, keepdims=True)
        scale = relax.op.divide(peak, relax.const(float(INT8_MAX), "float32"))
        return bb.emit(relax.op.maximum(scale, relax.const(MIN_SCALE, "float32")))

    def _int8_input(
        self, bb: relax.BlockBuilder, layer: LayerPlan, x: relax.Expr
    ) -> tuple[relax.Expr, relax.Expr]:
        """(int8 input, its scale) for a layer with quantized activations."""
        if get_format(layer.format).activations == "static":
            scale = self._scale_expr(bb, layer.scales or [1.0])
        else:
            scale = self._dynamic_scale(bb, x, -1)
        return bb.emit(self._quantize(x, scale)), scale

    def _dequantized(self, bb: relax.BlockBuilder, var: relax.Var) -> relax.Expr:
        """A quantized weight back in its original float dtype and shape (int4, and unusual consumers)."""
        if var not in self.dequantized:
            layer, stored = self.layers[var], self.stored[var]
            dtype = _dtype(var)
            shape = [int(d) for d in var.ty.shape]
            fmt = get_format(layer.format)
            if fmt.weight_bits == 16:
                value = relax.op.astype(stored[0], dtype)
            elif fmt.weight_bits == 8:
                scale = relax.op.reshape(stored[1], [shape[0]] + [1] * (len(shape) - 1))
                value = relax.op.multiply(relax.op.astype(stored[0], dtype), _cast(scale, dtype))
            elif len(shape) == 4 and int4_dequantize_fits(shape):
                # a conv weight: one vectorized kernel, recognised by winograd-conv2d, which then reads the
                # nibbles itself (a Linear weight keeps the TE unpack, which FuseOps fuses with the
                # transpose after it: the two as separate kernels write the float weight twice)
                key = (tuple(shape), dtype)
                if key not in self.int4_kernels:
                    func = int4_dequantize_func(shape, dtype)
                    name = f"{INT4_DEQUANTIZE}_{'x'.join(map(str, shape))}"
                    self.int4_kernels[key] = bb.add_func(func.without_attr("global_symbol"), name)
                value = relax.call_tir(self.int4_kernels[key], stored[:2], relax.TensorType(shape, dtype))
            else:  # the same unpack as TE
                value = bb.call_te(
                    lambda packed, scale: int4_weight_te(packed, scale, shape, dtype),
                    stored[0],
                    stored[1],
                    primfunc_name_hint=INT4_DEQUANTIZE,
                )
            self.dequantized[var] = bb.emit(value, f"{var.name}_dequantized")
            self._count("dequantize kernel (int4 or generic use)")
        return self.dequantized[var]

    def _count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def _subst(self, bb: relax.BlockBuilder, expr: Any) -> Any:
        if isinstance(expr, relax.Var):
            if expr in self.remap:
                return self.remap[expr]
            if expr in self.layers:  # a use of a quantized weight the rewrite does not specialise
                return self._dequantized(bb, expr)
            return expr
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [self._subst(bb, a) for a in expr.args], expr.attrs, expr.ty_args)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self._subst(bb, f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(self._subst(bb, expr.tuple_value), expr.index)
        return expr

    def _conv(
        self, bb: relax.BlockBuilder, call: relax.Call, var: relax.Var, out_dtype: str, out: relax.Var
    ) -> relax.Expr:
        layer, stored = self.layers[var], self.stored[var]
        fmt = get_format(layer.format)
        a = call.attrs
        x = self._subst(bb, call.args[0])
        if (kernel := self._int8_kernel_conv(bb, layer, call, x, var, out, out_dtype)) is not None:
            return kernel

        def conv(data: relax.Expr, weight: relax.Expr, dtype: str) -> relax.Expr:
            return relax.op.nn.conv2d(
                data,
                weight,
                a.strides,
                a.padding,
                a.dilation,
                a.groups,
                a.data_layout,
                a.kernel_layout,
                a.out_layout,
                dtype,
            )

        return self._layerop_name(bb, layer, fmt, x, stored, conv, out_dtype)

    def _linear(
        self, bb: relax.BlockBuilder, call: relax.Call, var: relax.Var, out_dtype: str, out: relax.Var
    ) -> relax.Expr:
        layer = self.layers[var]
        x = self._subst(bb, call.args[0])
        if (kernel := self._kernel_linear(bb, layer, x, var, out, out_dtype)) is not None:
            return kernel
        if var not in self.transposed:  # one transpose of the stored (int8 / float16) weight per block
            self.transposed[var] = bb.emit(relax.op.permute_dims(self.stored[var][0], [1, 0]))
        stored = [self.transposed[var], *self.stored[var][1:]]
        return self._layerop_name(bb, layer, get_format(layer.format), x, stored, relax.op.matmul, out_dtype)

    def _bias_of(self, out: relax.Var, axis: int = -1) -> relax.Var | None:
        """The bias a Linear's (``axis`` -1) or NCHW conv's (``axis`` 1) only consumer adds (``add(out, b)`` /
        ``add(b, out)``, ``b`` a float32 ``[N]`` weight passed through as it is, or its reshape to ``N`` along
        ``axis`` and 1 elsewhere, as torch.export writes a conv bias), so that the GEMM kernel's (int8, bf16)
        epilogue adds it."""
        uses = self.uses.get(out, [])
        if len(uses) != 1 or uses[0] is None or op_name(uses[0]) != "relax.add":
            return None
        add = uses[0]
        bias = add.args[1] if add.args[0].same_as(out) else add.args[0]
        weights = self.func.params[len(self.inputs) :]
        columns = list(out.ty.shape)[axis] if out.ty.shape is not None else None
        view = self.values.get(bias) if isinstance(bias, relax.Var) else None
        if op_name(view) == "relax.reshape" and columns is not None:
            dims = static_shape(bias)
            broadcast = dims is not None and len(dims) == len(out.ty.shape)
            if broadcast and dims[axis] == int(columns) and int(np.prod(dims)) == int(columns):
                bias = view.args[0]
        if (
            not isinstance(bias, relax.Var)
            or bias not in weights
            or bias in self.layers
            or _dtype(bias) != "float32"
            or _dtype(out) != "float32"
            or len(bias.ty.shape) != 1
            or columns is None
            or int(bias.ty.shape[0]) != int(columns)
        ):
            return None
        added = next((v for v, value in self.values.items() if value.same_as(add)), None)
        if added is None:
            return None
        self.fused_bias[added] = out
        return bias

    def _kernel_linear(
        self,
        bb: relax.BlockBuilder,
        layer: LayerPlan,
        x: relax.Expr,
        var: relax.Var,
        out: relax.Var,
        dtype: str,
    ) -> relax.Expr | None:
        """A Linear on a GEMM kernel - w8a8 (static or per-token scale) on the int8 kernel
        (kernels/int8_linear.py), bf16 on the bfloat16 kernel (kernels/bf16_linear.py) - with the bias in
        the kernel's epilogue, or None where none applies, and then the Relax matmul below: no kernel for
        the target or the format, activations other than static 2-D / 3-D, or a shape the kernel does not
        take (a reduction not a multiple of the instruction's step, output columns not whole vectors)."""
        fmt = get_format(layer.format)
        columns, depth = (int(d) for d in self.stored[var][0].ty.shape)
        x_shape = static_shape(x)
        rows = int(np.prod(x_shape[:-1])) if x_shape is not None else None
        if self.int8_kernel is not None and fmt.activations is not None and fmt.weight_bits == 8:
            kernel, name = "int8", self.int8_kernel.dot.name
            fits = int8_linear_fits(self.int8_kernel.dot, rows, depth, columns)
        elif self.bf16_kernel is not None and fmt.weight_dtype == "bfloat16":
            kernel, name = "bf16", self.bf16_kernel.name
            fits = self.bf16_kernel.fits(rows, depth, columns)
        else:
            return None
        if x_shape is None or len(x_shape) not in (2, 3) or not fits:
            self._count(f"{layer.kind} {fmt.name} Relax (shape the kernel does not take)")
            return None
        self._count(f"{layer.kind} {fmt.name}")
        self._count(f"{kernel} kernel ({name})")
        bias = self._bias_of(out)
        if bias is not None:
            self._count(f"{kernel} kernel bias fused")
        stored = self.stored[var]
        if kernel == "bf16":
            return self.bf16_kernel.linear(bb, x, stored[0], bias, dtype)
        static = None if fmt.activations != "static" else self._scale_expr(bb, layer.scales or [1.0])
        return self.int8_kernel.linear(bb, x, static, stored[0], stored[1], bias, dtype)

    def _int8_kernel_conv(
        self,
        bb: relax.BlockBuilder,
        layer: LayerPlan,
        call: relax.Call,
        x: relax.Expr,
        var: relax.Var,
        out: relax.Var,
        dtype: str,
    ) -> relax.Expr | None:
        """A w8a8 conv2d with a static activation scale on the quantize+im2col and int8 GEMM kernels
        (kernels/int8_conv2d.py), or None, and then the Relax int8 conv2d: no kernel for the target, a
        dynamic activation format (its per-row scale is per ``(n, c, h)`` row of the NCHW input, which no
        GEMM row matches), groups != 1, layouts other than NCHW/OIHW, or shapes that are not static."""
        fmt = get_format(layer.format)
        if self.int8_conv is None or fmt.activations != "static" or fmt.weight_bits != 8:
            return None
        shape = _conv_shape(call, x, self.stored[var][0])
        if not int8_conv2d_fits(self.int8_conv.dot, shape):
            return None
        self._count(f"{layer.kind} {fmt.name}")
        # keys of their own: "int8 kernel (...)" counts the Linear layers
        self._count(f"int8 kernel conv2d ({self.int8_conv.dot.name})")
        scale = self._scale_expr(bb, layer.scales or [1.0])
        bias = self._bias_of(out, axis=1)
        if bias is not None:
            self._count("int8 kernel conv2d bias fused")
        stored = self.stored[var]
        return self.int8_conv.conv2d(bb, x, scale, stored[0], stored[1], bias, shape, dtype)

    def _layerop_name(self, bb, layer, fmt, x, stored, op, out_dtype: str) -> relax.Expr:
        """The conv/matmul ``op`` of a layer at its format (stored = [weight, scale...])."""
        self._count(f"{layer.kind} {fmt.name}")
        if fmt.weight_bits == 16:
            if layer.kind == "conv2d" and rounds_data_for_conv(str(fmt.weight_dtype), _dtype(x), out_dtype):
                # the same products as a bfloat16 conv with float32 accumulation (a product of two
                # bfloat16 values is exact in float32), on the float32 conv kernels: the data rounded to
                # bfloat16 and back (elementwise, fused into its producer), the weight widened inside the
                # kernel or by Winograd's weight transform
                rounded = bb.call_te(round_to_bfloat16_te, x, primfunc_name_hint="round_to_bfloat16")
                self._count("conv2d bf16 on the float32 conv kernels")
                return op(rounded, stored[0], out_dtype)
            return _half_op(op, fmt, x, stored[0], out_dtype)
        if fmt.activations is None:  # int8 weights: cast inside the kernel, per-channel scale on the output
            return relax.op.multiply(op(x, stored[0], out_dtype), _cast(stored[1], out_dtype))
        xq, x_scale = self._int8_input(bb, layer, x)
        accumulated = bb.emit(op(xq, stored[0], "int32"))
        rescaled = relax.op.multiply(relax.op.astype(accumulated, out_dtype), _cast(stored[1], out_dtype))
        return relax.op.multiply(rescaled, _cast(x_scale, out_dtype))

    def _attention(
        self, bb: relax.BlockBuilder, call: relax.Call, layer: LayerPlan, out_dtype: str
    ) -> relax.Expr:
        a, b = (self._subst(bb, arg) for arg in call.args)
        fmt = get_format(layer.format)
        self._count(f"attention matmul {fmt.name}")
        if fmt.activations is None:  # 16-bit float operands
            return _half_op(relax.op.matmul, fmt, a, _cast(b, str(fmt.weight_dtype)), out_dtype)
        if (kernel := self._int8_kernel_attention(bb, a, b, out_dtype)) is not None:
            return kernel
        a_scale = self._dynamic_scale(bb, a, -1)  # per row of the left operand
        b_scale = self._dynamic_scale(bb, b, -2)  # per column of the right operand
        quantized = (bb.emit(self._quantize(a, a_scale)), bb.emit(self._quantize(b, b_scale)))
        product = bb.emit(relax.op.matmul(*quantized, "int32"))
        rescaled = relax.op.multiply(relax.op.astype(product, out_dtype), _cast(a_scale, out_dtype))
        return relax.op.multiply(rescaled, relax.op.astype(b_scale, out_dtype))

    def _int8_kernel_attention(
        self, bb: relax.BlockBuilder, a: relax.Expr, b: relax.Expr, out_dtype: str
    ) -> relax.Expr | None:
        """A w8a8 attention matmul on the batched int8 GEMM kernel (kernels/int8_attention.py), or None
        where it does not apply (no kernel for the target; dynamic shapes or broadcast batch dimensions - K
        and N are padded): then the Relax int8 matmul. Counted like the Linear path: the kernel's sites,
        and the sites that stay in Relax."""
        if self.int8_kernel is None:
            return None
        dot = self.int8_kernel.dot
        if not int8_attention_fits(dot, static_shape(a), static_shape(b)):
            self._count("attention matmul int8 Relax (shape the kernel does not take)")
            return None
        emitter = self.__dict__.setdefault("int8_attention", Int8AttentionEmitter(dot))
        self._count(f"attention matmul int8 kernel ({dot.name})")
        return emitter.matmul(bb, a, b, out_dtype)

    def _weight_of(self, expr: Any, pattern: str) -> relax.Var | None:
        """The quantized weight ``expr`` is a view of, if that weight is consumed as ``pattern``."""
        origin = self.origin.get(expr)
        return origin[0] if origin and self.patterns[origin[0]] == pattern else None

    def _value(self, bb: relax.BlockBuilder, var: relax.Var, value: Any) -> Any:
        op = op_name(value)
        out_dtype = _dtype(var)
        if op == "relax.nn.conv2d" and (weight := self._weight_of(value.args[1], "conv")) is not None:
            return self._conv(bb, value, weight, out_dtype, var)
        if op == "relax.matmul" and (weight := self._weight_of(value.args[1], "linear")) is not None:
            return self._linear(bb, value, weight, out_dtype, var)
        if op == "relax.matmul" and var in self.attention and self.attention[var][0].format != "fp32":
            return self._attention(bb, value, self.attention[var][0], out_dtype)
        return self._subst(bb, value)

    def rewrite(self, mod: tvm.IRModule) -> tvm.IRModule:
        self.patterns = self._patterns()
        for var, pattern in self.patterns.items():
            fmt = get_format(self.layers[var].format)
            if pattern == "generic" and fmt.activations:
                raise PassError(
                    f"layer {self.layers[var].name}: its weight is used by ops other than one conv2d/matmul, "
                    f"so it cannot run at {fmt.name}; pin it to a weight-only format"
                )
        bb = relax.BlockBuilder(mod)
        with bb.function(_REWRITTEN, self.new_params, attrs=dict(self.func.attrs), pure=self.func.is_pure):
            for block in self.func.body.blocks:
                dataflow = isinstance(block, relax.DataflowBlock)
                with bb.dataflow() if dataflow else _nothing():
                    for binding in block.bindings:
                        origin = self.origin.get(binding.var)
                        if origin and self.patterns[origin[0]] != "generic":
                            continue  # a view of a weight whose consumers now read the stored arrays
                        if isinstance(binding, relax.MatchCast):
                            new = bb.match_cast(self._subst(bb, binding.value), binding.ty)
                        elif binding.var in self.fused_bias:  # the int8 / bf16 kernel added the bias
                            new = self.remap[self.fused_bias[binding.var]]
                            if dataflow and not isinstance(binding.var, relax.DataflowVar):
                                new = bb.emit_output(new, binding.var.name)
                        else:
                            value = self._value(bb, binding.var, binding.value)
                            is_output = dataflow and not isinstance(binding.var, relax.DataflowVar)
                            new = (bb.emit_output if is_output else bb.emit)(value, binding.var.name)
                        self.remap[binding.var] = new
                    if dataflow:
                        self.timestep_bucket = None  # dataflow variables do not outlive their block
                        self.dequantized.clear()
                        self.transposed.clear()
            bb.emit_func_output(self._subst(bb, self.func.body.body))
        built = bb.get()
        functions = {gv: f for gv, f in built.functions_items() if gv.name_hint not in ("main", _REWRITTEN)}
        result = tvm.IRModule(functions, attrs=mod.attrs)
        result["main"] = built[_REWRITTEN]
        return result


@dataclass
class MixedPrecisionReport(PassReport):
    """The plan the pass applied (its ``to_dict()`` is the manifest's ``plan``) and what it rewrote."""

    rewritten: dict[str, int] = field(default_factory=dict)  # rewrite kind -> sites
    casts_added: int = 0
    plan: PrecisionPlan | None = None


def _conv_shape(call: relax.Call, x: relax.Expr, weight: relax.Expr) -> ConvShape | None:
    """The static geometry of a conv2d call the int8 conv kernel can take (NCHW/OIHW, groups 1), or None."""
    a = call.attrs
    layouts = (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
    x_shape, w_shape = static_shape(x), static_shape(weight)
    if layouts != ("NCHW", "OIHW", "NCHW") or int(a.groups) != 1 or x_shape is None or w_shape is None:
        return None
    padding = [int(p) for p in a.padding]
    if len(padding) == 2:
        padding = padding * 2
    if len(x_shape) != 4 or len(w_shape) != 4 or len(padding) != 4 or w_shape[1] != x_shape[1]:
        return None
    n, c, h, w = x_shape
    return ConvShape(
        n,
        c,
        h,
        w,
        w_shape[0],
        (w_shape[2], w_shape[3]),
        tuple(int(s) for s in a.strides),
        tuple(padding),
        tuple(int(d) for d in a.dilation),
    )


class _nothing:  # noqa: N801 - a no-op context manager for non-dataflow binding blocks
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _int8_emitter(spec: TargetSpec) -> Int8LinearEmitter | None:
    """The int8 GEMM kernel for a CPU target with an int8 dot-product step (VNNI, Arm dotprod, AVX2), or
    None: other targets keep the Relax int8 matmul (the kernel's portable step is no faster than it)."""
    if spec.kind != "cpu" or not spec.supports_dtype("int8"):
        return None
    target = spec.build_target()
    if target.kind.name != "llvm":
        return None
    dot = dot_instruction(target)
    return None if dot.name == "portable" else Int8LinearEmitter(dot)


def stores_int8_column_sums(spec: TargetSpec) -> bool:
    """Whether this target's int8 kernels store an int32 sum per output channel next to each packed weight
    (the compensation of ``vpdpbusd``'s uint8 activations), which the precision plan counts in its bytes."""
    emitter = _int8_emitter(spec)
    return emitter is not None and emitter.dot.compensated


def _bf16_emitter(spec: TargetSpec) -> BF16LinearEmitter | None:
    """The bf16 GEMM kernel for a CPU target that lists bfloat16: ``vdpbf16ps`` where its LLVM target has
    AVX512-BF16, else the kernel's portable path (bfloat16 widened to float32 in registers). None for
    other targets, which keep the Relax bf16 matmul."""
    if spec.kind != "cpu" or not spec.supports_dtype("bfloat16"):
        return None
    target = spec.build_target()
    if target.kind.name != "llvm":
        return None
    return BF16LinearEmitter(has_avx512bf16(target))


@register_pass("mixed-precision")
@tvm.transform.module_pass(opt_level=0, name="edgediff.MixedPrecision")
class MixedPrecision:
    """Per-layer precision from a measured plan: int8/int4/fp16 weights, int8 activations where chosen.

    Runs only when ``compile_model`` is given a ``precision`` (the plan comes from measuring the float
    model, see ``edgediff.precision``); its report carries the plan: every layer's sensitivity per
    candidate format, the chosen format and its bytes.
    """

    def __init__(
        self, spec: TargetSpec, plan: PrecisionPlan | None = None, weight_names: Sequence[str] | None = None
    ) -> None:
        self.spec = spec
        self.plan = plan
        self.weight_names = list(weight_names or [])
        self.report = MixedPrecisionReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.plan is None:
            raise PassError(
                "the mixed-precision pass needs a precision plan: compile with precision='auto' (or a format)"
            )
        rewriter = _Rewriter(
            mod["main"], self.plan, self.weight_names, _int8_emitter(self.spec), _bf16_emitter(self.spec)
        )
        before = relax_op_histogram(mod)
        mod = rewriter.rewrite(mod)
        after = relax_op_histogram(mod)
        totals = self.plan.totals
        self.report = MixedPrecisionReport(
            summary=f"{self.plan.summary()}; weights {format_bytes(totals.get('float_bytes', 0))} -> "
            f"{format_bytes(totals.get('bytes', 0))}",
            rewritten=dict(sorted(rewriter.counts.items())),
            casts_added=after.get("relax.astype", 0) - before.get("relax.astype", 0),
            plan=self.plan,
        )
        return mod
