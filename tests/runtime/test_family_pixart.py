"""PixArt-alpha from prompt to picture: a tiny PixArtAlphaPipeline folder (T5 encoder, unigram
tokenizer.json) through ``compile-pipeline`` and ``generate``, against diffusers' own pipeline on the same
weights (the text's attention mask reaching the transformer, learned sigma, the folder's scheduler)."""

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
from transformers import T5EncoderModel, T5Tokenizer

from edgediff.api import compile_pipeline
from edgediff.cli import main
from edgediff.errors import EdgediffError
from edgediff.runtime.pipeline import Pipeline
from tests.runtime.family_fixtures import t5_config, write_pixart_pipeline

PROMPTS = ["A photograph of an astronaut riding a horse, 8k!", "  A Red FOX  ", ""]
TOKENS = 8  # max_sequence_length of the tiny set
LATENT, PIXELS = 8, 64
GUIDANCE, STEPS = 4.5, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pixart") / "tiny-pixart"
    return folder, write_pixart_pipeline(folder)


@pytest.fixture(scope="module")
def pixart_set(pixart, tmp_path_factory):
    folder, _ = pixart
    out = tmp_path_factory.mktemp("pixartset") / "set"
    args = ["compile-pipeline", "--denoiser", str(folder), "--max-sequence-length", str(TOKENS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, "-o", str(out), "-q"]) == 0
    lines = printed.getvalue().splitlines()
    assert lines[0].endswith(
        "encoder_hidden_states: float32[2, 8, 32]; encoder_attention_mask: float32[2, 8] "
        "-> noise_pred: float32[2, 8, 8, 8]"
    )
    assert lines[2] == (
        "text_encoder/  tiny-pixart-text_encoder: input_ids: int64[1, 8]; attention_mask: int64[1, 8] "
        "-> last_hidden_state: float32[1, 8, 32]"
    )
    assert json.loads((out / "conditioning.json").read_text()) == {
        "family": "pixart",
        "max_sequence_length": TOKENS,
    }
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_text_encoder_equals_transformers(pixart_set, pixart):
    folder, _ = pixart
    conditioner = Pipeline.from_directory(pixart_set).conditioner
    tokenizer = T5Tokenizer.from_pretrained(folder / "tokenizer")
    encoder = T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    for prompt in PROMPTS:
        # the pipeline's preprocessing without clean_caption: lower case, stripped
        ids = tokenizer(
            prompt.lower().strip(),
            padding="max_length",
            max_length=TOKENS,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            expected = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0].numpy()
        cond, _ = conditioner.encode(prompt, None, use_cfg=False, height=PIXELS, width=PIXELS)
        np.testing.assert_array_equal(cond["encoder_attention_mask"], ids.attention_mask.numpy())
        assert _rel(cond["encoder_hidden_states"], expected) < 1e-4, prompt


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_prompt_pipeline_equals_diffusers(pixart_set, pixart, negative_prompt):
    _, reference = pixart
    init = np.random.default_rng(7).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    result = Pipeline.from_directory(pixart_set).generate(
        prompt=PROMPTS[0],
        negative_prompt=negative_prompt,
        sampler="dpmpp-2m",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=init,
    )
    kwargs = {
        "prompt": PROMPTS[0],
        "negative_prompt": negative_prompt or "",  # PixArt's default negative prompt
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "latents": torch.from_numpy(init),
        "height": PIXELS,
        "width": PIXELS,
        "use_resolution_binning": False,
        "max_sequence_length": TOKENS,
        "clean_caption": False,
    }
    with torch.no_grad():
        ref_latents = reference(**kwargs, output_type="latent").images.numpy()
        ref_image = reference(**kwargs, output_type="np").images[0]
    rel = _rel(result.latents, ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - (ref_image * 255).round().astype(int))
    print(f"negative {negative_prompt!r}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    assert rel < 1e-4
    assert pixel_diff.max() <= 1


def test_mask_reaches_the_transformer(pixart_set):
    """Padding is masked out of cross-attention: the same states with another mask give another result."""
    pipeline = Pipeline.from_directory(pixart_set)
    cond, uncond = pipeline.conditioner.encode("a red fox", None, use_cfg=True, height=PIXELS, width=PIXELS)
    assert 0 < cond["encoder_attention_mask"].sum() < TOKENS
    options = {"sampler": "euler", "steps": 2, "guidance_scale": GUIDANCE, "seed": 1}
    masked = pipeline.generate(cond, negative=uncond, **options)
    unmasked = pipeline.generate(
        {**cond, "encoder_attention_mask": np.ones((1, TOKENS))}, negative=uncond, **options
    )
    assert _rel(unmasked.latents, masked.latents) > 1e-3


def test_generate_cli(pixart_set, tmp_path):
    out = tmp_path / "pixart.png"
    command = [sys.executable, "-m", "edgediff", "generate", str(pixart_set), "--prompt", "a red fox"]
    command += ["--negative-prompt", "blurry", "--height", "64", "--width", "64", "--steps", "3"]
    command += ["--guidance", "4.5", "-o", str(out), "--save-latents", str(tmp_path / "lat.npy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    api = Pipeline.from_directory(pixart_set).generate(
        prompt="a red fox", negative_prompt="blurry", steps=3, guidance_scale=4.5, height=64, width=64
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)


def test_mismatched_components_are_refused_before_compiling(pixart, tmp_path):
    folder, _ = pixart
    out = tmp_path / "never"

    def refused(match: str, path, **kwargs) -> None:
        with pytest.raises(EdgediffError, match=match):
            compile_pipeline(path, output_dir=out, progress=False, max_sequence_length=TOKENS, **kwargs)
        assert not out.exists()

    refused("its tokenizer comes from it", folder, tokenizer=tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    T5EncoderModel(t5_config(d_model=24)).save_pretrained(broken / "text_encoder")
    refused("the text encoder makes 24-wide states; the transformer's captions are 32 wide", broken)
    T5EncoderModel(t5_config(vocab_size=100)).save_pretrained(broken / "text_encoder")
    refused("has ids up to 241; text_encoder .* embeds 100 tokens", broken)
    (broken / "tokenizer" / "tokenizer.json").unlink()
    refused("no tokenizer.json", broken)
