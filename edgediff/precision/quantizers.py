"""Precision formats and the quantizer formulas behind them.

Every integer format is the symmetric, zero-point-free uniform quantizer with round-to-nearest (seed notes
§1, Eq. 4): ``Q(x) = clip(round(x / s), -2^(b-1), 2^(b-1) - 1) * s``. What differs between formats is the
granularity of ``s`` and what is quantized:

- weights: one scale per output channel (int8), or per group of ``group_size`` input elements of an output
  channel (int4), ``s = max|w| / (2^(b-1) - 1)``, so the extreme value of each channel/group is exact;
- activations: one static scale per tensor from calibration (optionally one per timestep range), or a
  dynamic scale per token (per row of a matmul's left operand) computed at run time.

The weight quantizers here are numpy and are the only implementation: the artifact stores their output and
the torch measurement (``sensitivity.py``) runs on their dequantized values. Activation quantization happens
inside the model, so it exists twice by necessity - as torch fake-quant for the measurement
(:func:`fake_quant_static` and friends, below) and as Relax ops in ``passes/mixed_precision.py`` - both
written from the constants below.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from edgediff.runtime.quantize import (
    ALIASES,
    DEFAULT_GROUP_SIZE,
    FORMATS,
    INT4_MAX,
    INT4_MIN,
    INT4_OFFSET,
    INT8_MAX,
    INT8_MIN,
    LAYER_KINDS,
    MAX_SQNR_DB,
    MIN_SCALE,
    UNIFORM_FALLBACK,
    Format,
    compute_dtype,
    dequantize,
    dequantize_int4,
    dequantize_per_channel,
    fake_quant_weight,
    float_format,
    get_format,
    int4_layout,
    quantize_int4,
    quantize_per_channel,
    quantize_weight,
    stored_nbytes,
    stored_shapes,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "ALIASES",
    "compute_dtype",
    "DEFAULT_GROUP_SIZE",
    "dequantize",
    "dequantize_int4",
    "dequantize_per_channel",
    "fake_quant_dynamic",
    "fake_quant_static",
    "fake_quant_weight",
    "float_format",
    "Format",
    "FORMATS",
    "INT4_MAX",
    "INT4_MIN",
    "INT8_MAX",
    "INT8_MIN",
    "get_format",
    "int4_layout",
    "INT4_OFFSET",
    "LAYER_KINDS",
    "MAX_SQNR_DB",
    "MIN_SCALE",
    "quantize_int4",
    "quantize_per_channel",
    "quantize_weight",
    "round_fp16",
    "sqnr_db",
    "stored_nbytes",
    "stored_shapes",
    "UNIFORM_FALLBACK",
]


# -------------------------------------------------------------------------- activations (torch fake-quant)


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Per-tensor int8 with a calibrated scale (a scalar, or one per batch row broadcast over the rest)."""
    return (x / scale).round().clamp(INT8_MIN, INT8_MAX) * scale


def fake_quant_dynamic(x: torch.Tensor, dim: int) -> torch.Tensor:
    """int8 with a dynamic scale per slice: ``max|x|`` along ``dim`` (the reduction axis of the matmul) / 127,
    i.e. one scale per token for a left operand (dim=-1) and per output column for a right one (dim=-2)."""
    scale = (x.abs().amax(dim=dim, keepdim=True) / INT8_MAX).clamp_min(MIN_SCALE)
    return (x / scale).round().clamp(INT8_MIN, INT8_MAX) * scale


def round_fp16(x: torch.Tensor, half: torch.dtype | None = None) -> torch.Tensor:
    """Round to float16 (or ``half``, e.g. bfloat16) and back: the value a 16-bit float input has inside a
    float32-accumulating kernel."""
    return x.to(dtype=half or _torch().float16).to(x.dtype)


def _torch():  # torch is imported lazily: the weight quantizers above are numpy-only
    import torch

    return torch


def sqnr_db(relative_mse: float) -> float:
    """Signal-to-quantization-noise ratio, in dB, of an error with relative MSE ``relative_mse``."""
    return MAX_SQNR_DB if relative_mse <= 0 else min(MAX_SQNR_DB, -10.0 * math.log10(relative_mse))
