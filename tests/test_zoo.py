"""Tests of the model zoo: tiny models build, run, export and round-trip through local folders.

Full-size models are never materialised here; their configs are checked by counting parameters on the
meta device, which allocates nothing.
"""

from __future__ import annotations

import json

import pytest
import torch

from edgediff import zoo
from edgediff.errors import EdgediffError, InputError, ModelNotFoundError

TINY = [n for n in zoo.list_models() if n.startswith("tiny-")]

# name -> (input names, output channels); output spatial size = latent size (x8 pixels for the VAE).
EXPECTED = {
    "tiny-sd15-unet": (("sample", "timestep", "encoder_hidden_states"), 4),
    "tiny-sdxl-unet": (("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), 4),
    "tiny-dit": (("sample", "timestep", "class_labels"), 8),
    "tiny-pixart": (("sample", "timestep", "encoder_hidden_states"), 8),
    "tiny-sana": (("sample", "timestep", "encoder_hidden_states"), 8),
    "tiny-vae-decoder": (("latent",), 3),
}

# Parameter counts of the full-size configs as diffusers builds them.
FULL_PARAMS = {
    "sd15-unet": 859_520_964,  # the published SD 1.5 UNet count
    "sdxl-unet": 2_567_463_684,  # the published SDXL base UNet count
    # DiT paper's 675,129,632 minus its fixed 256x1152 positional table (a buffer in diffusers), plus the
    # timestep/label embedders the diffusers conversion copies into each of the 28 blocks (27 x 2,777,472).
    "dit-xl-2": 675_129_632 - 256 * 1152 + 27 * 2_777_472,
    "pixart-alpha": 610_856_096,  # "0.6B" (PixArt-alpha paper)
    "sana-600m": 591_747_872,  # "0.6B" / 590M (SANA paper)
    "sd-vae-decoder": 83_653_863,  # whole AutoencoderKL; the decoder path alone is 49,490,199
    "clip-text-l14": 123_060_480,  # the SD 1.5 text encoder (CLIP ViT-L/14 text tower)
    "clip-text-bigg14": 694_659_840,  # SDXL's text_encoder_2 (OpenCLIP bigG text tower + projection)
    "t5-v1_1-xxl-encoder": 4_762_310_656,  # PixArt-alpha's T5-XXL, encoder only
    "gemma-2-2b": 2_614_341_888,  # SANA's Gemma-2 2B
}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the threads' hand-offs
    made these tests 2-3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, zoo.ZooModel]:
    return {name: zoo.build(name) for name in TINY}


def test_list_models_complete() -> None:
    full = ["sd15-unet", "sdxl-unet", "dit-xl-2", "pixart-alpha", "sana-600m", "sd-vae-decoder"]
    full += ["clip-text-l14", "clip-text-bigg14", "t5-v1_1-xxl-encoder", "gemma-2-2b"]
    tiny = ["tiny-sd15-unet", "tiny-sdxl-unet", "tiny-dit", "tiny-pixart", "tiny-sana", "tiny-vae-decoder"]
    tiny += ["tiny-clip-text"]
    assert zoo.list_models() == full + tiny


@pytest.mark.parametrize("name", list(EXPECTED))  # the image models; text encoders below
def test_tiny_builds_and_runs(name: str, tiny_models: dict[str, zoo.ZooModel]) -> None:
    zm = tiny_models[name]
    names, out_channels = EXPECTED[name]
    assert zm.name == name and zm.family in zoo.FAMILIES
    assert zm.input_names == names and len(zm.example_inputs) == len(names)
    assert not zm.module.training
    assert 1_000 < zm.meta["param_count"] < 1_100_000
    json.dumps(zm.config), json.dumps(zm.meta)  # must be JSON-serialisable

    latent = zm.meta["latent_size"]
    assert zm.example_inputs[0].shape[-2:] == (latent, latent)
    if zm.family != "vae-decoder":
        timestep = zm.example_inputs[1]
        assert timestep.dtype == torch.float32 and timestep.shape == (1,)
    with torch.no_grad():
        out = zm.module(*zm.example_inputs)
    assert isinstance(out, torch.Tensor)
    side = latent * 8 if zm.family == "vae-decoder" else latent
    assert out.shape == (1, out_channels, side, side)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", TINY)
def test_seed_determinism(name: str, tiny_models: dict[str, zoo.ZooModel]) -> None:
    a, b, c = tiny_models[name], zoo.build(name, seed=0), zoo.build(name, seed=1)
    for x, y in zip(a.example_inputs, b.example_inputs, strict=True):
        assert torch.equal(x, y)
    with torch.no_grad():
        ref = a.module(*a.example_inputs)
        assert torch.equal(ref, b.module(*a.example_inputs))
        assert not torch.allclose(ref, c.module(*a.example_inputs))


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    zoo.build("tiny-dit", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", TINY)
def test_torch_export(name: str, tiny_models: dict[str, zoo.ZooModel]) -> None:
    zm = tiny_models[name]
    ep = torch.export.export(zm.module, zm.example_inputs)
    user_inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    assert len(user_inputs) == len(zm.input_names)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*zm.example_inputs), zm.module(*zm.example_inputs))


