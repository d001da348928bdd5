"""w8a8 attention matmuls (QK^T, PV) on the batched int8 GEMM kernel (edgediff/kernels/int8_attention.py).

The batched kernel is checked exactly against numpy on this host's portable step with both activation
encodings (int8; uint8 offset by 128 with vpdpbusd's per-batch compensation), and on this host's own
instruction where it has one; vpdpbusd and sdot builds by their assembly. The emitter's Relax quantize +
pack + compensation ops run with a 16-lane compensated instruction description on the portable step, so the
arithmetic a VNNI build does around the kernel runs on any machine. A tiny model's int8 build runs its
attention matmuls on the kernel and computes what the torch fake-quant measurement says.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import tvm
from tvm import relax

from edgediff.kernels.int8_attention import ATTENTION_KERNEL, Int8AttentionEmitter, int8_attention_fits
from edgediff.kernels.int8_matmul import (
    KERNEL_NAME,
    build_int8_matmul,
    choose_int8_tile,
    dot_instruction,
    int8_matmul_func,
    pack_int8_weight,
)
from edgediff.passes.mixed_precision import _Rewriter
from edgediff.runtime.quantize import MIN_SCALE
from tests.precision.helpers import (
    A78,
    ARMV8,
    GENERIC,
    INT8_A8,
    ZNVER3,
    ZNVER4,
    compile_at,
    host_dot,
    host_instruction,
    host_target,
    plan_of,
    portable,
    rewrite_counts,
    run_int8_matmul,
    with_target,
)
from tests.precision.ties import assert_matches_measurement

# ------------------------------------------------------------------------------------ the batched kernel


def _batched_operands(batch: int, rows: int, depth: int, columns: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.integers(-128, 128, (batch, rows, depth)).astype(np.int8)
    q[1, 0, :4] = -128  # the extremes, so that an overflow or a saturating step would show
    w = rng.integers(-128, 128, (batch, depth, columns)).astype(np.int8)
    w[1, :4, 0] = -128
    a_scale = rng.uniform(0.01, 0.1, (batch, rows)).astype(np.float32)
    w_scale = rng.uniform(0.01, 0.1, (batch, columns)).astype(np.float32)
    return q, w, a_scale, w_scale


def _exact(q, w):
    return np.einsum("bmk,bkn->bmn", q.astype(np.int64), w.astype(np.int64))


@pytest.mark.parametrize("activation_dtype", ["int8", "uint8"])
def test_batched_portable_kernel_is_exact(activation_dtype):
    """Each batch's int32 product equals numpy's, with each batch's own packed operand and (uint8, the
    vpdpbusd encoding) its own compensation: no batch reads another's rows, panels or column sums."""
    batch, rows, depth, columns = 3, 12, 20, 16
    dot = portable(8, activation_dtype)
    tile = choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(rows, depth, columns, dot, tile, batch=batch)
    ex = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), GENERIC)
    q, w, a_scale, w_scale = _batched_operands(batch, rows, depth, columns)
    got = run_int8_matmul(ex, dot, tile, q, w, a_scale, w_scale, None, "int32")
    np.testing.assert_array_equal(got, _exact(q, w))


def test_batched_dequantize_epilogue_uses_each_batchs_scales():
    batch, rows, depth, columns = 2, 8, 16, 24
    dot = portable(8, "uint8")
    tile = choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(
        rows, depth, columns, dot, tile, epilogue="dequantize", batch=batch, parallel=False
    )
    ex = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), GENERIC)
    q, w, a_scale, w_scale = _batched_operands(batch, rows, depth, columns, seed=1)
    got = run_int8_matmul(ex, dot, tile, q, w, a_scale, w_scale, None, "dequantize")
    # float32 in the kernel's order: (acc * a_scale) * w_scale
    want = _exact(q, w).astype(np.float32) * a_scale[:, :, None] * w_scale[:, None, :]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_batched_kernel_on_this_hosts_instruction():
    """The batched build for this CPU's own step (AVX2 vpmaddwd, VNNI vpdpbusd, Arm sdot), run exactly."""
    dot = host_dot()
    if dot.name == "portable":
        pytest.skip("this CPU has no int8 dot-product step; the portable step is checked above")
    batch, rows, depth, columns = 2, 8, 24, 4 * dot.lanes
    tile = choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(rows, depth, columns, dot, tile, batch=batch)
    ex = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), host_target())
    q, w, a_scale, w_scale = _batched_operands(batch, rows, depth, columns, seed=2)
    np.testing.assert_array_equal(
        run_int8_matmul(ex, dot, tile, q, w, a_scale, w_scale, None, "int32"), _exact(q, w)
    )


