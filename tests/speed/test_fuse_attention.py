"""fuse-attention (edgediff/passes/fuse_attention.py) and its kernel (kernels/attention.py): same
numbers as torch with the pass on and off, no N x M score tensor left in main, a per-site report, tiles from
the target spec, and builds for arm-a78. Speed is measured by benchmarks/attention.py, not here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from edgediff.targets import CostModel, load_target
from tests.conftest import pinned_host

TOLERANCE = 1e-4


class SDAttention(torch.nn.Module):
    """diffusers-style attention: heads split by reshape/transpose, SDPA, heads merged again."""

    def __init__(self, dim: int = 16, context_dim: int | None = None, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = torch.nn.Linear(dim, dim, bias=False)
        self.to_k = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = torch.nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = torch.nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q, k, v = self._split(self.to_q(x)), self._split(self.to_k(ctx)), self._split(self.to_v(ctx))
        h = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        b, _, n, _ = h.shape
        return self.to_out(h.transpose(1, 2).reshape(b, n, -1))


class MHA(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(24, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


def _report(artifact: edgediff.Artifact) -> dict:
    return next(p for p in artifact.manifest["passes"] if p["name"] == "fuse-attention")["report"]


def _close(got: np.ndarray, expected: np.ndarray) -> float:
    err = float(np.abs(got - expected).max())
    assert err <= TOLERANCE * max(1.0, float(np.abs(expected).max())), err
    return err


def _compare_on_off(model: torch.nn.Module, inputs: tuple, tmp_path) -> dict:
    with torch.no_grad():
        expected = model(*inputs).numpy()
    fused = edgediff.compile_model(model, inputs, output_dir=tmp_path / "on", progress=False)
    plain = edgediff.compile_model(
        model, inputs, output_dir=tmp_path / "off", passes={"fuse-attention": False}, progress=False
    )
    _close(edgediff.load(fused.path)(*inputs), expected)
    _close(edgediff.load(plain.path)(*inputs), expected)
    assert not any(p["name"] == "fuse-attention" for p in plain.manifest["passes"])
    return _report(fused)


@pytest.mark.parametrize(
    ("n", "m", "context"),
    [(64, 64, None), (64, 7, 12)],  # self attention; cross attention with 7 context tokens (N != M)
    ids=["self", "cross"],
)
def test_sd_attention_matches_torch(n, m, context, tmp_path):
    torch.manual_seed(0)
    model = SDAttention(context_dim=context).eval()
    inputs = (torch.randn(1, n, 16),) + ((torch.randn(1, m, context),) if context else ())
    report = _compare_on_off(model, inputs, tmp_path)
    (site,) = report["sites"]
    assert (site["batch_heads"], site["n"], site["m"], site["head_dim"]) == (2, n, m, 8)
    assert site["safe_softmax"] and site["score_bytes"] == 2 * n * m * 4
    assert not site["scores_still_materialised"]
    assert report["score_bytes_avoided"] == site["score_bytes"]


def test_multihead_attention_matches_torch(tmp_path):
    torch.manual_seed(0)
    report = _compare_on_off(MHA().eval(), (torch.randn(1, 25, 24),), tmp_path)
    assert [(s["n"], s["m"], s["head_dim"]) for s in report["sites"]] == [(25, 25, 12)]


class MHAWithWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention = torch.nn.MultiheadAttention(24, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, weights = self.attention(x, x, x, need_weights=True)
        return torch.cat([out.flatten(1), weights.flatten(1)], dim=1)


def test_scores_used_elsewhere_are_reported_as_still_materialised(tmp_path):
    """need_weights=True keeps the probabilities as an output: fused, correct, but nothing avoided."""
    torch.manual_seed(0)
    report = _compare_on_off(MHAWithWeights().eval(), (torch.randn(1, 25, 24),), tmp_path)
    (site,) = report["sites"]
    assert site["scores_still_materialised"] and report["score_bytes_avoided"] == 0


def test_fully_masked_rows_give_zeros_like_safe_softmax():
    """A row whose scores are all -inf must give 0 (PyTorch's safe softmax), not NaN; others stay exact."""
    import tvm

    from edgediff.kernels.attention import fused_attention_kernel

    cost = CostModel(load_target("host"))
    bh, n, m, d = 2, 16, 24, 8
    rng = np.random.default_rng(0)
    q = rng.standard_normal((bh, n, d)).astype("float32")
    k = rng.standard_normal((bh, m, d)).astype("float32")
    v = rng.standard_normal((bh, m, d)).astype("float32")
    # head 1: every score is -inf * 1 + 0 = -inf, as an additive -inf mask over a whole row would make it
    q[1], k[1] = 0.0, 0.0
    q[1, :, 0], k[1, :, 0] = -np.inf, 1.0
    scale = 0.5
    func = fused_attention_kernel(cost, batch=bh, n=n, m=m, d=d, dtype="float32", scale=scale)
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target="llvm")
    args = [tvm.runtime.tensor(x) for x in (q, k, v, np.zeros((bh, n, d), "float32"))]
    lib(*args)
    got = args[3].numpy()
    assert np.all(got[1] == 0.0)
    s = scale * q[0] @ k[0].T
    p = np.exp(s - s.max(-1, keepdims=True))
    _close(got[0], (p / p.sum(-1, keepdims=True)) @ v[0])


