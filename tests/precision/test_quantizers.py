"""The quantizer formulas and the byte accounting that budgets rely on."""

from __future__ import annotations

import numpy as np
import pytest

from edgediff.errors import PrecisionError
from edgediff.precision.assignment import parse_bytes
from edgediff.precision.quantizers import (
    FORMATS,
    dequantize_int4,
    fake_quant_weight,
    get_format,
    int4_layout,
    quantize_int4,
    quantize_per_channel,
    quantize_weight,
    stored_nbytes,
)


def test_int8_per_channel_error_is_at_most_half_a_step_and_extremes_are_exact():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * np.arange(1, 9)[:, None, None, None]
    w[5] = 0.0  # an all-zero channel must stay zero, not divide by zero
    q, scale = quantize_per_channel(w)
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (8,)
    back = q.reshape(8, -1) * scale[:, None]
    error = np.abs(back - w.reshape(8, -1))
    assert np.all(error <= scale[:, None] / 2 + 1e-7)
    rows = w.reshape(8, -1)
    peaks = np.abs(rows).argmax(axis=1)
    assert np.allclose(back[np.arange(8), peaks], rows[np.arange(8), peaks], rtol=1e-6)
    assert np.all(back[5] == 0)


@pytest.mark.parametrize("shape", [(6, 36), (4, 3, 3, 3), (5, 64), (3, 7)])
def test_int4_round_trip_pads_groups_and_packs_two_per_byte(shape):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32)
    packed, scale = quantize_int4(w)
    inputs, groups, size = int4_layout(shape)
    assert packed.dtype == np.uint8 and packed.shape == (shape[0], groups * size // 2)
    assert scale.shape == (shape[0], groups, 1) and groups * size >= inputs
    back = dequantize_int4(packed, scale, shape)
    step = np.repeat(scale[:, :, 0], size, axis=1)[:, :inputs].reshape(shape)
    assert np.all(np.abs(back - w) <= step / 2 + 1e-6)
    # element 0 of each row is the low nibble of byte 0
    assert np.array_equal(
        (packed[:, 0] & 15).astype(int) - 8, np.rint(w.reshape(shape[0], -1)[:, 0] / scale[:, 0, 0])
    )


@pytest.mark.parametrize("fmt", [name for name, f in FORMATS.items() if f.weight_bits])
def test_stored_bytes_match_what_is_stored(fmt):
    w = np.random.default_rng(2).standard_normal((10, 4, 3, 3)).astype(np.float32)
    arrays = quantize_weight(w, get_format(fmt))
    assert [a.nbytes for a in arrays] == stored_nbytes(w.shape, get_format(fmt))
    fake = fake_quant_weight(w, get_format(fmt))
    assert fake.shape == w.shape and fake.dtype == np.float32


def test_formats_get_coarser_in_order():
    w = np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)
    errors = [
        float(np.mean((fake_quant_weight(w, get_format(f)) - w) ** 2)) for f in ("fp32", "fp16", "w8", "w4")
    ]
    assert errors[0] == 0.0 and errors[0] < errors[1] < errors[2] < errors[3]


def test_aliases_and_unknown_formats():
    assert get_format("int8").name == "w8a8" and get_format("int4").name == "w4"
    with pytest.raises(PrecisionError, match="unknown precision 'int3'"):
        get_format("int3")


@pytest.mark.parametrize(
    ("text", "value"),
    [("1GB", 10**9), ("1.5GiB", 3 * 2**29), ("800MB", 8 * 10**8), ("12345", 12345), (2e6, 2 * 10**6)],
)
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["1 parsec", "-5MB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(PrecisionError):
        parse_bytes(text)