@pytest.mark.parametrize(
    ("target", "pattern"),
    [
        (ZNVER4, r"vpdpbusd\s+%zmm\d+, %zmm\d+, %zmm\d+"),
        (A78, r"sdot\s+v\d+\.4s, v\d+\.16b, v\d+\.16b"),
        (ZNVER3, r"vpmaddwd\s+%ymm"),
    ],
)
def test_batched_builds_use_the_instruction(target, pattern):
    dot = dot_instruction(target)
    rows, depth, columns = 16, 64, 4 * dot.lanes
    tile = choose_int8_tile(dot, rows, columns)
    func = int8_matmul_func(rows, depth, columns, dot, tile, epilogue="dequantize", batch=4)
    asm = tvm.compile(tvm.IRModule({KERNEL_NAME: func}), tvm.target.Target(target)).mod.inspect_source("asm")
    assert len(re.findall(pattern, asm)) >= tile.rows * tile.col_vectors
    assert "vpmulld" not in asm


def test_batch_none_is_the_unbatched_kernel():
    """The default keeps the 2-D signature the Linear path passes; batch adds a leading dimension."""
    dot = portable(8, "int8")
    plain, _, _ = build_int8_matmul(8, 16, 16, GENERIC)
    batched = int8_matmul_func(8, 16, 16, dot, batch=5)
    text = plain[KERNEL_NAME].script()
    assert 'a: T.Buffer((8, 16), "int8")' in text and 'out: T.Buffer((8, 16), "int32")' in text
    text = batched.script()
    assert 'a: T.Buffer((5, 8, 16), "int8")' in text and 'w: T.Buffer((5, 1, 4, 16, 4), "int8")' in text
    assert 'compensation: T.Buffer((5, 16), "int32")' in text and 'bias: T.Buffer((16,), "float32")' in text
    assert 'out: T.Buffer((5, 8, 16), "int32")' in text


