"""SDXL from prompt to picture: a tiny StableDiffusionXLPipeline folder through ``compile-pipeline`` and
``generate``, against diffusers' own pipeline on the same weights (two CLIP encoders, pooled embeddings,
time ids, zeroed negative conditioning)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from transformers import CLIPTextModelWithProjection

from edgediff.api import compile_pipeline
from edgediff.cli import main
from edgediff.errors import EdgediffError
from edgediff.runtime.pipeline import Pipeline
from tests.runtime.family_fixtures import TEXT_TOKENS, clip_config, write_sdxl_pipeline

PROMPT = "A photograph of an astronaut riding a horse, 8k!"  # longer than 8 tokens: truncated
LATENT, PIXELS = 16, 128
GUIDANCE, STEPS = 5.0, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
    return folder, write_sdxl_pipeline(folder)


@pytest.fixture(scope="module")
def sdxl_set(sdxl, tmp_path_factory):
    folder, _ = sdxl
    out = tmp_path_factory.mktemp("sdxlset") / "set"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compile-pipeline", "--denoiser", str(folder), "-o", str(out), "-q"]) == 0
    lines = printed.getvalue().splitlines()
    assert lines[0].startswith("denoiser/      tiny-sdxl-unet: sample: float32[2, 4, 16, 16]")
    assert "text_embeds: float32[2, 32]; time_ids: float32[2, 6]" in lines[0]
    assert lines[2] == (
        "text_encoder/  tiny-sdxl-text_encoder: input_ids: int64[1, 8] -> hidden_states: float32[1, 8, 16]"
    )
    assert lines[3].endswith("-> hidden_states: float32[1, 8, 16]; text_embeds: float32[1, 32]")
    assert json.loads((out / "conditioning.json").read_text()) == {
        "family": "sdxl",
        "force_zeros_for_empty_prompt": True,
    }
    return out


@pytest.fixture(scope="module")
def reference(sdxl):
    _, pipe = sdxl
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def _clip_with_projection(projection: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(clip_config(16, projection)).eval()


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_text_encoders_equal_transformers(sdxl_set, reference):
    pipeline = Pipeline.from_directory(sdxl_set)
    conditioner = pipeline.conditioner
    assert conditioner.family == "sdxl" and pipeline.text_encoder is None
    for prompt in (PROMPT, "a red fox", ""):
        with torch.no_grad():
            embeds, _, pooled, _ = reference.encode_prompt(
                prompt, do_classifier_free_guidance=False, device="cpu"
            )
        cond, uncond = conditioner.encode(prompt, None, use_cfg=False, height=PIXELS, width=PIXELS)
        assert uncond is None
        assert cond["encoder_hidden_states"].shape == (1, TEXT_TOKENS, 32)
        assert _rel(cond["encoder_hidden_states"], embeds.numpy()) < 1e-4, prompt
        assert _rel(cond["text_embeds"], pooled.numpy()) < 1e-4, prompt
        np.testing.assert_array_equal(cond["time_ids"], [[PIXELS, PIXELS, 0, 0, PIXELS, PIXELS]])


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_prompt_pipeline_equals_diffusers(sdxl_set, reference, negative_prompt):
    pipeline = Pipeline.from_directory(sdxl_set)
    init = np.random.default_rng(7).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    result = pipeline.generate(
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        sampler="dpmpp-2m",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=init,
        height=PIXELS,
        width=PIXELS,
    )
    kwargs = {
        "prompt": PROMPT,
        "negative_prompt": negative_prompt,
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "latents": torch.from_numpy(init),
        "height": PIXELS,
        "width": PIXELS,
    }
    with torch.no_grad():
        ref_latents = reference(**kwargs, output_type="latent").images.numpy()
        ref_image = reference(**kwargs, output_type="np").images[0]
    rel = _rel(result.latents, ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - (ref_image * 255).round().astype(int))
    print(f"negative {negative_prompt!r}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    assert rel < 1e-4
    assert pixel_diff.max() <= 1
    assert result.timings.text_encoder > 0


def test_negative_conditioning(sdxl_set):
    """No negative prompt: zeros (force_zeros_for_empty_prompt); an empty one is encoded, as in diffusers."""
    conditioner = Pipeline.from_directory(sdxl_set).conditioner
    _, zeros = conditioner.encode("a fox", None, use_cfg=True, height=PIXELS, width=PIXELS)
    _, empty = conditioner.encode("a fox", "", use_cfg=True, height=PIXELS, width=PIXELS)
    assert not zeros["encoder_hidden_states"].any() and not zeros["text_embeds"].any()
    assert np.abs(empty["encoder_hidden_states"]).max() > 0.1
    _, other = conditioner.encode("a fox", "", use_cfg=True, height=64, width=96)
    np.testing.assert_array_equal(other["time_ids"], [[64, 96, 0, 0, 64, 96]])


def test_generate_cli(sdxl_set, tmp_path):
    out = tmp_path / "sdxl.png"
    command = [sys.executable, "-m", "edgediff", "generate", str(sdxl_set), "--prompt", "a red fox"]
    command += ["--negative-prompt", "blurry", "--height", "128", "--width", "128", "--steps", "3"]
    command += ["-o", str(out), "--save-latents", str(tmp_path / "lat.npy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "text encoder" in result.stdout
    api = Pipeline.from_directory(sdxl_set).generate(
        prompt="a red fox", negative_prompt="blurry", steps=3, height=128, width=128
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)


def test_mismatched_components_are_refused_before_compiling(sdxl, tmp_path):
    folder, _ = sdxl
    out = tmp_path / "never"

    def refused(match: str, path, **kwargs) -> None:
        with pytest.raises(EdgediffError, match=match):
            compile_pipeline(path, output_dir=out, progress=False, **kwargs)
        assert not out.exists()

    refused("its text_encoder comes from it", folder, text_encoder="tiny-clip-text")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    # a second encoder with a 24-wide projection: its pooled embeddings no longer fit the UNet's
    _clip_with_projection(24).save_pretrained(broken / "text_encoder_2")
    refused(r"make 16\+16 wide states and 24-wide pooled embeddings; the UNet takes 32 and 32", broken)
    shutil.copytree(folder / "text_encoder", broken / "text_encoder_2", dirs_exist_ok=True)
    refused("is a CLIPTextModel; this pipeline needs a CLIPTextModelWithProjection", broken)
    shutil.rmtree(broken / "text_encoder_2")
    shutil.copytree(folder / "text_encoder_2", broken / "text_encoder_2")
    shutil.rmtree(broken / "tokenizer_2")
    refused("tokenizer_2: not a tokenizer folder", broken)