def test_batch_and_latent_size() -> None:
    zm = zoo.build("tiny-sdxl-unet", batch=2, latent_size=8)
    assert all(t.shape[0] == 2 for t in zm.example_inputs)
    assert zm.example_inputs[4][0].tolist() == [64.0, 64.0, 0.0, 0.0, 64.0, 64.0]  # pixels = latent * 8
    with torch.no_grad():
        assert zm.module(*zm.example_inputs).shape == (2, 4, 8, 8)
    # Transformers recompute their positional embedding for a latent size other than sample_size.
    dit = zoo.build("tiny-dit", latent_size=16)
    with torch.no_grad():
        assert dit.module(*dit.example_inputs).shape == (1, 8, 16, 16)
    with pytest.raises(InputError):
        zoo.build("tiny-dit", latent_size=7)  # not a multiple of the patch size
    with pytest.raises(InputError):
        zoo.build("tiny-dit", batch=0)


def test_meta() -> None:
    dit = zoo.build("tiny-dit")
    assert dit.meta["learned_sigma"] is True and dit.meta["noise_pred_channels"] == [0, 4]
    assert dit.example_inputs[2].dtype == torch.int64
    assert zoo.build("tiny-sana").meta["prediction_type"] == "flow"
    assert zoo.build("tiny-sd15-unet").meta["prediction_type"] == "epsilon"
    vae = zoo.build("tiny-vae-decoder")
    assert vae.output_names == ("image",) and vae.meta["scaling_factor"] == 0.18215
    assert vae.meta["prediction_type"] is None
    sdxl = zoo.build("tiny-sdxl-unet")
    assert sdxl.config["addition_embed_type"] == "text_time" and sdxl.meta["scaling_factor"] == 0.13025


def test_vae_decoder_matches_decode() -> None:
    import diffusers

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL.from_config(zoo.TINY_VAE_CONFIG).eval()
    zm = zoo.wrap(vae)
    latent = zm.example_inputs[0]
    with torch.no_grad():
        expected = vae.decode(latent / vae.config.scaling_factor).sample
        torch.testing.assert_close(zm.module(latent), expected)
    # Only the decoder path is captured, not the encoder's weights.
    assert zm.meta["param_count"] < sum(p.numel() for p in vae.parameters())


def test_wrap_pixart_with_resolution_conditioning() -> None:
    import diffusers

    config = dict(zoo.TINY_PIXART_CONFIG, use_additional_conditions=True)
    zm = zoo.wrap(diffusers.PixArtTransformer2DModel.from_config(config), batch=2, name="px")
    assert zm.name == "px" and zm.meta["use_additional_conditions"] is True
    with torch.no_grad():
        assert zm.module(*zm.example_inputs).shape == (2, 8, 8, 8)
    torch.export.export(zm.module, zm.example_inputs)


def test_wrap_rejects_other_models() -> None:
    with pytest.raises(ModelNotFoundError, match="Linear"):
        zoo.wrap(torch.nn.Linear(2, 2))