def test_fused_module_has_no_score_matrix():
    """After the pass, main has no tensor of shape [..., N, M] (for N, M of the matched sites)."""
    import tvm
    from tvm import relax

    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    torch.manual_seed(0)
    imported = import_to_relax(capture(SDAttention().eval(), (torch.randn(1, 64, 16),)))
    spec = load_target("host")

    def score_shaped(mod: tvm.IRModule) -> list:
        found = []

        def visit(expr) -> None:
            if isinstance(expr, relax.Var):
                shape = getattr(expr.ty, "shape", None)
                if shape is not None and hasattr(shape, "values") and len(shape.values) >= 2:
                    dims = [int(x) for x in shape.values]
                    if dims[-2:] == [64, 64]:
                        found.append(dims)

        relax.analysis.post_order_visit(mod["main"], visit)
        return found

    before, _ = run_passes(imported.mod, spec, ["decompose-for-inference"])
    assert score_shaped(before)
    after, results = run_passes(imported.mod, spec, ["decompose-for-inference", "fuse-attention"])
    assert not score_shaped(after)
    report = results[-1].report
    assert len(report.sites) == 1 and "no longer materialised" in report.summary


def test_tiny_unet_matches_torch_with_and_without_fusion(compiled, zoo_model, tmp_path):
    zm = zoo_model("tiny-sd15-unet")
    fused = compiled("tiny-sd15-unet", "host")
    plain = edgediff.compile_model(
        "tiny-sd15-unet", output_dir=tmp_path / "off", passes={"fuse-attention": False}, progress=False
    )
    with torch.no_grad():
        expected = zm.module(*zm.example_inputs).numpy()
    got = edgediff.load(fused.path)(*zm.example_inputs)
    _close(got, expected)
    _close(edgediff.load(plain.path)(*zm.example_inputs), expected)
    report = _report(fused)
    # every transformer block has a self and a cross attention; all of them are fused
    assert len(report["sites"]) >= 2 and any(s["m"] != s["n"] for s in report["sites"])
    schedule = next(p for p in fused.manifest["passes"] if p["name"] == "schedule")["report"]
    assert schedule["kernels_by_rule"].get("(already scheduled)", 0) >= 1


def test_tiles_follow_the_target_spec():
    from edgediff.kernels.attention import choose_attention_tiles

    # the host spec at fixed widths (tests.conftest.pinned_host), not whatever CPU runs the test
    avx512, a78 = CostModel(pinned_host(vector_bits=512)), CostModel(load_target("arm-a78"))
    big = choose_attention_tiles(a78, "float32", 4096, 4096, 40)
    assert big.width == 4  # 128-bit NEON, along the queries
    assert 4096 % big.block_k == 0 and 4096 % big.block_q == 0
    assert big.block_k % big.key_rows == 0 and 40 % big.dim_rows == 0
    assert big.block_q % (big.width * big.query_vectors) == 0
    # a K block and a V block fit in L1, and the register tiles in the accumulator registers
    assert 2 * 40 * 4 * big.block_k <= a78.spec.memory.l1_bytes
    assert big.key_rows * big.query_vectors <= a78.accumulator_vectors()
    assert big.dim_rows * big.query_vectors <= a78.accumulator_vectors()
    assert choose_attention_tiles(avx512, "float32", 4096, 4096, 40).width == 16
    avx2 = CostModel(pinned_host(vector_bits=256))
    assert choose_attention_tiles(avx2, "float32", 4096, 4096, 40).width == 8
    # SD's 77 text tokens with head dim 160 on AVX-512 (16 accumulators): blocks of 7 keys (a 7-row
    # tile), not 11 (a 1-row tile)
    text = choose_attention_tiles(avx512, "float32", 4096, 77, 160)
    assert text.block_k == 7 and text.key_rows == 7
    odd = choose_attention_tiles(a78, "float32", 25, 7, 12)  # 25 queries: no vector divides them
    assert odd.width == 1 and 25 % odd.block_q == 0 and odd.block_k == 7


@pytest.mark.slow
def test_arm_a78_build_fuses_attention(compiled):
    from tests.conftest import AARCH64, elf_machine

    artifact = compiled("tiny-sd15-unet", "arm-a78")
    assert _report(artifact)["sites"]
    assert artifact.manifest["library"]["format"] == "shared"
    assert elf_machine(artifact.path / "model.so") == AARCH64


def test_gpu_targets_skip_the_pass():
    from edgediff.passes.pipeline import default_pipeline

    assert "fuse-attention" in default_pipeline(load_target("host"))
    assert "fuse-attention" not in default_pipeline(load_target("adreno-740"))


def test_float16_inputs_accumulate_in_float32():
    import tvm

    from edgediff.kernels.attention import fused_attention_kernel

    cost = CostModel(load_target("host"))
    bh, n, m, d = 2, 32, 40, 16
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal(s).astype("float16") for s in ((bh, n, d), (bh, m, d), (bh, m, d)))
    func = fused_attention_kernel(cost, batch=bh, n=n, m=m, d=d, dtype="float16", scale=0.25)
    lib = tvm.tirx.build(func.with_attr("global_symbol", "main"), target="llvm")
    args = [tvm.runtime.tensor(x) for x in (q, k, v, np.zeros((bh, n, d), "float16"))]
    lib(*args)
    s = 0.25 * q.astype("float64") @ k.astype("float64").transpose(0, 2, 1)
    p = np.exp(s - s.max(-1, keepdims=True))
    expected = (p / p.sum(-1, keepdims=True)) @ v.astype("float64")
    # float16 output rounding only (float32 sums): well inside float16's 1e-3
    assert np.abs(args[3].numpy().astype("float64") - expected).max() < 2e-3
