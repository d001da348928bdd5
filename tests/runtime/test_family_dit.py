"""DiT from class label to picture: a tiny DiTPipeline folder through ``compile-pipeline`` and ``generate
--class-label``, against diffusers' DiTPipeline on the same weights (learned sigma, the null class for
guidance, the folder's linear-beta scheduler)."""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers.pipelines.dit import pipeline_dit

from edgediff.cli import main
from edgediff.runtime.pipeline import Pipeline
from tests.runtime.family_fixtures import DIT_BETAS, write_dit_pipeline

LATENT = 8  # the tiny DiT's sample_size (64 pixels)
GUIDANCE, STEPS = 4.0, 4


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit") / "tiny-dit"
    return folder, write_dit_pipeline(folder)


@pytest.fixture(scope="module")
def dit_set(dit, tmp_path_factory):
    folder, _ = dit
    out = tmp_path_factory.mktemp("ditset") / "set"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["compile-pipeline", "--denoiser", str(folder), "-o", str(out), "-q"]) == 0
    lines = printed.getvalue().splitlines()
    assert lines[0] == (
        "denoiser/      tiny-dit-transformer: sample: float32[2, 4, 8, 8]; timestep: float32[2]; "
        "class_labels: int64[2] -> noise_pred: float32[2, 8, 8, 8]"
    )
    assert lines[1].startswith("decoder/       tiny-dit-vae: latent: float32[1, 4, 8, 8]")
    return out


def _diffusers_latents(pipe, monkeypatch, init: np.ndarray, label: int) -> tuple[np.ndarray, np.ndarray]:
    """DiTPipeline draws its own noise and returns only images: give it ``init`` and keep the latents it
    decodes."""
    monkeypatch.setattr(pipeline_dit, "randn_tensor", lambda *a, **k: torch.from_numpy(init).clone())
    seen = []
    decode = pipe.vae.decode

    def keep(latents, *args, **kwargs):
        seen.append(latents * pipe.vae.config.scaling_factor)
        return decode(latents, *args, **kwargs)

    monkeypatch.setattr(pipe.vae, "decode", keep)
    with torch.no_grad():
        image = pipe([label], guidance_scale=GUIDANCE, num_inference_steps=STEPS, output_type="np").images[0]
    return seen[0].numpy(), image


def test_scheduler_comes_from_the_folder(dit_set):
    pipeline = Pipeline.from_directory(dit_set)
    config = pipeline.meta["scheduler_config"]
    assert {k: config[k] for k in DIT_BETAS} == DIT_BETAS
    assert pipeline.conditioner is None and pipeline.meta["null_class_label"] == 1000


@pytest.mark.parametrize("label", [207, 0])
def test_class_pipeline_equals_diffusers(dit, dit_set, monkeypatch, label):
    _, pipe = dit
    init = np.random.default_rng(3).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    result = Pipeline.from_directory(dit_set).generate(
        {"class_labels": np.array([label])},
        sampler="dpmpp-2m",
        steps=STEPS,
        guidance_scale=GUIDANCE,
        latents=init,
    )
    ref_latents, ref_image = _diffusers_latents(pipe, monkeypatch, init, label)
    rel = np.linalg.norm(result.latents - ref_latents) / np.linalg.norm(ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - (ref_image * 255).round().astype(int))
    print(f"label {label}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    assert rel < 1e-4
    assert pixel_diff.max() <= 1


def test_generate_cli_with_class_label(dit_set, tmp_path):
    out = tmp_path / "dit.png"
    command = [sys.executable, "-m", "edgediff", "generate", str(dit_set), "--class-label", "207"]
    command += ["--height", "64", "--width", "64", "--steps", "3", "--guidance", "4"]
    command += ["-o", str(out), "--save-latents", str(tmp_path / "lat.npy")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    api = Pipeline.from_directory(dit_set).generate(
        {"class_labels": np.array([207])}, steps=3, guidance_scale=4.0, height=64, width=64
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)
    other = Pipeline.from_directory(dit_set).generate(
        {"class_labels": np.array([3])}, steps=3, guidance_scale=4.0
    )
    assert not np.array_equal(other.latents, api.latents)  # the label is used
