"""Winograd convolution for 3x3 stride-1 conv2d: F(2x2,3x3), F(4x4,3x3) or F(6x6,3x3), chosen per layer.

Winograd's minimal filtering computes an m x m output tile of a 3x3 convolution from an alpha x alpha input
tile (alpha = m + 2) with alpha^2 multiplications per (input, output) channel pair instead of 9 m^2: 2.25x
fewer for F(2x2,3x3), 4x for F(4x4,3x3), 5.06x for F(6x6,3x3). Per layer that becomes

    U = G g G^T        weight transform, (alpha^2, K, C): depends only on the weight, so the
                       ``lift-weight-transforms`` pass moves it to compile time (alpha^2/9 times the bytes)
    V = B^T d B        input transform, (alpha^2, C, tiles): every overlapping alpha x alpha input tile
    M = U V            alpha^2 independent (K x C) @ (C x tiles) matrix products: a batched ``relax.matmul``
                       that the Matmul schedule rule register-tiles, contiguous along the tile axis
    Y = A^T M A        output transform, scattered back to NCHW and cropped to the conv's output

Larger tiles save more multiplications but their transform matrices hold larger and smaller numbers, so
float rounding grows (F(6x6,3x3) in float16 is far off). Each candidate's error is therefore *measured*
for the layer's own channel count and dtype (a numpy model of exactly these kernels, float32/float16
storage, against a float64 direct convolution on seeded data), variants above the bound are rejected, and
of the rest the target's roofline cost model picks the fastest, a Winograd variant only if estimated at
least ``min_speedup`` (1.5x) faster than the direct conv: small layers do not pay for three kernels and
padded tiles, and a rewritten layer's stored weights grow alpha^2/9 times.

Weight-only int8 layers (``w8``: float data, an int8 weight, the per-channel scale on the conv's output,
which commutes with the transform) are eligible too: their weight stays int8 in weights.bin, and the weight
transform casts it and runs on every call (``lift-weight-transforms`` keeps a widening transform
un-lifted). It is charged to the layer in the cost model (reading the int8 weight, writing U) and adds no
stored bytes, so the weight budget does not limit these layers; the direct w8 conv is charged one byte per
weight. Int4 layers (``w4``) likewise: mixed-precision unpacks their weight with a ``dequantize_int4``
kernel, and where a layer takes Winograd its weight transform reads the packed nibbles and group scales
itself instead (half a byte per weight read, one kernel), the unpack kernel then left unused.

The transform matrices come from the Cook-Toom construction over the interpolation points 0, +-1, +-2,
+-1/2 and infinity (Lavin & Gray 2016; the points ncnn uses for F(6x6,3x3)), computed exactly with
fractions; each row's Lagrange denominator moves from B^T into G so that B^T and A^T hold small numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax

from edgediff.errors import PassError
from edgediff.kernels.dequantize import (
    INT4_DEQUANTIZE,
    int4_weight_loader,
    is_weight_only,
    rounds_data_for_conv,
)
from edgediff.kernels.winograd import (
    KERNEL,
    TILE_SIZES,
    ConvShape,
    direct_conv2d_numpy,
    input_transform_te,
    loaded_weight_transform_te,
    output_transform_te,
    padded_tiles,
    weight_transform_te,
    winograd_conv2d_numpy,
    winograd_matrices,
)
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import static_shape
from edgediff.passes.report import PassReport
from edgediff.precision.assignment import format_bytes
from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

DEFAULT_ERROR_BOUND = 1e-3
# What one more kernel costs beyond its roofline time: the VM call and the thread pool's fork/join (about
# 10-30 us per kernel measured on 2-core x86 with benchmarks/winograd.py at 32 channels, 16x16). It keeps
# small layers, where three kernels cannot win back their launches, on the direct schedule.
LAUNCH_SECONDS = 1e-5
# The estimated speedup a variant needs over the direct conv. The roofline is optimistic for Winograd: the
# measured speedups (benchmarks/winograd.py, 64-640 channels, 2-core x86) are 0.65-1.0 of the estimate,
# so below 1.5x estimated the gain is not reliably there, while the stored weights still grow alpha^2/9
# times (1.8x to 7.1x).
DEFAULT_MIN_SPEEDUP = 1.5
# How much the stored weights of the whole model may grow through Winograd's transformed weights, as a
# fraction of the model's weight bytes. Memory, not compute, is what a 4-6 GB phone runs out of, and edgediff
# aims to run in no more memory than PyTorch eager holds; within this budget layers are chosen by estimated
# time saved per extra byte (the high-resolution layers, whose weights are small, come first).
DEFAULT_MAX_WEIGHT_GROWTH = 0.05


# --- a layer and its candidates -----------------------------------------------------------------------------


def _weight_bits(shape: ConvShape) -> int:
    """Bits per stored weight element (4 for an int4 weight, whose per-group scales are not counted)."""
    return tvm.runtime.DataType(shape.stored_weight_dtype).bits


def _nonzeros(matrix: np.ndarray) -> int:
    return int(np.count_nonzero(matrix))


def estimate_seconds(cost: CostModel, shape: ConvShape, m: int | None, tile_multiple: int) -> float:
    """Roofline time of the direct conv (``m=None``) or of the three Winograd kernels (weight transform
    lifted to compile time), plus the weight transform itself where it runs on every call (an integer
    weight, ``shape.weight_at_run_time``).

    Each kernel is charged its arithmetic (the transforms only their non-zero coefficients), its DRAM
    traffic, intermediates included (V and M are written by one kernel and read by the next, and U is
    alpha^2/9 times the weight's bytes), and one launch.
    """
    size = DTYPE_BITS[shape.dtype] // 8
    weight_size = _weight_bits(shape) / 8
    out_size = DTYPE_BITS[shape.out_dtype] // 8
    dtype = shape.dtype
    x_elems, y_elems = shape.n * shape.c * shape.h * shape.w, shape.n * shape.k * shape.out_h * shape.out_w
    if m is None:
        flops = 2.0 * y_elems * shape.c * KERNEL * KERNEL
        traffic = size * x_elems + weight_size * shape.k * shape.c * KERNEL * KERNEL + out_size * y_elems
        return cost.estimate_seconds(flops, traffic, dtype) + LAUNCH_SECONDS
    mats = winograd_matrices(m)
    alpha2 = mats.alpha**2
    tiles = padded_tiles(shape, m, tile_multiple)
    v_elems, m_elems = alpha2 * shape.c * tiles, alpha2 * shape.k * tiles
    input_t = cost.estimate_seconds(
        2.0 * _nonzeros(mats.BT) ** 2 * shape.c * tiles, size * (x_elems + v_elems), dtype
    )
    gemm = cost.estimate_seconds(
        2.0 * alpha2 * shape.k * shape.c * tiles,
        size * (v_elems + alpha2 * shape.k * shape.c) + out_size * m_elems,
        dtype,
    )
    output_t = cost.estimate_seconds(
        2.0 * _nonzeros(mats.A) ** 2 * shape.k * tiles, out_size * (m_elems + y_elems), dtype
    )
    total = input_t + gemm + output_t + 3 * LAUNCH_SECONDS
    if shape.weight_at_run_time:
        # U = G g G^T on every call: the integer weight read, U written (and read again by the GEMM,
        # charged there); each U entry sums its non-zero G[xi, a] G[nu, b] taps
        pairs = shape.k * shape.c
        total += LAUNCH_SECONDS + cost.estimate_seconds(
            2.0 * _nonzeros(mats.G) ** 2 * pairs,
            weight_size * KERNEL * KERNEL * pairs + size * alpha2 * pairs,
            dtype,
        )
    return total


@cache
def measure_error(m: int | None, channels: int, dtype: str, out_dtype: str, seed: int = 0) -> float:
    """Relative max error (max |y - y_ref| / max |y_ref|) of a variant for a layer with ``channels`` inputs.

    Data and weights are seeded standard normal / Kaiming-scaled values rounded to ``dtype`` (the layer
    sees them rounded already, so that rounding is not the variant's fault); the reference is the float64
    direct convolution of the same rounded values. ``m=None`` measures the direct schedule (float32
    accumulation, output rounded to ``out_dtype``). The spatial size spans two and a partial tile of the
    largest variant, so padded and cropped tiles are exercised; eight output channels suffice because
    every output is one independent dot product of length 9 * channels.
    """
    rng = np.random.default_rng(seed)
    size = 2 * max(TILE_SIZES) + 1
    x = rng.standard_normal((1, channels, size, size)).astype(dtype)
    w = (rng.standard_normal((8, channels, KERNEL, KERNEL)) / math.sqrt(9 * channels)).astype(dtype)
    pad = (1, 1, 1, 1)
    reference = direct_conv2d_numpy(x, w, pad)
    if m is None:
        got = direct_conv2d_numpy(x.astype(np.float32), w.astype(np.float32), pad)
        got = got.astype(np.float32).astype(out_dtype)
    else:
        got = winograd_conv2d_numpy(x, w, m, pad, dtype, out_dtype)
    return float(np.abs(got.astype(np.float64) - reference).max() / np.abs(reference).max())


# --- the pass -----------------------------------------------------------------------------------------------


@dataclass
class LayerChoice:
    """One eligible conv2d: what was measured and estimated, and what was chosen."""

    name: str
    shape: ConvShape
    seconds: dict[str, float]  # "direct", "F2", ... -> roofline estimate
    errors: dict[str, float]  # relative max error of each variant
    bound: float
    chosen: str
    allowed: list[str] = field(default_factory=list)  # variants within the error bound and min_speedup
    over_budget: bool = False  # the preferred variant did not fit the weight budget

    @property
    def weight_bytes(self) -> int:
        return self.shape.k * self.shape.c * KERNEL * KERNEL * _weight_bits(self.shape) // 8

    def extra_bytes(self, variant: str) -> int:
        """Bytes the stored weight grows by when ``variant`` is chosen (alpha^2/9 - 1 times the weight; none
        for an integer weight, which is stored as it is and transformed on every call)."""
        m = variant_tile(variant)
        if not m or self.shape.weight_at_run_time:
            return 0
        return self.weight_bytes * (m + 2) ** 2 // 9 - self.weight_bytes

    @property
    def estimated_speedup(self) -> float:
        """The chosen variant's estimated speedup over the direct conv (3 decimals)."""
        return round(self.seconds["direct"] / self.seconds[self.chosen], 3)

    @property
    def error(self) -> float:
        """The chosen variant's measured relative max error."""
        return self.errors[self.chosen]

    @property
    def transformed_weight_bytes(self) -> int:
        """The stored weight's bytes with the chosen variant (the direct weight's when direct)."""
        return self.weight_bytes + self.extra_bytes(self.chosen)

    def to_dict(self) -> dict[str, Any]:
        """The layer's record in the manifest (the pass's ``layers``)."""
        return {
            "layer": self.name,
            "shape": self.shape.describe(),
            "out": f"{self.shape.out_h}x{self.shape.out_w}",
            "chosen": self.chosen,
            "estimated_speedup": self.estimated_speedup,
            "error": self.error,
            "errors": {k: float(f"{v:.3g}") for k, v in self.errors.items()},
            "bound": self.bound,
            "over_budget": self.over_budget,
            "weight_bytes": self.weight_bytes,
            "transformed_weight_bytes": self.transformed_weight_bytes,
        }


def variant_tile(name: str) -> int | None:
    """'F4' -> 4, 'direct' -> None."""
    return None if name == "direct" else int(name[1:])


def _variant_name(value: Any) -> str:
    text = str(value).lower()
    if text in ("auto", "direct"):
        return text
    text = text.removeprefix("f")
    if text.isdigit() and int(text) in TILE_SIZES:
        return f"F{text}"
    raise PassError(f"winograd-conv2d: unknown variant {value!r}; expected auto, direct, 2, 4 or 6")


def eligible_conv(call: Any) -> ConvShape | None:
    """The shape of a conv2d the rewrite handles (3x3, stride 1, dilation 1, groups 1, NCHW/OIHW, float
    data, a weight of the data's dtype or a weight-only integer one (``w8``), static shapes), else None."""
    if (
        not isinstance(call, relax.Call)
        or not isinstance(call.op, tvm.ir.Op)
        or call.op.name != "relax.nn.conv2d"
    ):
        return None
    attrs = call.attrs
    if (
        [int(s) for s in attrs.strides] != [1, 1]
        or [int(d) for d in attrs.dilation] != [1, 1]
        or int(attrs.groups) != 1
        or attrs.data_layout != "NCHW"
        or attrs.kernel_layout != "OIHW"
        or attrs.out_layout != "NCHW"
    ):
        return None
    data, weight = static_shape(call.args[0]), static_shape(call.args[1])
    if data is None or weight is None or len(data) != 4 or weight[2:] != (KERNEL, KERNEL):
        return None
    dtype = str(call.args[0].ty.dtype)
    weight_dtype = str(call.args[1].ty.dtype)
    out_dtype = str(call.ty.dtype)
    if dtype not in ("float32", "float16") or out_dtype not in ("float32", "float16"):
        return None
    # a weight-only int8 conv (mixed-precision: float data, int8 weight, per-channel scale on the output,
    # which commutes with the transform): the weight transform casts it, on every call
    if weight_dtype != dtype and not (
        (weight_dtype == "int8" and is_weight_only(weight_dtype, out_dtype))
        or rounds_data_for_conv(weight_dtype, dtype, out_dtype)  # a bf16 layer: the transform widens it
    ):
        return None
    pad = tuple(int(p) for p in attrs.padding)
    pad = pad * 2 if len(pad) == 2 else pad
    return ConvShape(
        data[0],
        data[1],
        data[2],
        data[3],
        weight[0],
        pad,  # type: ignore[arg-type]
        dtype,
        out_dtype,
        weight_dtype if weight_dtype != dtype else "",
    )


@relax.expr_functor.mutator
class _Rewriter(relax.PyExprMutator):
    """Replaces each chosen conv2d call by the weight transform, input transform, batched matmul and output
    transform (emitted in place of the conv's binding)."""

    def __init__(self, mod: tvm.IRModule, decide: Any) -> None:
        super().__init__(mod)
        self.decide = decide
        self.binding = "conv2d"
        self.values: dict[Any, Any] = {}

    def visit_var_binding_(self, binding: Any) -> None:
        self.binding = binding.var.name
        self.values[binding.var] = binding.value
        super().visit_var_binding_(binding)

    def layer_name(self, weight: Any) -> str:
        """The layer's name for the report: its weight parameter's (``p_down_blocks_0_..._conv1_weight`` ->
        ``down_blocks_0_..._conv1``), looking through casts; else the conv's binding."""
        while (
            isinstance(self.values.get(weight), relax.Call) and self.values[weight].op.name == "relax.astype"
        ):
            weight = self.values[weight].args[0]
        if isinstance(weight, relax.Var) and weight not in self.values:
            # (a quantized layer's stored weight is named after the torch parameter: ``conv.weight``)
            return weight.name.removeprefix("p_").removesuffix("_weight").removesuffix(".weight")
        return self.binding

    def int4_source(self, weight: Any) -> tuple[Any, Any] | None:
        """``(packed, scale)`` where ``weight`` is an int4 weight unpacked by mixed-precision's
        ``dequantize_int4`` kernel, else None."""
        value = self.values.get(weight)
        if (
            isinstance(value, relax.Call)
            and value.op.same_as(tvm.ir.Op.get("relax.call_tir"))
            and value.args[0].name_hint.startswith(INT4_DEQUANTIZE)
        ):
            packed, scale = value.args[1].fields
            return packed, scale
        return None

    def visit_call_(self, call: Any) -> Any:
        call = self.visit_expr_post_order(call)
        shape = eligible_conv(call)
        if shape is None:
            return call
        data, weight = call.args
        int4 = self.int4_source(weight)
        if int4 is not None:  # the transform reads the nibbles: stored as int4, transformed on every call
            shape = replace(shape, weight_dtype="int4")
        m = self.decide(self.layer_name(int4[0] if int4 else weight), shape)
        if m is None:
            return call
        bb = self.builder_
        tiles = padded_tiles(shape, m, self.decide.tile_multiple(shape))
        # emit_te passes only tensors and plain values through: the rest is bound here
        # (an integer weight's transform casts it and is kept un-lifted by lift-weight-transforms: it runs
        # on every call, scheduled by the Winograd rule)
        if int4 is None:
            u = bb.emit_te(
                lambda w: weight_transform_te(w, m, shape.dtype), weight, primfunc_name_hint="winograd_weight"
            )
        else:
            dims = static_shape(weight)
            u = bb.emit_te(
                lambda packed, scale: loaded_weight_transform_te(
                    int4_weight_loader(packed, scale, dims), shape.k, shape.c, m, shape.dtype
                ),
                *int4,
                primfunc_name_hint="winograd_weight",
            )
        v = bb.emit_te(
            lambda x: input_transform_te(x, m, shape.pad, tiles, shape.dtype),
            data,
            primfunc_name_hint="winograd_input",
        )
        prod = bb.emit(relax.op.matmul(u, v, out_dtype=shape.out_dtype))
        return bb.emit_te(
            lambda t: output_transform_te(t, m, shape), prod, primfunc_name_hint="winograd_output"
        )


class _Decider:
    """Chooses a variant per layer and records why.

    Called once per eligible conv, in program order, twice: a first walk only measures (``plan`` is None,
    nothing is rewritten), then :meth:`fit_budget` picks the variants under the weight budget for the
    whole model, and the second walk rewrites by that plan."""

    def __init__(
        self,
        spec: TargetSpec,
        variant: str,
        error_bound: float,
        min_speedup: float,
        forced: list[str] | None = None,
    ) -> None:
        self.cost = CostModel(spec)
        self.forced = forced
        self.variant = variant
        self.error_bound = error_bound
        self.min_speedup = min_speedup
        self.layers: list[LayerChoice] = []
        self.plan: list[str] | None = None
        self.calls = 0

    def tile_multiple(self, shape: ConvShape) -> int:
        """Tiles are padded to two vectors of the GEMM's output dtype: whole register tiles along the
        columns."""
        return 2 * self.cost.vector_lanes(shape.out_dtype)

    def __call__(self, name: str, shape: ConvShape) -> int | None:
        if self.plan is not None:
            self.calls += 1
            return variant_tile(self.plan[self.calls - 1])
        self.measure(name, shape)
        return None

    def fit_budget(self, budget_bytes: float) -> None:
        """Choose variants under ``budget_bytes`` of extra weight bytes for the whole model.

        Greedy for the multiple-choice knapsack: every (layer, allowed variant) pair, best estimated
        seconds saved per extra byte first, upgrades its layer when it saves more than the layer's current
        choice and the extra bytes still fit; so F2 (1.8x the bytes) on many layers beats F6 (7.1x) on a
        few when that saves more. Forced variants and a forced plan ignore the budget."""
        if self.forced is not None:
            if len(self.forced) != len(self.layers):
                raise PassError(
                    f"winograd-conv2d: the plan names {len(self.forced)} layers, the model has "
                    f"{len(self.layers)} eligible 3x3 convs"
                )
            for layer, variant in zip(self.layers, self.forced, strict=True):
                layer.chosen = _variant_name(variant)
            self.plan = [layer.chosen for layer in self.layers]
            return
        if self.variant != "auto":
            self.plan = [layer.chosen for layer in self.layers]
            return
        chosen = ["direct"] * len(self.layers)
        spent = 0

        def saved(i: int, variant: str) -> float:
            return self.layers[i].seconds["direct"] - self.layers[i].seconds[variant]

        pairs = [(i, v) for i, layer in enumerate(self.layers) for v in layer.allowed]
        pairs.sort(key=lambda p: -saved(*p) / max(1, self.layers[p[0]].extra_bytes(p[1])))
        for i, variant in pairs:
            layer = self.layers[i]
            extra = layer.extra_bytes(variant) - layer.extra_bytes(chosen[i])
            if saved(i, variant) > saved(i, chosen[i]) and spent + extra <= budget_bytes:
                chosen[i] = variant
                spent += extra
        for layer, variant in zip(self.layers, chosen, strict=True):
            layer.over_budget = variant != layer.chosen
            layer.chosen = variant
        self.plan = chosen

    def measure(self, name: str, shape: ConvShape) -> None:
        multiple = self.tile_multiple(shape)
        seconds = {"direct": estimate_seconds(self.cost, shape, None, multiple)}
        errors = {"direct": measure_error(None, shape.c, shape.dtype, shape.out_dtype)}
        for m in TILE_SIZES:
            seconds[f"F{m}"] = estimate_seconds(self.cost, shape, m, multiple)
            errors[f"F{m}"] = measure_error(m, shape.c, shape.dtype, shape.out_dtype)
        # the direct schedule's own rounding is already accepted (it matters for float16 outputs)
        bound = self.error_bound + errors["direct"]
        if self.variant == "auto":
            allowed = [
                v
                for v in seconds
                if errors[v] <= bound and seconds[v] * self.min_speedup <= seconds["direct"]
            ]
            chosen = min(allowed, key=lambda v: seconds[v], default="direct")
        else:
            allowed = []
            chosen = self.variant
        layer = LayerChoice(name, shape, seconds, errors, bound, chosen)
        layer.allowed = [v for v in allowed if v != "direct"]
        self.layers.append(layer)


def _rewrite(mod: tvm.IRModule, decider: _Decider) -> tvm.IRModule:
    rewriter = _Rewriter(mod, decider)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            rewriter.builder_.update_func(gvar, rewriter.visit_expr(func))
    return rewriter.builder_.get()


def _weight_bytes(mod: tvm.IRModule) -> int:
    """Bytes of ``main``'s weight parameters (those after its ``num_input`` run-time inputs)."""
    main = mod["main"]
    num_input = int(main.attrs["num_input"]) if main.attrs and "num_input" in main.attrs else len(main.params)
    total = 0
    for param in main.params[num_input:]:
        shape = static_shape(param)
        if shape is not None:
            total += int(np.prod(shape, dtype=np.int64)) * tvm.runtime.DataType(str(param.ty.dtype)).bits // 8
    return total


@dataclass
class WinogradConv2dReport(PassReport):
    """Every eligible conv2d's measured errors, estimates and chosen variant (``LayerChoice.to_dict()`` in
    the manifest), in program order."""

    variant: str = "auto"  # "auto", "direct", "F2"... or "plan" (the choice was given)
    error_bound: float = DEFAULT_ERROR_BOUND
    min_speedup: float = DEFAULT_MIN_SPEEDUP
    max_weight_growth: float = DEFAULT_MAX_WEIGHT_GROWTH
    model_weight_bytes: int = 0
    over_budget: int = 0  # layers whose preferred variant did not fit the weight budget
    layers: list[LayerChoice] = field(default_factory=list)
    weight_bytes_before: int = 0  # the rewritten layers' weights, direct
    weight_bytes_after: int = 0  # ... and transformed

    def chosen(self) -> list[str]:
        """The variant chosen per eligible layer, in program order (a plan for other resolutions)."""
        return [layer.chosen for layer in self.layers]


@register_pass("winograd-conv2d")
@tvm.transform.module_pass(opt_level=0, name="edgediff.WinogradConv2d")
class WinogradConv2d:
    """Rewrite 3x3 stride-1 conv2d into Winograd F(2x2/4x4/6x6, 3x3), per layer by measured error and cost.

    A 3x3 convolution does 9 multiply-adds per output and input channel; Winograd does alpha^2 / m^2 of them
    (1.78 for F(6x6,3x3)) in a batched GEMM, plus cheap transforms. The weight transform depends only on
    the weight, so it is computed at compile time once weight transforms are lifted. Options: ``variant``
    (``"auto"``: per layer by the cost model among the variants whose measured error is within
    ``error_bound`` and estimated at least ``min_speedup`` times faster than the direct conv; or
    ``"direct"``, ``2``, ``4``, ``6`` forced on every eligible layer), ``error_bound`` (relative max error,
    default 1e-3), ``min_speedup`` (default 1.5: the weights of a rewritten layer grow alpha^2/9 times) and
    ``max_weight_growth`` (default 0.05: the transformed weights may add at most this fraction of the
    model's weight bytes; within it, layers are taken by estimated time saved per extra byte). ``plan``
    (one variant per eligible layer, in program order) replaces the choice: a multi-resolution build makes
    it once and gives it to every resolution, so that all of them store the same transformed weights.
    """

    def __init__(
        self,
        spec: TargetSpec,
        variant: Any = "auto",
        error_bound: float = DEFAULT_ERROR_BOUND,
        min_speedup: float = DEFAULT_MIN_SPEEDUP,
        max_weight_growth: float = DEFAULT_MAX_WEIGHT_GROWTH,
        plan: list[str] | None = None,
    ) -> None:
        self.spec = spec
        self.plan = list(plan) if plan is not None else None
        self.variant = _variant_name(variant)
        self.error_bound = float(error_bound)
        self.min_speedup = float(min_speedup)
        self.max_weight_growth = float(max_weight_growth)
        self.report = WinogradConv2dReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        decider = _Decider(self.spec, self.variant, self.error_bound, self.min_speedup, self.plan)
        _rewrite(mod, decider)  # measures every eligible layer, rewrites nothing
        model_bytes = _weight_bytes(mod)
        decider.fit_budget(self.max_weight_growth * model_bytes)
        mod = _rewrite(mod, decider)
        if any(layer.chosen != "direct" for layer in decider.layers):
            # the rewritten conv's binding is now an alias of the output transform's var; FuseOps does not
            # look through aliases, so without this the bias/residual epilogue would not fuse
            mod = relax.transform.CanonicalizeBindings()(mod)
            mod = relax.transform.DeadCodeElimination()(mod)
        layers = list(decider.layers)
        rewritten = [layer for layer in layers if layer.chosen != "direct"]
        before = sum(layer.weight_bytes for layer in rewritten)
        after = sum(layer.transformed_weight_bytes for layer in rewritten)
        direct = sum(layer.seconds["direct"] for layer in layers)
        chosen = sum(layer.seconds[layer.chosen] for layer in layers)
        counts = {v: sum(1 for layer in layers if layer.chosen == v) for v in ("F2", "F4", "F6")}
        self.report = WinogradConv2dReport(
            summary=f"{len(rewritten)} of {len(layers)} eligible 3x3 conv2d rewritten to Winograd"
            + (
                f" ({', '.join(f'{n} x {v}' for v, n in counts.items() if n)}; estimated "
                f"{direct / chosen:.2f}x faster over the eligible layers; max error "
                f"{max(layer.error for layer in rewritten):.1e}; transformed weights "
                f"{format_bytes(before)} -> {format_bytes(after)})"
                if rewritten
                else ""
            ),
            variant=self.variant if self.plan is None else "plan",
            error_bound=self.error_bound,
            min_speedup=self.min_speedup,
            max_weight_growth=self.max_weight_growth,
            model_weight_bytes=model_bytes,
            over_budget=sum(1 for layer in layers if layer.over_budget),
            layers=layers,
            weight_bytes_before=before,
            weight_bytes_after=after,
        )
        return mod
