"""LoRA without a rebuild: a LoRA file merged into a compiled artifact at load time equals diffusers'
``_fuse_lora`` on the torch model, in the three key namings, for float and quantized artifacts; changing the
scale reloads exactly; bad files fail with one clear line."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from edgediff.runtime.artifact import CompiledModule
from edgediff.runtime.lora import Lora, LoraError, from_stored, plan_merge, read_safetensors

MODEL = "tiny-sd15-unet"
# (module path, kind): linear layers (square, cross-attention k with another input width, the GEGLU
# projection), a 1x1 conv and a 3x3 conv (kohya's conv LoRA: the kernel lives in the down matrix)
LAYERS = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.proj_in",
    "down_blocks.1.resnets.0.conv1",
)
RANK, ALPHA = 4, 2.0


def _make_lora(module: torch.nn.Module, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Random (down, up) matrices for LAYERS of the zoo model's ``unet``, shaped as trainers save them."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for path in LAYERS:
        layer = module.unet.get_submodule(path)
        if isinstance(layer, torch.nn.Conv2d):
            down = torch.randn(RANK, layer.in_channels, *layer.kernel_size, generator=gen) * 0.3
            up = torch.randn(layer.out_channels, RANK, 1, 1, generator=gen) * 0.3
        else:
            down = torch.randn(RANK, layer.in_features, generator=gen) * 0.3
            up = torch.randn(layer.out_features, RANK, generator=gen) * 0.3
        lora[path] = (down.numpy(), up.numpy())
    return lora


def _save(lora: dict, naming: str, path, *, alpha: float | None = ALPHA) -> str:
    """``lora`` as a .safetensors file in one naming: peft (diffusers today), old diffusers, or kohya."""
    from safetensors.numpy import save_file

    tensors = {}
    for layer, (down, up) in lora.items():
        if naming == "peft":
            tensors[f"unet.{layer}.lora_A.weight"] = down
            tensors[f"unet.{layer}.lora_B.weight"] = up
        elif naming == "diffusers-old":
            tensors[f"unet.{layer}.lora.down.weight"] = down
            tensors[f"unet.{layer}.lora.up.weight"] = up
        else:
            key = "lora_unet_" + layer.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = down
            tensors[f"{key}.lora_up.weight"] = up
            if alpha is not None:
                tensors[f"{key}.alpha"] = np.array(alpha, dtype=np.float32)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
    return str(path)


def _fused_with_diffusers(module: torch.nn.Module, lora: dict, scale: float, alpha: float | None):
    """A copy of the torch model with ``lora`` fused by diffusers' own LoRA layers (``_fuse_lora``)."""
    from diffusers.models.lora import (
        LoRACompatibleConv,
        LoRACompatibleLinear,
        LoRAConv2dLayer,
        LoRALinearLayer,
    )

    fused = copy.deepcopy(module)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the layers are deprecated in favour of peft (not installed)
        for path, (down, up) in lora.items():
            layer = fused.unet.get_submodule(path)
            if isinstance(layer, torch.nn.Conv2d):
                holder = LoRACompatibleConv(
                    layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.padding
                )
                adapter = LoRAConv2dLayer(
                    layer.in_channels, layer.out_channels, RANK, layer.kernel_size, network_alpha=alpha
                )
            else:
                holder = LoRACompatibleLinear(layer.in_features, layer.out_features)
                adapter = LoRALinearLayer(layer.in_features, layer.out_features, RANK, network_alpha=alpha)
            holder.weight.data = layer.weight.data.clone()
            adapter.down.weight.data = torch.from_numpy(down).reshape(adapter.down.weight.shape)
            adapter.up.weight.data = torch.from_numpy(up).reshape(adapter.up.weight.shape)
            holder.set_lora_layer(adapter)
            holder._fuse_lora(lora_scale=scale)
            layer.weight.data = holder.weight.data
    return fused


def _merged_weights(module: CompiledModule, lora: Lora) -> dict[str, np.ndarray]:
    """The model-space float weights the runtime merged (stored tensors mapped back through transforms)."""
    out = {}
    for target in plan_merge(module.manifest, lora.layers, "test"):
        tensor = target.stored[0]
        out[target.weight] = from_stored(module._merged[tensor.index], tensor, target.weight_shape)
    return out


