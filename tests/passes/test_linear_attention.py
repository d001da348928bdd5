"""Linear attention: SANA's native ReLU attention, the opt-in rewrite of softmax attention (each feature
map against the numpy reference, the per-layer selection rule), fine-tuned weights from a local folder."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import edgediff
from edgediff.errors import InputError
from edgediff.linear_attention import (
    FEATURE_MAPS,
    feature_map,
    linear_attention_from_options,
    linear_reference,
    linear_sdpa,
    resolve_linear_attention,
    softmax_reference,
    taylor2_terms,
)
from tests.conftest import AARCH64, elf_machine

HEADS, DIM = 2, 8


class TwoAttentions(torch.nn.Module):
    """Self attention twice on the same tokens, the second with 40x larger scores (peaked softmax), then
    cross attention to a short context."""

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q = x.unflatten(-1, (HEADS, DIM)).transpose(1, 2)
        c = context.unflatten(-1, (HEADS, DIM)).transpose(1, 2)
        gentle = sdpa(0.3 * q, 0.3 * q, q)
        peaked = sdpa(2.0 * q, 2.0 * q, q)
        cross = sdpa(q, c, c)
        return (gentle + peaked + cross).transpose(1, 2).flatten(2)


class OneAttention(torch.nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


def _passes(artifact: edgediff.Artifact) -> dict:
    return {p["name"]: p["report"] for p in artifact.manifest["passes"]}


def test_sana_linear_attention_is_lowered_and_matches_torch(compiled, zoo_model, tmp_path):
    zm = zoo_model("tiny-sana")
    artifact = compiled("tiny-sana", "host")
    report = _passes(artifact)["fuse-linear-attention"]
    # two transformer blocks, one linear self attention each
    assert len(report["sites"]) == 2
    assert all(s["eps"] == pytest.approx(1e-15) for s in report["sites"])
    got = edgediff.load(artifact.path)(*zm.example_inputs)
    with torch.no_grad():
        expected = zm.module(*zm.example_inputs).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_taylor2_features_give_the_second_order_polynomial():
    rng = np.random.default_rng(0)
    q, k = rng.standard_normal((5, 6)), rng.standard_normal((7, 6))
    s = q @ k.T * 0.25
    phi_q, phi_k = (feature_map("taylor2", x, scale=0.25) for x in (q, k))
    assert phi_q.shape[-1] == len(taylor2_terms(6)[0]) == 1 + 6 + 21
    np.testing.assert_allclose(phi_q @ phi_k.T, 1 + s + s * s / 2, rtol=1e-12)


def test_favor_features_estimate_exp_and_are_seeded():
    rng = np.random.default_rng(1)
    q, k = 0.1 * rng.standard_normal((4, 8)), 0.1 * rng.standard_normal((4, 8))
    phi = [feature_map("favor+", x, features=4096, seed=3) for x in (q, k)]
    np.testing.assert_allclose(phi[0] @ phi[1].T, np.exp(q @ k.T), rtol=0.02)
    assert (phi[0] > 0).all()
    np.testing.assert_array_equal(feature_map("favor+", q, seed=3), feature_map("favor+", q, seed=3))
    assert not np.array_equal(feature_map("favor+", q, seed=3), feature_map("favor+", q, seed=4))


@pytest.mark.parametrize("name", FEATURE_MAPS)
def test_each_feature_map_compiles_to_the_numpy_reference(name, tmp_path):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, 64, DIM) for _ in range(3))
    artifact = edgediff.compile_model(
        OneAttention(),
        (q, k, v),
        output_dir=tmp_path / "out",
        progress=False,
        linear_attention={"feature_map": name, "fine_tuned": True, "features": 32},
    )
    layers = _passes(artifact)["rewrite-linear-attention"]["layers"]
    assert [layer["rewritten"] for layer in layers] == [True]
    got = edgediff.load(artifact.path)(q, k, v)
    expected = linear_reference(name, q.numpy(), k.numpy(), v.numpy(), scale=DIM**-0.5, features=32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    # and it is a different function from softmax attention (the test would pass for an untouched graph)
    assert np.abs(expected - softmax_reference(q.numpy(), k.numpy(), v.numpy(), DIM**-0.5)).max() > 1e-3


def test_selection_rewrites_only_layers_under_the_bound(tmp_path):
    torch.manual_seed(0)
    x, context = 0.5 * torch.randn(1, 256, HEADS * DIM), torch.randn(1, 8, HEADS * DIM)
    model = TwoAttentions().eval()
    artifact = edgediff.compile_model(
        model,
        (x, context),
        output_dir=tmp_path / "out",
        progress=False,
        linear_attention={"feature_map": "taylor2", "max_error": {"self": 0.01}},
    )
    gentle, peaked, cross = _passes(artifact)["rewrite-linear-attention"]["layers"]
    assert (gentle["kind"], peaked["kind"], cross["kind"]) == ("self", "self", "cross")
    assert gentle["error"] < 0.01 < peaked["error"]
    assert gentle["rewritten"] and gentle["saving_ms"] > 0
    assert not peaked["rewritten"] and "over the bound" in peaked["reason"]
    assert not cross["rewritten"] and "no error bound for cross" in cross["reason"]
    # the compiled model: taylor2 for the first, exact softmax for the others
    got = edgediff.load(artifact.path)(x, context)
    with torch.no_grad():
        exact = model(x, context).numpy()
    error = np.linalg.norm(got - exact) / np.linalg.norm(exact)
    assert 0 < error < 0.01


def test_small_layers_do_not_pay(tmp_path):
    torch.manual_seed(0)
    q, k, v = (0.1 * torch.randn(1, HEADS, 16, DIM) for _ in range(3))
    artifact = edgediff.compile_model(
        OneAttention(),
        (q, k, v),
        output_dir=tmp_path / "out",
        progress=False,
        linear_attention={"feature_map": "taylor2", "max_error": 0.5},
    )
    (layer,) = _passes(artifact)["rewrite-linear-attention"]["layers"]
    assert layer["error"] < 0.5 and not layer["rewritten"] and "does not pay" in layer["reason"]
    assert layer["break_even_tokens"] > 16
    assert len(_passes(artifact)["fuse-attention"]["sites"]) == 1


def test_fine_tuned_weights_from_a_folder_are_exact(tmp_path):
    """A UNet whose attention is ReLU-linear by construction (weights as LinFusion-style fine-tuning leaves
    them, in a local diffusers folder) compiles to exactly its own numerics."""
    from edgediff import zoo

    zm = zoo.build("tiny-sd15-unet")
    zm.module.unet.save_pretrained(tmp_path / "unet")
    artifact = edgediff.compile_model(
        tmp_path / "unet", output_dir=tmp_path / "out", progress=False, linear_attention="relu"
    )
    layers = _passes(artifact)["rewrite-linear-attention"]["layers"]
    assert len(layers) == 14 and all(layer["rewritten"] for layer in layers)
    local = zoo.load_local(tmp_path / "unet")
    got = edgediff.load(artifact.path)(*local.example_inputs)
    with torch.no_grad(), linear_sdpa("relu"):
        expected = local.module(*local.example_inputs).numpy()
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


def test_fp16_kernel_accumulates_in_fp32():
    """4096 keys, a normaliser (about 1.6e5) far beyond float16's 65504: the kernel sums in float32."""
    import tvm

    from edgediff.kernels.linear_attention import linear_attention_kernel
    from edgediff.targets import CostModel, load_target

    spec = load_target("host")
    b, n, m, f, dv = 1, 32, 4096, 8, 8
    kernel = linear_attention_kernel(CostModel(spec), batch=b, n=n, m=m, f=f, dv=dv, dtype="float16")
    lib = tvm.compile(
        tvm.IRModule({"main": kernel.with_attr("global_symbol", "main")}), target=spec.build_target()
    )
    rng = np.random.default_rng(0)
    phi_q, phi_k = (rng.uniform(0, 10, (b, t, f)).astype(np.float16) for t in (n, m))
    v = rng.standard_normal((b, m, dv)).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((b, n, dv), np.float16))
    lib["main"](*(tvm.runtime.tensor(x) for x in (phi_q, phi_k, v)), out)
    expected = linear_reference("relu", phi_q, phi_k, v, scale=1.0)
    assert np.isfinite(out.numpy()).all()
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-3)


