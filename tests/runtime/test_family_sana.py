"""SANA from prompt to picture: a tiny SanaPipeline folder (Gemma-2 encoder, BPE tokenizer.json, DC-AE,
flow matching with shift 3) through ``compile-pipeline`` and ``generate``, against diffusers' own pipeline on
the same weights (the complex human instruction before the prompt, none before the negative prompt)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import Gemma2Model, GemmaTokenizer

from edgediff.cli import main
from edgediff.runtime.pipeline import Pipeline
from edgediff.zoo.pipelines import SANA_INSTRUCTION
from tests.runtime.family_fixtures import write_sana_pipeline

PROMPT = "A photograph of an astronaut riding a horse, 8k!"
TOKENS = 8  # max_sequence_length of the tiny set
ENCODER_TOKENS = 303 + TOKENS - 2  # the instruction's 303 tokens (bos included) + the prompt's, less 2
LATENT, PIXELS = 8, 32  # the tiny DC-AE is 4x
GUIDANCE, STEPS = 4.5, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sana") / "tiny-sana"
    return folder, write_sana_pipeline(folder)


@pytest.fixture(scope="module")
def sana_set(sana, tmp_path_factory):
    folder, _ = sana
    out = tmp_path_factory.mktemp("sanaset") / "set"
    args = ["compile-pipeline", "--denoiser", str(folder), "--max-sequence-length", str(TOKENS)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, "-o", str(out), "-q"]) == 0
    lines = printed.getvalue().splitlines()
    assert lines[0].endswith(
        "encoder_hidden_states: float32[2, 8, 32]; encoder_attention_mask: float32[2, 8] "
        "-> noise_pred: float32[2, 8, 8, 8]"
    )
    assert lines[1].startswith("decoder/       tiny-sana-vae: latent: float32[1, 8, 8, 8] -> image:")
    assert f"input_ids: int64[1, {ENCODER_TOKENS}]" in lines[2]
    options = json.loads((out / "conditioning.json").read_text())
    assert options == {
        "family": "sana",
        "max_sequence_length": TOKENS,
        "complex_human_instruction": SANA_INSTRUCTION,
    }
    return out


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_text_encoder_equals_transformers(sana_set, sana):
    """The prompt through the instruction path and the negative one without it, against Gemma-2 in
    transformers as SanaPipeline calls it."""
    folder, reference = sana
    conditioner = Pipeline.from_directory(sana_set).conditioner
    tokenizer = GemmaTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.padding_side = "right"
    encoder = Gemma2Model.from_pretrained(folder / "text_encoder").eval()
    instruction = "\n".join(SANA_INSTRUCTION)
    for text in (PROMPT, "a red fox", ""):
        # the pipeline lower-cases and strips the prompt, then puts the instruction before it
        ids = tokenizer(
            instruction + text.lower().strip(),
            padding="max_length",
            max_length=ENCODER_TOKENS,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            states = encoder(ids.input_ids, attention_mask=ids.attention_mask)[0].numpy()
        keep = [0, *range(ENCODER_TOKENS - TOKENS + 1, ENCODER_TOKENS)]
        cond, uncond = conditioner.encode(text, text, use_cfg=True, height=PIXELS, width=PIXELS)
        assert _rel(cond["encoder_hidden_states"], states[:, keep]) < 1e-4, text
        np.testing.assert_array_equal(cond["encoder_attention_mask"], ids.attention_mask.numpy()[:, keep])
        with torch.no_grad():
            neg, neg_mask, _, _ = reference.encode_prompt(
                text,
                do_classifier_free_guidance=False,
                max_sequence_length=TOKENS,
                complex_human_instruction=None,
            )
        assert _rel(uncond["encoder_hidden_states"], neg.numpy()) < 1e-4, text
        np.testing.assert_array_equal(uncond["encoder_attention_mask"], neg_mask.numpy())


@pytest.mark.parametrize("negative_prompt", [None, "blurry, low quality"])
def test_prompt_pipeline_equals_diffusers(sana_set, sana, negative_prompt):
    _, reference = sana
    pipeline = Pipeline.from_directory(sana_set)
    assert pipeline.meta["flow_shift"] == 3.0 and pipeline.prediction_type == "flow"
    init = np.random.default_rng(7).standard_normal((1, 8, LATENT, LATENT)).astype(np.float32)
    result = pipeline.generate(
        prompt=PROMPT,
        negative_prompt=negative_prompt,
        sampler="flow-euler",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=init,
    )
    kwargs = {
        "prompt": PROMPT,
        "negative_prompt": negative_prompt or "",  # SANA's default negative prompt
        "num_inference_steps": STEPS,
        "guidance_scale": GUIDANCE,
        "latents": torch.from_numpy(init),
        "height": PIXELS,
        "width": PIXELS,
        "use_resolution_binning": False,
        "max_sequence_length": TOKENS,
    }
    with torch.no_grad():
        ref_latents = reference(**kwargs, output_type="latent").images.numpy()
        ref_image = reference(**kwargs, output_type="np").images[0]
    rel = _rel(result.latents, ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - (ref_image * 255).round().astype(int))
    print(f"negative {negative_prompt!r}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    assert rel < 1e-4
    assert pixel_diff.max() <= 1


def test_generate_cli(sana_set, tmp_path):
    out = tmp_path / "sana.png"
    command = [sys.executable, "-m", "edgediff", "generate", str(sana_set), "--prompt", "a red fox"]
    command += ["--negative-prompt", "blurry", "--height", "32", "--width", "32", "--steps", "3"]
    command += ["--sampler", "flow-euler", "--guidance", "4.5", "-o", str(out)]
    command += ["--save-latents", str(tmp_path / "lat.npy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    api = Pipeline.from_directory(sana_set).generate(
        prompt="a red fox", negative_prompt="blurry", sampler="flow-euler", steps=3, guidance_scale=4.5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)
