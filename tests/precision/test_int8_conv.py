"""w8a8 conv2d on the int8 GEMM kernel: quantize + im2col (edgediff/kernels/int8_conv2d.py), then the GEMM.

The kernels are checked on this host with the portable instruction step and both activation encodings
(int8, and vpdpbusd's uint8 + 128 with its compensation), so the patch layout, padding, stride, dilation,
k padding and weight packing shared by every instruction are checked whatever this CPU has; the host's own
step runs in the compiled model test. The arm-a78 build (sdot) is tests/cross/test_int8_arm.py.
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
import tvm

from edgediff.kernels.int8_conv2d import (
    IM2COL_NAME,
    ConvShape,
    build_int8_conv2d,
    pack_conv_weight,
    quantize_im2col_reference,
)
from edgediff.kernels.int8_matmul import KERNEL_NAME, DotInstruction
from edgediff.runtime.quantize import INT8_MAX, INT8_MIN
from tests.precision.helpers import (
    GENERIC,
    assert_packed_for_the_kernel,
    compile_at,
    host_instruction,
    plan_of,
    portable,
    rewrite_counts,
)
from tests.precision.ties import assert_matches_measurement

SHAPES = {
    # C * KH * KW = 45: not a multiple of 4 (k padding); same padding
    "3x3-pad1": ConvShape(1, 5, 7, 6, 16, (3, 3), (1, 1), (1, 1, 1, 1)),
    # stride 2, batch 2, C * KH * KW = 72
    "3x3-stride2": ConvShape(2, 8, 9, 8, 8, (3, 3), (2, 2), (1, 1, 1, 1)),
    # 1x1: the direct quantize + transpose path
    "1x1": ConvShape(1, 8, 4, 5, 16, (1, 1)),
    # 1x1 with C = 6 (k padding): the patch path
    "1x1-c6": ConvShape(1, 6, 3, 3, 8, (1, 1)),
    # asymmetric padding and dilation 2 along h
    "3x3-dilated": ConvShape(1, 6, 5, 5, 8, (3, 3), (1, 1), (0, 1, 2, 1), (2, 1)),
}


def _operands(shape: ConvShape, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((shape.batch, shape.channels, shape.height, shape.width)).astype(np.float32)
    x.flat[0] = 1e3  # clipped to 127 (and -128 below): the clip is part of what must match
    x.flat[1] = -1e3
    scale = np.float32(0.02)
    # exact ties of round half to even: x / scale lands on k + 0.5
    x.flat[2] = np.float32(2.5) * scale
    x.flat[3] = np.float32(-3.5) * scale
    w = rng.integers(-128, 128, (shape.out_channels, shape.channels, *shape.kernel)).astype(np.int8)
    return x, scale, w


def _quantized(x: np.ndarray, scale: np.float32) -> np.ndarray:
    return np.clip(np.rint(x / scale), INT8_MIN, INT8_MAX)


def _conv_reference(xq: np.ndarray, w: np.ndarray, shape: ConvShape) -> np.ndarray:
    """The conv of the quantized input by an integer weight, exact in float64 (all sums < 2^53)."""
    top, left, bottom, right = shape.padding
    padded = torch.nn.functional.pad(torch.tensor(xq, dtype=torch.float64), (left, right, top, bottom))
    out = torch.nn.functional.conv2d(
        padded, torch.tensor(w, dtype=torch.float64), stride=shape.stride, dilation=shape.dilation
    )
    return out.numpy()


def _run(shape: ConvShape, dot: DotInstruction, epilogue: str, x, scale, w, w_scale=None, bias=None):
    mod, dot, tile = build_int8_conv2d(shape, GENERIC, epilogue=epilogue, dot=dot)
    ex = tvm.compile(mod, GENERIC)
    dev = tvm.cpu()
    patches = tvm.runtime.tensor(np.zeros((shape.rows, shape.depth), dot.activation_dtype), dev)
    ex[IM2COL_NAME](
        tvm.runtime.tensor(x, dev), tvm.runtime.tensor(np.array([scale], np.float32), dev), patches
    )
    packed, compensation = pack_conv_weight(w, shape.depth, tile.panel, dot.compensated)
    columns = shape.out_channels
    if compensation is None:
        compensation = np.zeros(columns, np.int32)
    w_scale = np.ones(columns, np.float32) if w_scale is None else w_scale
    bias = np.zeros(columns, np.float32) if bias is None else bias
    a_scale = np.full(shape.rows, scale, np.float32)
    out = tvm.runtime.tensor(
        np.zeros((shape.rows, columns), np.int32 if epilogue == "int32" else np.float32), dev
    )
    args = [packed, compensation, a_scale, w_scale, bias]
    ex[KERNEL_NAME](patches, *[tvm.runtime.tensor(a, dev) for a in args], out)
    oh, ow = shape.out_size
    nchw = out.numpy().reshape(shape.batch, oh, ow, columns).transpose(0, 3, 1, 2)
    return patches.numpy(), nchw


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
@pytest.mark.parametrize("case", list(SHAPES))
def test_im2col_and_gemm_equal_the_integer_conv(case, activation_dtype):
    """The patch matrix is the numpy quantize + im2col bit for bit (padding = the quantized zero, k padded),
    and the GEMM's int32 output is the exact integer conv of the quantized input."""
    shape = SHAPES[case]
    x, scale, w = _operands(shape)
    patches, got = _run(shape, portable(8, activation_dtype), "int32", x, scale, w)
    np.testing.assert_array_equal(patches, quantize_im2col_reference(x, scale, shape, activation_dtype))
    want = _conv_reference(_quantized(x, scale), w, shape)
    assert got.dtype == np.int32 and np.abs(want).max() > 1000  # a real reduction, not a trivial one
    np.testing.assert_array_equal(got, want)