@pytest.mark.parametrize("naming", ["peft", "diffusers-old", "kohya"])
def test_merge_equals_diffusers_fuse_lora(compiled, zoo_model, tmp_path, naming):
    zm = zoo_model(MODEL)
    lora = _make_lora(zm.module)
    alpha = ALPHA if naming == "kohya" else None  # only kohya files carry alpha
    path = _save(lora, naming, tmp_path / "lora.safetensors")
    scale = 0.8
    reference = _fused_with_diffusers(zm.module, lora, scale, alpha)

    module = compiled(MODEL, "host").load()
    state = module.set_lora(Lora.load(path, scale))
    assert state["layers"] == len(LAYERS)
    fused_state = reference.state_dict()
    for name, weight in _merged_weights(module, Lora.load(path, scale)).items():
        np.testing.assert_allclose(weight, fused_state[name].numpy(), atol=1e-5, rtol=0)

    x = zm.example_inputs
    with torch.no_grad():
        expected = reference(*x).numpy()
        base = zm.module(*x).numpy()
    got = module(*x)
    assert np.abs(expected - base).max() > 1e-2  # the LoRA changes the prediction
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_scale_change_reloads_exactly(compiled, zoo_model, tmp_path):
    zm = zoo_model(MODEL)
    path = _save(_make_lora(zm.module), "kohya", tmp_path / "lora.safetensors")
    module = compiled(MODEL, "host").load()
    x = zm.example_inputs
    base = module(*x)
    module.set_lora(Lora.load(path, 0.8))
    at_08 = module(*x)
    module.set_lora(Lora.load(path, 0.3))  # a new scale: the touched tensors come back from weights.bin
    fresh = compiled(MODEL, "host").load()
    fresh.set_lora(Lora.load(path, 0.3))
    np.testing.assert_array_equal(module(*x), fresh(*x))
    assert not np.array_equal(module(*x), at_08)
    module.set_lora(None)  # removed: bit-identical to the artifact without a LoRA
    np.testing.assert_array_equal(module(*x), base)
    assert module.lora is None


def test_lazy_module_applies_lora_when_it_loads(compiled, zoo_model, tmp_path):
    zm = zoo_model(MODEL)
    path = _save(_make_lora(zm.module), "peft", tmp_path / "lora.safetensors")
    eager = compiled(MODEL, "host").load()
    eager.set_lora(Lora.load(path, 0.5))
    lazy = CompiledModule(compiled(MODEL, "host").path, lazy=True)
    lazy.set_lora(Lora.load(path, 0.5))
    assert not lazy.loaded
    x = zm.example_inputs
    np.testing.assert_array_equal(lazy(*x), eager(*x))
    lazy.unload()
    np.testing.assert_array_equal(lazy(*x), eager(*x))  # reloaded with the LoRA merged again


@pytest.fixture(scope="module")
def quantized(host_int8, tmp_path_factory):
    from edgediff import compile_model

    root = tmp_path_factory.mktemp("lora-quantized")
    return {
        fmt: compile_model(MODEL, target=host_int8, precision=fmt, output_dir=root / fmt, progress=False)
        for fmt in ("w8", "w4")
    }


@pytest.mark.parametrize("fmt", ["w8", "w4"])
def test_quantized_layers_are_requantized_with_the_plans_format(quantized, zoo_model, tmp_path, fmt):
    from edgediff.precision import quantizers as q

    zm = zoo_model(MODEL)
    lora = _make_lora(zm.module)
    path = _save(lora, "peft", tmp_path / "lora.safetensors")
    fused = _fused_with_diffusers(zm.module, lora, 1.0, None).state_dict()
    module = quantized[fmt].load()
    state = module.set_lora(Lora.load(path, 1.0))
    assert state["requantized"] == len(LAYERS)
    fmt_ = q.get_format(fmt)
    for target in plan_merge(module.manifest, Lora.load(path).layers, "test"):
        ints, scales = target.stored[0], target.scales[0]
        shapes = q.stored_shapes(target.weight_shape, fmt_)
        new_scale = from_stored(module._merged[scales.index], scales, shapes[1])
        old_scale = from_stored(module.read_weight(scales.index), scales, shapes[1])
        merged = q.dequantize(
            from_stored(module._merged[ints.index], ints, shapes[0]), new_scale, target.weight_shape, fmt_
        )
        assert module._merged[ints.index].dtype == np.dtype(fmt_.weight_dtype)
        # one rounding of the stored weight and one of the merged: within half a step of each scale
        error = np.abs(merged - fused[target.weight].numpy()).reshape(target.weight_shape[0], -1)
        bound = (old_scale.reshape(error.shape[0], -1) + new_scale.reshape(error.shape[0], -1)) / 2
        per_scale = error.shape[1] if fmt == "w8" else q.int4_layout(target.weight_shape)[2]
        bound = np.repeat(bound, per_scale, axis=1)[:, : error.shape[1]]
        assert np.all(error <= bound * 1.001 + 1e-7), (target.weight, float((error - bound).max()))

    x = zm.example_inputs
    with torch.no_grad():
        fused_out = _fused_with_diffusers(zm.module, lora, 1.0, None)(*x).numpy()
        base_out = zm.module(*x).numpy()
    module.set_lora(None)
    base_err = np.abs(module(*x) - base_out).mean()
    module.set_lora(Lora.load(path, 1.0))
    lora_err = np.abs(module(*x) - fused_out).mean()
    assert lora_err < 2 * base_err + 1e-4  # as close to the fused float model as the base is to its own


# ----------------------------------------------------------------------------------------------- bad input


