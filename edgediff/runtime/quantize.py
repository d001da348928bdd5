"""Weight quantizers and precision formats in numpy: what the compiler stores and the runtime re-quantizes.

Every integer format is the symmetric, zero-point-free uniform quantizer with round-to-nearest (seed notes
§1, Eq. 4): ``Q(x) = clip(round(x / s), -2^(b-1), 2^(b-1) - 1) * s``. Weights get one scale per output
channel (int8), or per group of ``group_size`` input elements of an output channel (int4),
``s = max|w| / (2^(b-1) - 1)``, so the extreme value of each channel/group is exact. These functions are the
only implementation: the compiler stores their output, the torch measurement runs on their dequantized
values, and a LoRA merged at load time (``lora.py``) re-quantizes with them; so they live in the torch-free
runtime and ``precision/quantizers.py`` builds on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgediff.errors import PrecisionError

INT8_MIN, INT8_MAX = -128, 127
INT4_MIN, INT4_MAX = -8, 7
INT4_OFFSET = 8  # int4 values are stored as unsigned nibbles q + 8 (0..15), two per byte, low nibble first
DEFAULT_GROUP_SIZE = 32
# Smallest scale a dynamic quantizer uses: an all-zero row would otherwise divide by zero.
MIN_SCALE = 1e-12

LAYER_KINDS = ("conv2d", "linear", "attention")
MAX_SQNR_DB = 200.0  # what an exact match reports (the log of zero error)


@dataclass(frozen=True)
class Format:
    """One precision a layer can run at.

    ``weight_bits``: storage bits per weight (None: the layer has no weights, i.e. attention matmuls).
    ``activations``: how inputs are quantized to int8 (None: not at all; "static": one calibrated scale
    per tensor; "token": a dynamic scale per token/row). ``compute``: the dtype the layer's arithmetic
    runs in ("float" = the model's float dtype: float32, or float16 on targets without float32).
    ``requires``: target dtypes the format needs. ``accumulate``: the accumulator dtype of a float16
    format's conv/matmul (None: float32). ``storage``: the weight dtype where it is not the IEEE float of
    ``weight_bits`` (bfloat16). ``auto``: whether the planner may pick it by itself (else only as a uniform
    precision or a pin).
    """

    name: str
    summary: str
    kinds: tuple[str, ...]
    requires: tuple[str, ...]
    compute: str
    weight_bits: int | None = None
    activations: str | None = None
    accumulate: str | None = None
    storage: str | None = None
    auto: bool = True

    @property
    def weight_dtype(self) -> str | None:
        if self.storage is not None:
            return self.storage
        return {32: "float32", 16: "float16", 8: "int8", 4: "uint8"}.get(self.weight_bits or 0)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32", "float32 weights and compute", LAYER_KINDS, ("float32",), "float32", 32),
        Format(
            "fp16",
            "float16 weights and inputs, float32 accumulation",
            LAYER_KINDS,
            ("float16",),
            "float16",
            16,
        ),
        # Native half arithmetic (Arm +fullfp16: fmla on .8h vectors, twice the lanes of float32). Not an
        # auto candidate: the sensitivity measurement rounds inputs to float16 but does not model the
        # float16 accumulator's error, so only a uniform precision or a pin selects it.
        Format(
            "fp16-acc16",
            "float16 weights, inputs and accumulation (native fp16 arithmetic, Arm fmla .8h)",
            LAYER_KINDS,
            ("float16",),
            "float16",
            16,
            accumulate="float16",
            auto=False,
        ),
        # AVX512-BF16 (vdpbf16ps: bf16 pairs, float32 accumulation); targets list bfloat16 to offer it.
        Format(
            "bf16",
            "bfloat16 weights and inputs, float32 accumulation (x86 AVX512-BF16 vdpbf16ps)",
            LAYER_KINDS,
            ("bfloat16",),
            "bfloat16",
            16,
            storage="bfloat16",
        ),
        Format("w8", "int8 weights (per-output-channel scales)", ("conv2d", "linear"), ("int8",), "float", 8),
        Format(
            "w8a8",
            "int8 weights (per channel) x int8 activations (static per-tensor scale), int32 accumulation",
            ("conv2d", "linear"),
            ("int8",),
            "int8",
            8,
            "static",
        ),
        Format(
            "w8a8-token",
            "int8 weights (per channel) x int8 activations (dynamic per-token scale), int32 accumulation",
            ("linear",),
            ("int8",),
            "int8",
            8,
            "token",
        ),
        Format(
            "w4",
            f"int4 weights (scales per group of {DEFAULT_GROUP_SIZE} inputs), dequantized before the op",
            ("conv2d", "linear"),
            ("int8",),
            "float",
            4,
        ),
        Format(
            "a8",
            "attention matmuls on int8 operands (dynamic per-row / per-column scales), int32 accumulation",
            ("attention",),
            ("int8",),
            "int8",
            None,
            "token",
        ),
    )
}

# Spellings accepted for a uniform precision (``--precision int8``): int8 is what int8 hardware (dotprod,
# the NPU) computes in, i.e. int8 weights and activations.
ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "int8": "w8a8", "int4": "w4"}
# What a uniform precision gives layer kinds it does not apply to (None: the model's float format).
UNIFORM_FALLBACK = {"w8a8": {"attention": "a8"}, "w8a8-token": {"conv2d": "w8a8", "attention": "a8"}}


def get_format(name: str) -> Format:
    """The format called ``name`` (or one of its aliases)."""
    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise PrecisionError(
            f"unknown precision {name!r}; expected 'auto' or one of {', '.join([*FORMATS, *ALIASES])}"
        )
    return FORMATS[key]


def float_format(dtypes: tuple[str, ...] | list[str]) -> str:
    """The format of unquantized layers on a target: fp32 where it computes float32, else fp16."""
    if "float32" in dtypes:
        return "fp32"
    if "float16" in dtypes:
        return "fp16"
    raise PrecisionError(f"the target computes in neither float32 nor float16 (dtypes: {', '.join(dtypes)})")


def compute_dtype(fmt: Format, dtypes: tuple[str, ...] | list[str]) -> str:
    """The dtype ``fmt``'s arithmetic runs in on a target with ``dtypes``."""
    if fmt.compute != "float":
        return fmt.compute
    return "float32" if float_format(dtypes) == "fp32" else "float16"


# ------------------------------------------------------------------------------------------ weights (numpy)


def _as_rows(weight: np.ndarray) -> np.ndarray:
    """A weight as (output channels, inputs): conv (O, I, kh, kw) and linear (O, I) alike."""
    return np.asarray(weight, dtype=np.float32).reshape(weight.shape[0], -1)


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 weights with one scale per output channel: ``(q int8 of weight's shape, scale float32 (O,))``."""
    rows = _as_rows(weight)
    scale = np.abs(rows).max(axis=1) / INT8_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero channel stays exactly zero
    q = np.clip(np.rint(rows / scale[:, None]), INT8_MIN, INT8_MAX).astype(np.int8)
    return q.reshape(weight.shape), scale


def dequantize_per_channel(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.reshape(q.shape[0], -1).astype(np.float32) * scale[:, None]).reshape(q.shape)


def int4_layout(shape: tuple[int, ...], group_size: int = DEFAULT_GROUP_SIZE) -> tuple[int, int, int]:
    """``(inputs per channel, groups, group size)`` of an int4 weight; inputs are zero-padded to whole
    groups (small layers use one group per channel, rounded up to an even count for nibble packing)."""
    inputs = int(np.prod(shape[1:]))
    size = min(group_size, inputs + inputs % 2)
    return inputs, -(-inputs // size), size


def quantize_int4(weight: np.ndarray, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """int4 weights with one scale per group of inputs of each output channel.

    Returns ``(packed uint8 (O, groups * size / 2), scale float32 (O, groups, 1))``; element ``2i`` of a row
    is the low nibble of byte ``i``. The scale's trailing 1 lets the graph broadcast it without a reshape.
    """
    inputs, groups, size = int4_layout(weight.shape, group_size)
    rows = np.zeros((weight.shape[0], groups * size), np.float32)
    rows[:, :inputs] = _as_rows(weight)
    grouped = rows.reshape(weight.shape[0], groups, size)
    scale = np.abs(grouped).max(axis=2, keepdims=True) / INT4_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(grouped / scale), INT4_MIN, INT4_MAX).astype(np.int16) + INT4_OFFSET
    nibbles = q.reshape(weight.shape[0], -1).astype(np.uint8)
    packed = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return packed.astype(np.uint8), scale


def dequantize_int4(packed: np.ndarray, scale: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    inputs, groups, size = int4_layout(shape, 2 * packed.shape[1] // scale.shape[1])
    nibbles = np.stack([packed & 15, packed >> 4], axis=-1).reshape(shape[0], groups, size)
    values = (nibbles.astype(np.float32) - INT4_OFFSET) * scale
    return values.reshape(shape[0], -1)[:, :inputs].reshape(shape)


def quantize_weight(weight: np.ndarray, fmt: Format) -> list[np.ndarray]:
    """The arrays a weight is stored as in ``fmt`` (see ``passes/mixed_precision.py`` for their use)."""
    weight = np.asarray(weight)
    if fmt.weight_bits == 32:
        return [weight.astype(np.float32)]
    if fmt.weight_bits == 16:
        if fmt.weight_dtype == "bfloat16":
            import ml_dtypes  # TVM's own dependency; numpy has no bfloat16 (round to nearest even)

            return [weight.astype(np.float32).astype(ml_dtypes.bfloat16)]
        return [weight.astype(np.float16)]
    if fmt.weight_bits == 8:
        q, scale = quantize_per_channel(weight)
        # conv outputs are NCHW: a (O, 1, 1) scale broadcasts over H, W; linear outputs end in O
        return [q, scale.reshape((-1,) + (1,) * (weight.ndim - 2))]
    if fmt.weight_bits == 4:
        return list(quantize_int4(weight))
    raise PrecisionError(f"format {fmt.name} has no weights to quantize")


def fake_quant_weight(weight: np.ndarray, fmt: Format) -> np.ndarray:
    """The float32 values the compiled layer effectively multiplies by: dequantize(quantize(weight))."""
    stored = quantize_weight(weight, fmt)
    if fmt.weight_bits in (32, 16):
        return stored[0].astype(np.float32)
    return dequantize(stored[0], stored[1], weight.shape, fmt)


def stored_shapes(shape: tuple[int, ...], fmt: Format) -> list[tuple[int, ...]]:
    """Shapes of the arrays ``quantize_weight`` stores for a weight of ``shape`` (without computing them)."""
    shape = tuple(int(d) for d in shape)
    if fmt.weight_bits in (32, 16):
        return [shape]
    if fmt.weight_bits == 8:
        return [shape, (shape[0],) + (1,) * (len(shape) - 2)]
    if fmt.weight_bits == 4:
        _, groups, size = int4_layout(shape)
        return [(shape[0], groups * size // 2), (shape[0], groups, 1)]
    raise PrecisionError(f"format {fmt.name} has no weights to quantize")


def dequantize(ints: np.ndarray, scale: np.ndarray, shape: tuple[int, ...], fmt: Format) -> np.ndarray:
    """The float32 weight of ``shape`` that the stored ``(ints, scale)`` of ``fmt`` stand for."""
    if fmt.weight_bits == 8:
        return dequantize_per_channel(ints, scale.reshape(-1))
    if fmt.weight_bits == 4:
        return dequantize_int4(ints, scale, shape)
    raise PrecisionError(f"format {fmt.name} stores no integer weights")


def stored_nbytes(shape: tuple[int, ...], fmt: Format) -> list[int]:
    """Bytes of each array ``quantize_weight`` stores for a weight of ``shape`` (without computing it)."""
    count = int(np.prod(shape))
    if fmt.weight_bits in (32, 16):
        return [count * fmt.weight_bits // 8]
    if fmt.weight_bits == 8:
        return [count, shape[0] * 4]
    _, groups, size = int4_layout(shape)
    return [shape[0] * groups * size // 2, shape[0] * groups * 4]
