"""Prompt text -> image on an artifact set with a compiled text encoder, against diffusers'
StableDiffusionPipeline on the same torch modules (transformers CLIPTextModel + CLIPTokenizer)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
from transformers import CLIPTokenizer as HFCLIPTokenizer

from edgediff import zoo
from edgediff.api import compile_pipeline
from edgediff.cli import main
from edgediff.errors import InputError
from edgediff.runtime.pipeline import Pipeline
from tests.runtime.test_pipeline import GUIDANCE, LATENT, SD_BETAS
from tests.runtime.tokenizer_fixtures import write_tokenizer

PROMPTS = ["a red fox", "A photograph of an astronaut riding a horse, 8k!", ""]
STEPS = 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    # vocabulary sized to tiny-clip-text's embedding table: bos/eos are its last two ids, as in CLIP
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer", vocab_size=1000, model_max_length=8)


@pytest.fixture(scope="module")
def text_set(tokenizer_dir, tmp_path_factory):
    """tiny text encoder + tiny UNet (batch 2) + tiny VAE decoder, built by ``edgediff compile-pipeline``."""
    out = tmp_path_factory.mktemp("textset") / "set"
    args = ["compile-pipeline", "--denoiser", "tiny-sd15-unet", "--decoder", "tiny-vae-decoder"]
    args += ["--text-encoder", "tiny-clip-text", "--tokenizer", str(tokenizer_dir), "-o", str(out), "-q"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(args) == 0
    lines = printed.getvalue().splitlines()
    assert lines[2].startswith("text_encoder/  tiny-clip-text: input_ids: int64[1, 8] -> last_hidden_state:")
    assert lines[3] == "tokenizer/     merges.txt, special_tokens_map.json, tokenizer_config.json, vocab.json"
    return out


@pytest.fixture(scope="module")
def diffusers_pipeline(tokenizer_dir):
    """The same models in torch, driven by diffusers' own text-to-image pipeline."""
    scheduler = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++", steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=zoo.instantiate("AutoencoderKL", zoo.TINY_VAE_CONFIG, seed=0),  # zoo.build's weights
        text_encoder=zoo.build("tiny-clip-text").module.text_encoder,
        tokenizer=HFCLIPTokenizer.from_pretrained(tokenizer_dir),
        unet=zoo.build("tiny-sd15-unet").module.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_set_layout_and_text_encoder_equals_torch(text_set, tokenizer_dir):
    assert sorted(p.name for p in text_set.iterdir()) == ["decoder", "denoiser", "text_encoder", "tokenizer"]
    pipeline = Pipeline.from_directory(text_set)
    assert pipeline.batch == 2 and pipeline.decoder.inputs[0].shape == (1, 4, LATENT, LATENT)
    assert (
        pipeline.text_encoder.inputs[0].shape == (1, 8) and pipeline.text_encoder.inputs[0].dtype == "int64"
    )
    hf_tokenizer = HFCLIPTokenizer.from_pretrained(tokenizer_dir)
    encoder = zoo.build("tiny-clip-text").module.text_encoder
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
        with torch.no_grad():
            expected = encoder(ids.input_ids)[0].numpy()
        got = pipeline.encode_prompt(prompt)
        assert got.shape == (1, 8, 32)
        assert np.linalg.norm(got - expected) / np.linalg.norm(expected) < 1e-4, prompt


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_prompt_pipeline_equals_diffusers(text_set, diffusers_pipeline, negative_prompt):
    pipeline = Pipeline.from_directory(text_set)
    init = np.random.default_rng(7).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    prompt = PROMPTS[1]  # longer than 8 tokens: truncated on both sides
    result = pipeline.generate(
        prompt=prompt,
        negative_prompt=negative_prompt,
        sampler="dpmpp-2m",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=init,
    )
    kwargs = {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "latents": torch.from_numpy(init),
    }
    with torch.no_grad():
        ref_latents = diffusers_pipeline(**kwargs, output_type="latent").images.numpy()
        ref_image = diffusers_pipeline(**kwargs, output_type="np").images[0]
    ref_u8 = (ref_image * 255).round().astype(np.uint8)
    rel = np.linalg.norm(result.latents - ref_latents) / np.linalg.norm(ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - ref_u8.astype(int))
    print(f"negative {negative_prompt!r}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    # The tolerance test_pipeline.py states: latents within 1e-4 relative, 8-bit pixels within 1 level.
    assert rel < 1e-4
    assert pixel_diff.max() <= 1
    assert result.timings.text_encoder > 0 and "text encoder" in result.timings.summary()


def test_prompt_text_equals_its_embeddings(text_set):
    pipeline = Pipeline.from_directory(text_set)
    options = {"sampler": "euler", "steps": 3, "guidance_scale": GUIDANCE, "seed": 5}
    by_text = pipeline.generate(prompt="a red fox", **options)
    by_arrays = pipeline.generate(
        pipeline.encode_prompt("a red fox"), negative=pipeline.encode_prompt(""), **options
    )
    np.testing.assert_array_equal(by_text.latents, by_arrays.latents)
    other = pipeline.generate(prompt="a red fox", negative_prompt="a dog", **options)
    assert not np.array_equal(other.latents, by_text.latents)  # the negative prompt is used
    # without guidance no negative is needed (and a negative prompt is ignored, as in diffusers)
    plain = pipeline.generate(
        prompt="a red fox", negative_prompt="a dog", **{**options, "guidance_scale": 1.0}
    )
    assert plain.latents.shape == (1, 4, LATENT, LATENT)


def test_prompt_errors(text_set, tmp_path):
    pipeline = Pipeline.from_directory(text_set)
    with pytest.raises(InputError, match="either prompt text or prompt embeddings"):
        pipeline.generate(np.zeros((1, 8, 32), np.float32), prompt="a fox", steps=1)
    with pytest.raises(InputError, match="either a negative prompt or negative embeddings"):
        pipeline.generate(prompt="a fox", negative_prompt="x", negative=np.zeros((1, 8, 32), np.float32))
    no_tokenizer = Pipeline.from_artifacts(
        text_set / "denoiser", text_set / "decoder", text_set / "text_encoder"
    )
    with pytest.raises(InputError, match="has no tokenizer/: give prompt embeddings"):
        no_tokenizer.generate(prompt="a fox", steps=1)
    no_encoder = Pipeline.from_artifacts(text_set / "denoiser", tokenizer=text_set / "tokenizer")
    with pytest.raises(InputError, match="has no text_encoder/: give"):
        no_encoder.encode_prompt("a fox")
    # loading checks what compile_pipeline checked: the encoder's signature and the tokenizer's fit
    with pytest.raises(InputError, match=r"expected one integer input \(token ids\) of shape \[1, seq\]"):
        Pipeline.from_artifacts(text_set / "denoiser", text_encoder=text_set / "decoder")
    too_big = write_tokenizer(tmp_path / "big", vocab_size=1200, model_max_length=8)
    with pytest.raises(InputError, match="has ids up to 1199; text encoder .* embeds 1000 tokens"):
        Pipeline.from_artifacts(
            text_set / "denoiser", text_encoder=text_set / "text_encoder", tokenizer=too_big
        )


def test_mismatched_sets_are_refused_before_compiling(tokenizer_dir, tmp_path):
    out = tmp_path / "never"

    def refused(match: str, *args, **kwargs) -> None:
        with pytest.raises(InputError, match=match):
            compile_pipeline(*args, output_dir=out, progress=False, **kwargs)
        assert not out.exists()

    refused("needs its tokenizer folder", "tiny-sd15-unet", text_encoder="tiny-clip-text")
    refused("tokenizer without a text encoder", "tiny-sd15-unet", tokenizer=tokenizer_dir)
    # SDXL takes pooled embeddings and time ids besides the token embeddings; DiT takes class labels
    refused(
        r"makes \[1, 8, 32\] embeddings; the denoiser tiny-sdxl-unet takes",
        "tiny-sdxl-unet",
        text_encoder="tiny-clip-text",
        tokenizer=tokenizer_dir,
    )
    refused(r"takes \['class_labels'\]", "tiny-dit", text_encoder="tiny-clip-text", tokenizer=tokenizer_dir)
    refused(r"decoder tiny-dit \(dit\) takes \[1, 4, 16, 16\]", "tiny-sd15-unet", decoder="tiny-dit")
    refused(r"denoiser tiny-vae-decoder is a vae-decoder", "tiny-vae-decoder")
    too_big = write_tokenizer(tmp_path / "big", vocab_size=1200)
    refused(
        "has ids up to 1199; text encoder tiny-clip-text embeds 1000 tokens",
        "tiny-sd15-unet",
        text_encoder="tiny-clip-text",
        tokenizer=too_big,
    )
    long = write_tokenizer(tmp_path / "long", vocab_size=1000, model_max_length=77)
    refused(
        "pads prompts to 77 tokens; text encoder tiny-clip-text takes 8",
        "tiny-sd15-unet",
        text_encoder="tiny-clip-text",
        tokenizer=long,
    )
    shifted = write_tokenizer(tmp_path / "shifted", vocab_size=999)
    refused(
        "has bos id 997; text encoder tiny-clip-text expects 998",
        "tiny-sd15-unet",
        text_encoder="tiny-clip-text",
        tokenizer=shifted,
    )


def test_pipeline_folder_components_are_found(tmp_path):
    """A diffusers pipeline folder gives its unet/ and text_encoder/ and the tokenizer/ beside them, and the
    UNet is built for the encoder's 8 tokens (a UNet folder alone would get SD's 77)."""
    pipe = tmp_path / "sd"
    zoo.build("tiny-sd15-unet").module.unet.save_pretrained(pipe / "unet")
    zoo.build("tiny-clip-text").module.text_encoder.save_pretrained(pipe / "text_encoder")
    write_tokenizer(pipe / "tokenizer", vocab_size=1000, model_max_length=8)
    (pipe / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert zoo.load_local(pipe).example_inputs[2].shape == (1, 77, 32)
    for text_encoder in (pipe, pipe / "text_encoder"):
        # every check passed up to the decoder, which is refused: nothing is compiled
        with pytest.raises(InputError, match=r"decoder tiny-dit \(dit\)"):
            compile_pipeline(
                pipe, "tiny-dit", text_encoder, output_dir=tmp_path / "never", batch=1, progress=False
            )
    write_tokenizer(pipe / "tokenizer", vocab_size=1200)  # now too big for the encoder: refused, named
    with pytest.raises(InputError, match=f"tokenizer {pipe / 'tokenizer'} has ids up to 1199"):
        compile_pipeline(pipe, text_encoder=pipe, output_dir=tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_generate_cli_with_prompt(text_set, tmp_path):
    out = tmp_path / "fox.png"
    command = [sys.executable, "-m", "edgediff", "generate", str(text_set), "--prompt", "a red fox"]
    command += ["--negative-prompt", "blurry", "--sampler", "unipc", "--steps", "3", "--seed", "2"]
    command += ["-o", str(out), "--save-latents", str(tmp_path / "lat.npy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "text encoder" in result.stdout and "denoiser" in result.stdout
    api = Pipeline.from_directory(text_set).generate(
        prompt="a red fox", negative_prompt="blurry", sampler="unipc", steps=3, seed=2, guidance_scale=7.5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)