def _assert_same(a: zoo.ZooModel, b: zoo.ZooModel) -> None:
    """Same weights bit for bit and the same outputs.

    Outputs are compared with a float32 tolerance, not bitwise: tensors loaded from safetensors are not
    64-byte aligned, so oneDNN/MKL pick other kernels and round differently in the last bits.
    """
    assert a.family == b.family and a.input_names == b.input_names
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    with torch.no_grad():
        torch.testing.assert_close(
            b.module(*a.example_inputs), a.module(*a.example_inputs), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("name", ["tiny-sd15-unet", "tiny-dit", "tiny-sana"])
def test_load_local_component_folder(name: str, tmp_path, tiny_models: dict[str, zoo.ZooModel]) -> None:
    original = tiny_models[name]
    model = next(iter(original.module.children()))  # the wrapped diffusers model
    model.save_pretrained(tmp_path / "m")
    loaded = zoo.load_local(tmp_path / "m")
    assert loaded.name == "m" and loaded.config == original.config
    _assert_same(original, loaded)


def test_load_local_pipeline_folder(tmp_path) -> None:
    import diffusers

    unet_zm = zoo.build("tiny-sdxl-unet")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL.from_config(dict(zoo.TINY_VAE_CONFIG, scaling_factor=0.13025))
    pipe = tmp_path / "pipe"
    unet_zm.module.unet.save_pretrained(pipe / "unet")
    vae.save_pretrained(pipe / "vae")
    (pipe / "scheduler").mkdir()
    (pipe / "scheduler" / "scheduler_config.json").write_text(
        json.dumps({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"})
    )
    (pipe / "model_index.json").write_text(
        json.dumps(
            {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
        )
    )

    loaded = zoo.load_local(pipe)  # default component: unet
    assert loaded.name == "pipe-unet"
    assert loaded.meta["prediction_type"] == "v_prediction" and loaded.meta["scaling_factor"] == 0.13025
    _assert_same(unet_zm, loaded)

    dec = zoo.load_local(pipe, subfolder="vae", latent_size=4)
    assert dec.family == "vae-decoder" and dec.name == "pipe-vae" and dec.output_names == ("image",)
    assert dec.example_inputs[0].shape == (1, 4, 4, 4)
    _assert_same(zoo.wrap(vae, latent_size=4), dec)

    with pytest.raises(ModelNotFoundError, match="text_encoder"):
        zoo.load_local(pipe, subfolder="text_encoder")

    # A component folder inside a pipeline still picks up the pipeline's scheduler.
    inner = zoo.load_local(pipe / "unet")
    assert inner.name == "pipe-unet" and inner.meta["prediction_type"] == "v_prediction"


def test_tiny_text_encoder(tiny_models: dict[str, zoo.ZooModel]) -> None:
    zm = tiny_models["tiny-clip-text"]
    assert zm.family == "text-encoder" and zm.input_names == ("input_ids",)
    assert zm.output_names == ("last_hidden_state",)
    (ids,) = zm.example_inputs
    assert ids.shape == (1, 8) and ids.dtype == torch.int64 and int(ids.max()) < 1000
    # sized for tiny-sd15-unet's encoder_hidden_states (1, 8, 32)
    unet_text = tiny_models["tiny-sd15-unet"].example_inputs[2].shape[1:]
    assert (zm.meta["seq_len"], zm.meta["hidden_size"]) == tuple(unet_text)
    assert (zm.meta["bos_token_id"], zm.meta["eos_token_id"], zm.meta["pad_token_id"]) == (998, 999, 999)
    with torch.no_grad():
        out = zm.module(*zm.example_inputs)
        # what an SD pipeline takes as prompt embeddings: the last hidden state after the final layer norm
        assert torch.equal(out, zm.module.text_encoder(ids).last_hidden_state)
    assert out.shape == (1, 8, 32)
    assert zoo.build("tiny-clip-text", batch=2).example_inputs[0].shape == (2, 8)
    with pytest.raises(InputError, match="latent_size does not apply to a text encoder"):
        zoo.build("tiny-clip-text", latent_size=8)


def test_load_local_text_encoder(tmp_path, tiny_models: dict[str, zoo.ZooModel]) -> None:
    from safetensors.torch import load_file, save_file

    from tests.runtime.tokenizer_fixtures import write_tokenizer

    original = tiny_models["tiny-clip-text"]
    pipe = tmp_path / "pipe"
    original.module.text_encoder.save_pretrained(pipe / "text_encoder")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    loaded = zoo.load_local(pipe, subfolder="text_encoder")
    assert loaded.name == "pipe-text_encoder" and loaded.meta["bos_token_id"] == 998
    _assert_same(original, loaded)

    # the pipeline's tokenizer/ supplies the token ids (here shifted: a 1200-token vocabulary)
    write_tokenizer(pipe / "tokenizer", vocab_size=1200)
    inner = zoo.load_local(pipe / "text_encoder")
    assert inner.name == "pipe-text_encoder"
    assert (inner.meta["bos_token_id"], inner.meta["eos_token_id"]) == (1198, 1199)

    # SD 1.x checkpoints name their weights text_model.*, as transformers 4 did
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((pipe / "text_encoder" / "config.json").read_text())
    weights = load_file(pipe / "text_encoder" / "model.safetensors")
    save_file({f"text_model.{k}": v for k, v in weights.items()}, old / "model.safetensors")
    _assert_same(original, zoo.load_local(old))

    config = json.loads((old / "config.json").read_text())
    (old / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(ModelNotFoundError, match="missing"):
        zoo.load_local(old)
    (old / "model.safetensors").unlink()
    with pytest.raises(
        ModelNotFoundError, match="no weights; expected model.safetensors or pytorch_model.bin"
    ):
        zoo.load_local(old)


def test_load_local_sdxl_refiner_time_ids(tmp_path) -> None:
    import diffusers

    # The refiner's time ids are (h, w, crop top, left, aesthetic score): 5, not 6.
    config = dict(zoo.TINY_SDXL_UNET_CONFIG, projection_class_embeddings_input_dim=32 + 5 * 8)
    diffusers.UNet2DConditionModel.from_config(config).save_pretrained(tmp_path / "refiner" / "unet")
    (tmp_path / "refiner" / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLImg2ImgPipeline", "requires_aesthetics_score": True})
    )
    zm = zoo.load_local(tmp_path / "refiner")
    assert zm.example_inputs[3].shape == (1, 32) and zm.example_inputs[4].shape == (1, 5)
    with torch.no_grad():
        assert zm.module(*zm.example_inputs).shape == (1, 4, 16, 16)


def test_load_local_legacy_class_name_and_variant(tmp_path, tiny_models: dict[str, zoo.ZooModel]) -> None:
    original = tiny_models["tiny-dit"]
    # Published DiT checkpoints say Transformer2DModel; only an fp16-variant weights file is present.
    original.module.transformer.save_pretrained(tmp_path / "dit", variant="fp16")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    (tmp_path / "dit" / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    loaded = zoo.load_local(tmp_path / "dit")
    assert loaded.family == "dit" and loaded.config["_class_name"] == "DiTTransformer2DModel"
    _assert_same(original, loaded)


def test_load_local_bad_weights(tmp_path, tiny_models: dict[str, zoo.ZooModel]) -> None:
    model = tiny_models["tiny-dit"].module.transformer
    model.save_pretrained(tmp_path / "short")
    config = json.loads((tmp_path / "short" / "config.json").read_text())
    (tmp_path / "short" / "config.json").write_text(json.dumps({**config, "num_layers": 3}))
    with pytest.raises(ModelNotFoundError, match="missing"):
        zoo.load_local(tmp_path / "short")  # diffusers alone would fill the third block randomly
    model.save_pretrained(tmp_path / "corrupt")
    (tmp_path / "corrupt" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ModelNotFoundError, match="could not load"):
        zoo.load_local(tmp_path / "corrupt")


def test_load_local_errors(tmp_path) -> None:
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        zoo.load_local(tmp_path / "missing")
    with pytest.raises(ModelNotFoundError, match="config.json"):
        zoo.load_local(tmp_path)  # empty folder
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(ModelNotFoundError, match="no weights"):
        zoo.load_local(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["CLIPVisionModel"]}))
    with pytest.raises(ModelNotFoundError, match="'CLIPVisionModel' is not supported"):
        zoo.load_local(tmp_path)


def test_unknown_name() -> None:
    with pytest.raises(ModelNotFoundError, match="did you mean 'sd15-unet'") as info:
        zoo.build("sd15-unte")
    assert "tiny-vae-decoder" in str(info.value) and "\n" not in str(info.value)
    assert isinstance(info.value, EdgediffError)


@pytest.mark.parametrize("name", list(FULL_PARAMS))
def test_full_size_param_counts(name: str) -> None:
    spec = zoo.SPECS[name]
    model = zoo.instantiate(spec.class_name, spec.config, meta=True)
    assert sum(p.numel() for p in model.parameters()) == FULL_PARAMS[name]


def test_full_size_wrappers_on_meta_device() -> None:
    """Wrapping needs no weights, so the full-size input signatures can be checked without building them."""

    def wrap_meta(name: str) -> zoo.ZooModel:
        spec = zoo.SPECS[name]
        return zoo.wrap(zoo.instantiate(spec.class_name, spec.config, meta=True), name=name)

    sdxl = wrap_meta("sdxl-unet")
    shapes = [tuple(t.shape) for t in sdxl.example_inputs]
    assert shapes == [(1, 4, 128, 128), (1,), (1, 77, 2048), (1, 1280), (1, 6)]
    assert sdxl.meta["scaling_factor"] == 0.13025
    dit = wrap_meta("dit-xl-2")
    assert dit.meta["learned_sigma"] and dit.meta["num_classes"] == 1000
    assert wrap_meta("pixart-alpha").meta["use_additional_conditions"] is False
    sana = wrap_meta("sana-600m")
    assert sana.example_inputs[0].shape == (1, 32, 32, 32) and sana.meta["image_size"] == 1024
    clip = wrap_meta("clip-text-l14")
    assert clip.example_inputs[0].shape == (1, 77) and clip.example_inputs[0].dtype == torch.int64
    # the published config's bos/eos/pad (0, 2, 1) predate transformers' fix; the tokenizer's ids are these
    ids = {k: clip.meta[f"{k}_token_id"] for k in ("bos", "eos", "pad")}
    assert ids == {"bos": 49406, "eos": 49407, "pad": 49407}
    assert (clip.meta["seq_len"], clip.meta["hidden_size"], clip.meta["vocab_size"]) == (77, 768, 49408)
    bigg = wrap_meta("clip-text-bigg14")  # SDXL's second encoder: penultimate states + pooled projection
    assert bigg.output_names == ("hidden_states", "text_embeds") and bigg.meta["projection_dim"] == 1280
    assert (bigg.meta["seq_len"], bigg.meta["eos_token_id"]) == (77, 49407)
    for name, seq_len, width in (("t5-v1_1-xxl-encoder", 120, 4096), ("gemma-2-2b", 300, 2304)):
        encoder = wrap_meta(name)  # ids and attention mask in, last hidden state out
        assert encoder.input_names == ("input_ids", "attention_mask")
        assert [tuple(t.shape) for t in encoder.example_inputs] == [(1, seq_len)] * 2
        assert encoder.meta["hidden_size"] == width and encoder.meta["pad_token_id"] == 0
    vae = wrap_meta("sd-vae-decoder")
    assert vae.meta["param_count"] == 49_490_199  # the decoder path only
    assert vae.example_inputs[0].shape == (1, 4, 64, 64) and vae.meta["image_size"] == 512


def test_full_size_configs_match_published() -> None:
    sd15 = zoo.SD15_UNET_CONFIG
    assert sd15["block_out_channels"] == [320, 640, 1280, 1280] and sd15["cross_attention_dim"] == 768
    assert sd15["attention_head_dim"] == 8 and sd15["sample_size"] == 64
    sdxl = zoo.SDXL_UNET_CONFIG
    assert sdxl["addition_embed_type"] == "text_time" and sdxl["transformer_layers_per_block"] == [1, 2, 10]
    dit = zoo.DIT_XL_2_CONFIG
    assert (dit["num_layers"], dit["num_attention_heads"], dit["attention_head_dim"]) == (28, 16, 72)
    assert (dit["patch_size"], dit["sample_size"], dit["out_channels"]) == (2, 32, 8)
    assert zoo.SD_VAE_CONFIG["block_out_channels"] == [128, 256, 512, 512]
    assert zoo.SD_VAE_CONFIG["scaling_factor"] == 0.18215