def test_im2col_reads_float16_input():
    """cast-to-fp16 leaves float16 activations: the kernel widens them to float32 before dividing, as the
    Relax quantizer does."""
    shape = SHAPES["3x3-pad1"]
    x, scale, w = _operands(shape)
    half = x.astype(np.float16)
    mod, dot, _tile = build_int8_conv2d(shape, GENERIC, in_dtype="float16", dot=portable(8, "int8"))
    ex = tvm.compile(mod, GENERIC)
    dev = tvm.cpu()
    patches = tvm.runtime.tensor(np.zeros((shape.rows, shape.depth), "int8"), dev)
    ex[IM2COL_NAME](
        tvm.runtime.tensor(half, dev), tvm.runtime.tensor(np.array([scale], np.float32), dev), patches
    )
    want = quantize_im2col_reference(half.astype(np.float32), scale, shape, "int8")
    np.testing.assert_array_equal(patches.numpy(), want)


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
def test_dequantize_epilogue_is_the_float_conv(activation_dtype):
    """float32 out = integer conv x activation scale x per-channel weight scale + bias (float32 rounding)."""
    shape = SHAPES["3x3-stride2"]
    x, scale, w = _operands(shape, seed=1)
    rng = np.random.default_rng(2)
    w_scale = rng.uniform(0.001, 0.01, shape.out_channels).astype(np.float32)
    bias = rng.standard_normal(shape.out_channels).astype(np.float32)
    _, got = _run(shape, portable(8, activation_dtype), "dequantize", x, scale, w, w_scale, bias)
    exact = _conv_reference(_quantized(x, scale), w, shape)
    want = exact * float(scale) * w_scale[None, :, None, None].astype(np.float64) + bias[None, :, None, None]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


# ---------------------------------------------------------------------------- in a --precision int8 build