def test_packing_and_compensation_arithmetic():
    """The emitter packs by reshape [B, K/4, 4, N/P, P] + transpose (0, 3, 1, 4, 2) and sums the packed
    operand over (K/4, 4) for the compensation: the same as pack_int8_weight per batch (numpy)."""
    rng = np.random.default_rng(5)
    batch, depth, columns, panel = 3, 8, 32, 16
    w = rng.integers(-128, 128, (batch, depth, columns)).astype(np.int8)
    packed = w.reshape(batch, depth // 4, 4, columns // panel, panel).transpose(0, 3, 1, 4, 2)
    compensation = 128 * packed.astype(np.int32).sum(axis=(2, 4)).reshape(batch, columns)
    for b in range(batch):
        want, want_comp = pack_int8_weight(w[b], panel, compensated=True)
        np.testing.assert_array_equal(packed[b], want)
        np.testing.assert_array_equal(compensation[b], want_comp)


# ------------------------------------------------------------------------------------ the Relax emitter


def _module(shape_a, shape_b, emit) -> tvm.IRModule:
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType(shape_a, "float32"))
    b = relax.Var("b", relax.TensorType(shape_b, "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, a, b))
        bb.emit_func_output(out)
    return bb.get()


def _previous_relax_path(bb, a, b):
    """What _Rewriter._attention emitted before the kernel (and still emits where it does not apply)."""
    a_scale = _Rewriter._dynamic_scale(bb, a, -1)
    b_scale = _Rewriter._dynamic_scale(bb, b, -2)
    product = bb.emit(
        relax.op.matmul(
            bb.emit(_Rewriter._quantize(a, a_scale)), bb.emit(_Rewriter._quantize(b, b_scale)), "int32"
        )
    )
    return relax.op.multiply(relax.op.multiply(relax.op.astype(product, "float32"), a_scale), b_scale)


def _run(mod, target, *arrays):
    ex = relax.VirtualMachine(tvm.compile(mod, tvm.target.Target(target)), tvm.cpu())
    return ex["main"](*[tvm.runtime.tensor(x) for x in arrays]).numpy()


def _numpy_int8_attention(a, b):
    """Exact integer reference: per-row / per-column scales and round-half-even quantization in float32,
    the int64 product, then (product * a_scale) * b_scale in float32."""
    a_scale = np.maximum(np.abs(a).max(-1, keepdims=True) / np.float32(127), np.float32(MIN_SCALE))
    b_scale = np.maximum(np.abs(b).max(-2, keepdims=True) / np.float32(127), np.float32(MIN_SCALE))
    qa = np.clip(np.rint(a / a_scale), -128, 127).astype(np.int64)
    qb = np.clip(np.rint(b / b_scale), -128, 127).astype(np.int64)
    return (qa @ qb).astype(np.float32) * a_scale * b_scale


@pytest.mark.parametrize(
    "dot",
    [portable(8, "int8"), portable(16, "uint8"), "host"],
    ids=["int8-8-lanes", "uint8-compensated-16-lanes", "host-instruction"],
)
def test_emitted_attention_matmul_equals_the_previous_relax_path(dot):
    """Quantize + pack + compensation + kernel, K = 10 and N = 20 padded (to 12, and to the lanes), 4-D
    operands: the output equals the Relax int8 path's up to float32 rounding, and the exact numpy
    reference."""
    target = GENERIC
    if dot == "host":
        dot = host_dot()
        if dot.name == "portable":
            pytest.skip("this CPU has no int8 dot-product step; the portable step runs in the other cases")
        target = host_target()
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((2, 3, 12, 10)) * rng.uniform(0.1, 4, (2, 3, 12, 1))).astype(np.float32)
    b = (rng.standard_normal((2, 3, 10, 20)) * rng.uniform(0.1, 4, (2, 3, 1, 20))).astype(np.float32)
    b[0, 1, :, 3] = 0.0  # an all-zero column: scale MIN_SCALE
    emitter = Int8AttentionEmitter(dot)
    got = _run(_module(a.shape, b.shape, lambda bb, x, y: emitter.matmul(bb, x, y, "float32")), target, a, b)
    previous = _run(_module(a.shape, b.shape, _previous_relax_path), GENERIC, a, b)
    assert got.shape == (2, 3, 12, 20)
    np.testing.assert_allclose(got, previous, rtol=1e-6, atol=1e-6 * np.abs(previous).max())
    np.testing.assert_allclose(
        got, _numpy_int8_attention(a, b), rtol=1e-6, atol=1e-6 * np.abs(previous).max()
    )
    (key,) = emitter.kernels
    assert key == (6, 12, 12, -(-20 // dot.lanes) * dot.lanes)  # (B, M, K padded, N padded)


def test_what_the_kernel_does_not_take():
    dot = portable(8, "int8")
    assert int8_attention_fits(dot, (2, 64, 40), (2, 40, 77))  # N padded to 80
    assert int8_attention_fits(dot, (1, 8, 64, 40), (1, 8, 40, 64))
    assert not int8_attention_fits(dot, (2, 64, 40), (1, 40, 64))  # broadcast batch
    assert not int8_attention_fits(dot, None, (2, 40, 64))  # dynamic shape
    assert not int8_attention_fits(None, (2, 64, 40), (2, 40, 64))  # no kernel for the target


# ------------------------------------------------------------------------------------ in a model


@pytest.fixture(scope="module")
def int8_fragile(fragile, host_int8, tmp_path_factory):
    model, inputs, names = fragile
    return compile_at(model, inputs, names, host_int8, tmp_path_factory.mktemp("attn") / "int8", INT8_A8)


def _attention_counts(rewritten: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in rewritten.items() if k.startswith("attention")}


def test_int8_build_runs_its_attention_matmuls_on_the_kernel(fragile, int8_fragile, host_int8):
    """The fragile model's int8 build (2 heads, 64 queries, head dim 8): QK^T and PV on the kernel, and the
    artifact computes what the torch fake-quant measurement of its plan says."""
    model, inputs, _ = fragile
    rewritten = rewrite_counts(int8_fragile)
    instruction = host_instruction(host_int8)
    if instruction != "portable":
        assert rewritten[f"attention matmul int8 kernel ({instruction})"] == 2
    assert_matches_measurement(int8_fragile.load()(*inputs), model, inputs, plan_of(int8_fragile), 1e-4)


@pytest.mark.parametrize(
    ("target", "kernel_sites"), [(ZNVER4, 2), (A78, 2), (ARMV8, 0)], ids=["vpdpbusd", "sdot", "no-dotprod"]
)
def test_attention_rewrite_per_target(fragile, int8_fragile, host_int8, target, kernel_sites):
    """vpdpbusd (16 lanes: PV's 8 columns padded to 16) and sdot take both matmuls, with uint8 activations
    and a run-time compensation for vpdpbusd; without dotprod the Relax int8 matmul stays."""
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    model, inputs, names = fragile
    imported = import_to_relax(capture(model, inputs, input_names=names))
    options = {"mixed-precision": {"plan": plan_of(int8_fragile), "weight_names": imported.weight_names}}
    mod, results = run_passes(
        imported.mod, with_target(host_int8, target), ["mixed-precision"], options=options
    )
    rewritten = next(r.report for r in results if r.name == "mixed-precision").rewritten
    dot = dot_instruction(target)
    counts = _attention_counts(rewritten)
    assert sum(v for k, v in counts.items() if "int8 kernel" in k) == kernel_sites
    calls = []
    relax.analysis.post_order_visit(
        mod["main"],
        lambda e: (
            calls.append(e)
            if isinstance(e, relax.Call)
            and getattr(e.op, "name", "") == "relax.call_tir"
            and e.args[0].name_hint.startswith(ATTENTION_KERNEL)
            else None
        ),
    )
    assert len(calls) == kernel_sites
    for call in calls:
        a, packed, compensation = call.args[1].fields[:3]
        assert str(a.ty.dtype) == dot.activation_dtype and len(packed.ty.shape) == 5
        assert isinstance(compensation, tvm.ir.expr.Constant) != dot.compensated  # computed only for vpdpbusd
    if not kernel_sites:
        assert not any("int8 kernel" in k for k in counts) and rewritten["attention matmul a8"] == 2


# ------------------------------------------------------------------------------------ GEGLU


class _Block(torch.nn.Module):
    """A diffusers transformer block (self- and cross-attention, GEGLU feed-forward) at toy width."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.models.attention import BasicTransformerBlock

        torch.manual_seed(0)
        self.block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=8, activation_fn="geglu")
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.block(x, encoder_hidden_states=context)


def test_geglu_projection_runs_on_the_int8_kernel_and_the_gating_fuses(host_int8, tmp_path):
    """The GEGLU projection (16 -> 2 x 64, with bias) is a w8a8 Linear on the int8 kernel like the block's
    other 9 Linears; its output goes to one fused elementwise kernel: split, gelu(gate) * hidden, and the
    int8 quantization of the next Linear's input. The 4 attention matmuls run on the batched kernel (the
    cross-attention QK^T has 4 keys: padded to the lanes). The artifact computes what was measured."""
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    model = _Block()
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 16, 16, generator=gen), torch.randn(1, 4, 8, generator=gen))
    names = ("x", "context")
    artifact = compile_at(model, inputs, names, host_int8, tmp_path / "a", INT8_A8)
    plan = plan_of(artifact)
    rewritten = rewrite_counts(artifact)
    assert rewritten["linear w8a8"] == 10 and rewritten["attention matmul a8"] == 4
    instruction = host_instruction(host_int8)
    if instruction != "portable":
        assert rewritten[f"int8 kernel ({instruction})"] == 10
        assert rewritten[f"attention matmul int8 kernel ({instruction})"] == 4
    assert_matches_measurement(artifact.load()(*inputs), model, inputs, plan, 1e-4)

    if instruction == "portable":
        return
    imported = import_to_relax(capture(model, inputs, input_names=names))
    options = {"mixed-precision": {"plan": plan, "weight_names": imported.weight_names}}
    mod, _ = run_passes(imported.mod, host_int8, ["mixed-precision", "legalize", "fuse-ops"], options=options)
    bindings = {b.var: b.value for block in mod["main"].body.blocks for b in block.bindings}

    def callee(value) -> str:
        return value.args[0].name_hint if getattr(value.op, "name", "") == "relax.call_tir" else ""

    (projection,) = [v for v, value in bindings.items() if callee(value) == f"{KERNEL_NAME}_16x16x128"]
    consumers = [
        callee(value)
        for value in bindings.values()
        if any(a.same_as(projection) for a in value.args[1].fields)
    ]
    assert len(consumers) == 1 and all(op in consumers[0] for op in ("split", "gelu", "multiply", "round")), (
        consumers
    )