@pytest.mark.slow
def test_rewrite_builds_for_arm(tmp_path):
    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, HEADS, 64, DIM) for _ in range(3))
    artifact = edgediff.compile_model(
        OneAttention(),
        inputs,
        target="arm-a78",
        output_dir=tmp_path / "out",
        progress=False,
        linear_attention="taylor2",
    )
    assert artifact.manifest["library"]["format"] == "shared"
    assert elf_machine(artifact.library_path) == AARCH64


def test_options_and_errors():
    assert resolve_linear_attention(None) is None
    config = resolve_linear_attention({"feature_map": "favor+", "max_error": 0.02, "features": 64})
    assert config.max_error == {"self": 0.02, "cross": 0.02} and config.features == 64
    assert resolve_linear_attention("relu").fine_tuned
    assert linear_attention_from_options("taylor2", max_error=0.01, cross_max_error=0.0) == {
        "feature_map": "taylor2",
        "fine_tuned": False,
        "max_error": {"self": 0.01, "cross": 0.0},
    }
    with pytest.raises(InputError, match="feature_map 'softplus'"):
        resolve_linear_attention({"feature_map": "softplus", "max_error": 0.1})
    with pytest.raises(InputError, match="needs max_error"):
        resolve_linear_attention({"feature_map": "taylor2"})
    with pytest.raises(InputError, match="need --linear-attention MAP"):
        linear_attention_from_options(None, max_error=0.1)
    assert math.isclose(feature_map("elu+1", np.array([-1.0, 2.0]))[0], math.exp(-1.0))