def test_keys_matching_no_layer_are_listed(compiled, tmp_path):
    from safetensors.numpy import save_file

    tensors = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": np.ones((2, 16)),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": np.ones((16, 2)),
        "unet.no_such_block.to_q.lora_A.weight": np.ones((2, 16)),
        "unet.no_such_block.to_q.lora_B.weight": np.ones((16, 2)),
    }
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(tmp_path / "x.safetensors"))
    module = compiled(MODEL, "host").load()
    with pytest.raises(LoraError, match=r"1 of 2 LoRA layers match no layer.*unet\.no_such_block\.to_q"):
        module.set_lora(Lora.load(tmp_path / "x.safetensors"))


def test_lora_for_another_base_model_names_the_layer(compiled, tmp_path):
    from safetensors.numpy import save_file

    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file(
        {
            f"{layer}.lora_A.weight": np.ones((2, 320), np.float32),
            f"{layer}.lora_B.weight": np.ones((320, 2), np.float32),
        },
        str(tmp_path / "sd15.safetensors"),
    )
    module = compiled(MODEL, "host").load()
    with pytest.raises(
        LoraError, match=rf"'{layer}' is for a weight of shape \[320, 320\].*\[16, 16\].*another base"
    ):
        module.set_lora(Lora.load(tmp_path / "sd15.safetensors"))


def test_unknown_keys_and_unreadable_files(tmp_path):
    from safetensors.numpy import save_file

    save_file({"model.diffusion.weight": np.ones(3, np.float32)}, str(tmp_path / "full.safetensors"))
    with pytest.raises(LoraError, match="not LoRA matrices.*model.diffusion.weight"):
        Lora.load(tmp_path / "full.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(LoraError, match="not a safetensors file|cannot read"):
        Lora.load(tmp_path / "junk.safetensors")


def test_precomputed_winograd_weights_are_refused():
    manifest = {
        "weights": {
            "tensors": [
                {
                    "index": 0,
                    "name": "unet.conv.weight:winograd_weight_transform",
                    "shape": [6, 6, 4, 4],
                    "dtype": "float32",
                },
            ]
        },
        "passes": [],
    }
    tensors = {
        "unet.conv.lora_A.weight": np.ones((2, 4, 3, 3)),
        "unet.conv.lora_B.weight": np.ones((4, 2, 1, 1)),
    }
    from edgediff.runtime.lora import parse_lora

    with pytest.raises(LoraError, match="winograd_weight_transform.*--disable-pass winograd-conv2d"):
        plan_merge(manifest, parse_lora(tensors), "art")


def test_safetensors_reader_matches_the_safetensors_package(tmp_path):
    from safetensors.torch import save_file

    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.randn(4).to(torch.float16),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "d": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"))
    got = read_safetensors(tmp_path / "t.safetensors")
    for name, value in tensors.items():
        np.testing.assert_array_equal(got[name], value.float().numpy() if name == "c" else value.numpy())


def test_bf16_layers_take_the_delta_in_place_and_kernel_packed_ones_are_refused(zoo_model, tmp_path):
    """bf16 stores the weight itself (no scales): a LoRA on a bf16 conv is added to it and rounded once to
    bfloat16; a Linear packed for the bf16 GEMM kernel is refused with the reason, not merged wrongly."""
    import ml_dtypes

    from edgediff import compile_model
    from tests.conftest import pinned_host_with

    artifact = compile_model(
        MODEL,
        target=pinned_host_with("bfloat16"),
        precision="bf16",
        output_dir=tmp_path / "a",
        progress=False,
    )
    zm = zoo_model(MODEL)
    lora = _make_lora(zm.module)
    convs = {path: pair for path, pair in lora.items() if path.endswith(("conv1", "proj_in"))}
    module = artifact.load()
    state = module.set_lora(Lora.load(_save(convs, "peft", tmp_path / "convs.safetensors"), 1.0))
    assert state["layers"] == len(convs) and state["requantized"] == 0
    fused = _fused_with_diffusers(zm.module, convs, 1.0, None).state_dict()
    for target in plan_merge(module.manifest, Lora.load(tmp_path / "convs.safetensors").layers, "test"):
        (tensor,) = target.stored
        assert module._merged[tensor.index].dtype == ml_dtypes.bfloat16
        stored = from_stored(module.read_weight(tensor.index), tensor, target.weight_shape)
        delta = fused[target.weight].numpy() - zm.module.state_dict()[target.weight].numpy()
        expected = (stored.astype(np.float32) + delta).astype(ml_dtypes.bfloat16)
        got = from_stored(module._merged[tensor.index], tensor, target.weight_shape)
        # the same one rounding, up to the float32 delta's own rounding (one bfloat16 step at a tie)
        step = np.abs(expected.astype(np.float32)) * 2.0**-7
        assert np.all(np.abs(got.astype(np.float32) - expected.astype(np.float32)) <= step + 1e-12)
    linear = {path: pair for path, pair in lora.items() if path.endswith("to_q")}
    with pytest.raises(LoraError, match=r"cannot merge LoRA layer .*to_q.* stored as"):
        module.set_lora(Lora.load(_save(linear, "peft", tmp_path / "linear.safetensors"), 1.0))