def test_int8_build_runs_its_convs_on_the_kernel_and_matches_the_relax_path(fragile, host_int8, tmp_path):
    """The fragile model's four w8a8 convs (3x3, one with 4 output channels: padded to whole vectors) run
    on im2col + the int8 GEMM with their biases in the epilogue; the artifact computes what the torch
    fake-quant measurement says, and what the previous Relax int8 conv2d path computes."""
    instruction = host_instruction(host_int8)
    if instruction == "portable":
        pytest.skip("this CPU has no int8 dot-product step (AVX2, VNNI, dotprod): the Relax path is used")
    artifact = compile_at(*fragile, host_int8, tmp_path / "kernel", "int8")
    rewritten = rewrite_counts(artifact)
    assert rewritten[f"int8 kernel conv2d ({instruction})"] == rewritten["conv2d w8a8"] == 4
    assert rewritten["int8 kernel conv2d bias fused"] == 4
    assert rewritten[f"int8 kernel ({instruction})"] == 5  # the Linear layers, as before
    assert_packed_for_the_kernel(artifact, "conv_out.weight", host_int8)

    with mock.patch("edgediff.passes.mixed_precision.int8_conv2d_fits", return_value=False):
        relax_path = compile_at(*fragile, host_int8, tmp_path / "relax", "int8")
    assert not any(k.startswith("int8 kernel conv2d") for k in rewrite_counts(relax_path))
    assert rewrite_counts(relax_path)["conv2d w8a8"] == 4

    model, inputs, _names = fragile
    plan = plan_of(artifact)
    for t in (900.0, 100.0):  # both timestep buckets of the per-timestep activation scales
        at_t = (inputs[0], torch.tensor([t]))
        got, old = artifact.load()(*at_t), relax_path.load()(*at_t)
        assert_matches_measurement(got, model, at_t, plan, 1e-4)
        # the same integers and scales; only the float32 order of the epilogue differs (and the ties it flips)
        np.testing.assert_allclose(got, old, rtol=0, atol=1e-3 * np.abs(old).max())


class _Block(torch.nn.Module):
    """Convs fed by a reshape (GroupNorm's, and tokens back to NCHW as after attention), a stride-2 3x3
    and a 1x1: the kernel's other shapes, in a graph where FuseOps sees a reshape before the im2col."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.norm = torch.nn.GroupNorm(2, 8)
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.down = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1)
        self.proj = torch.nn.Conv2d(16, 8, 1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.2
        self.eval().requires_grad_(False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        h = self.down(self.conv(self.norm(sample)) * (timestep.float() / 500.0)[:, None, None, None])
        b, c, hh, ww = h.shape
        tokens = h.flatten(2).transpose(1, 2) * 0.5  # [b, hw, c]
        out = self.proj(tokens.transpose(1, 2).reshape(b, c, hh, ww))
        return torch.nn.functional.interpolate(out, scale_factor=2.0, mode="nearest")  # a denoiser's shape


def test_int8_convs_after_reshapes_stride_2_and_1x1(host_int8, tmp_path):
    """A stride-2 3x3 and a 1x1 conv in a model, each fed by a reshape: the build (FuseOps must not fuse the
    reshape into the im2col kernel: FuseTIR rejects it, as the sd15-unet int8 build showed) runs them on
    the kernel and computes what the measurement and the Relax path compute."""
    instruction = host_instruction(host_int8)
    if instruction == "portable":
        pytest.skip("this CPU has no int8 dot-product step (AVX2, VNNI, dotprod): the Relax path is used")
    model = _Block()
    inputs = (torch.randn(1, 8, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0]))
    fragile_like = (model, inputs, ("sample", "timestep"))
    artifact = compile_at(*fragile_like, host_int8, tmp_path / "kernel", "int8")
    assert rewrite_counts(artifact)[f"int8 kernel conv2d ({instruction})"] == 3
    with mock.patch("edgediff.passes.mixed_precision.int8_conv2d_fits", return_value=False):
        relax_path = compile_at(*fragile_like, host_int8, tmp_path / "relax", "int8")
    got, old = artifact.load()(*inputs), relax_path.load()(*inputs)
    assert_matches_measurement(got, model, inputs, plan_of(artifact), 1e-4)
    np.testing.assert_allclose(got, old, rtol=0, atol=1e-3 * np.abs(old).max())
