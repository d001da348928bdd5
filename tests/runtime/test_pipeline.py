"""The compiled pipeline against the same pipeline in PyTorch (diffusers modules + diffusers scheduler)."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler

from edgediff.errors import InputError
from edgediff.runtime.pipeline import Pipeline
from edgediff.runtime.samplers import SamplerError

LATENT = 16  # the tiny UNet's latent size; the decoder is compiled for the same
GUIDANCE = 5.0


@pytest.fixture(scope="session")
def artifact_set(compiled, tmp_path_factory):
    """denoiser/ (batch 2: one-call CFG), denoiser_b1/ (two-call CFG) and decoder/ for the tiny pipeline."""
    from edgediff import compile_model

    root = tmp_path_factory.mktemp("pipeline")
    compile_model(
        "tiny-sd15-unet", target="host", batch=2, output_dir=root / "set" / "denoiser", progress=False
    )
    compile_model(
        "tiny-vae-decoder",
        target="host",
        latent_size=LATENT,
        output_dir=root / "set" / "decoder",
        progress=False,
    )
    batch1 = compiled("tiny-sd15-unet", "host").path
    return root / "set", batch1


@pytest.fixture(scope="session")
def torch_modules():
    from edgediff import zoo

    return zoo.build("tiny-sd15-unet").module, zoo.build("tiny-vae-decoder", latent_size=LATENT).module


def _conditioning(seed: int = 1):
    rng = np.random.default_rng(seed)
    cond = rng.standard_normal((1, 8, 32)).astype(np.float32)
    uncond = rng.standard_normal((1, 8, 32)).astype(np.float32) * 0.1
    return cond, uncond


def _torch_pipeline(unet, decoder, scheduler, steps, init, cond, uncond):
    """What a diffusers text-to-image pipeline does, on the torch modules."""
    scheduler.set_timesteps(steps)
    latents = torch.from_numpy(init) * scheduler.init_noise_sigma
    embeds = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out = unet(model_in, t.reshape(1).expand(2).to(torch.float32), embeds)
            out_uncond, out_cond = out.chunk(2)
            guided = out_uncond + GUIDANCE * (out_cond - out_uncond)
            latents = scheduler.step(guided, t, latents).prev_sample
        image = decoder(latents)
    image_u8 = ((image[0].numpy() / 2 + 0.5).clip(0, 1).transpose(1, 2, 0) * 255).round().astype(np.uint8)
    return latents.numpy(), image[0].numpy(), image_u8


SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


@pytest.mark.parametrize(
    ("sampler", "scheduler"),
    [
        ("dpmpp-2m", lambda: DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++")),
        ("euler", lambda: EulerDiscreteScheduler(**SD_BETAS)),
    ],
)
@pytest.mark.parametrize("cfg_batch", [2, 1])
def test_compiled_pipeline_equals_torch_pipeline(artifact_set, torch_modules, sampler, scheduler, cfg_batch):
    set_dir, batch1 = artifact_set
    pipeline = (
        Pipeline.from_directory(set_dir)
        if cfg_batch == 2
        else Pipeline.from_artifacts(batch1, set_dir / "decoder")
    )
    assert pipeline.batch == cfg_batch
    cond, uncond = _conditioning()
    init = np.random.default_rng(7).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    steps = 6
    result = pipeline.generate(
        cond, negative=uncond, sampler=sampler, steps=steps, guidance_scale=GUIDANCE, latents=init
    )
    ref_latents, ref_image, ref_u8 = _torch_pipeline(*torch_modules, scheduler(), steps, init, cond, uncond)
    rel = np.linalg.norm(result.latents - ref_latents) / np.linalg.norm(ref_latents)
    pixel_diff = np.abs(result.image.astype(int) - ref_u8.astype(int))
    print(f"{sampler} cfg-batch {cfg_batch}: latent rel err {rel:.2e}, max pixel diff {pixel_diff.max()}")
    # Stated tolerance: final latents within 1e-4 relative; 8-bit pixels within 1 level (rounding at .5).
    assert rel < 1e-4
    assert pixel_diff.max() <= 1
    assert len(result.timings.steps) == steps and len(result.timings.model) == steps


def test_seeded_runs_are_bit_reproducible(artifact_set):
    set_dir, _ = artifact_set
    pipeline = Pipeline.from_directory(set_dir)
    cond, uncond = _conditioning()
    kwargs = {"negative": uncond, "sampler": "euler-a", "steps": 4, "guidance_scale": GUIDANCE}
    first = pipeline.generate(cond, seed=3, **kwargs)
    again = pipeline.generate(cond, seed=3, **kwargs)
    other = pipeline.generate(cond, seed=4, **kwargs)
    np.testing.assert_array_equal(first.latents, again.latents)
    np.testing.assert_array_equal(first.image, again.image)
    assert not np.array_equal(first.latents, other.latents)


def test_guidance_one_runs_without_negative(artifact_set):
    set_dir, batch1 = artifact_set
    cond, _ = _conditioning()
    for pipeline in (Pipeline.from_directory(set_dir), Pipeline.from_artifacts(batch1)):
        result = pipeline.generate(cond, sampler="ddim", steps=2, guidance_scale=1.0, seed=0)
        assert result.latents.shape == (1, 4, LATENT, LATENT)
    # the batch-2 build without guidance runs the conditional branch: same latents as the batch-1 build
    a = Pipeline.from_directory(set_dir).generate(cond, sampler="ddim", steps=2, guidance_scale=1.0, seed=0)
    b = Pipeline.from_artifacts(batch1).generate(cond, sampler="ddim", steps=2, guidance_scale=1.0, seed=0)
    np.testing.assert_allclose(a.latents, b.latents, rtol=1e-5, atol=1e-5)
    assert b.image is None


def test_bad_input(artifact_set):
    set_dir, _ = artifact_set
    pipeline = Pipeline.from_directory(set_dir)
    cond, uncond = _conditioning()
    with pytest.raises(InputError, match="latents have shape"):
        pipeline.generate(cond, negative=uncond, steps=2, latents=np.zeros((1, 4, 8, 8), np.float32))
    with pytest.raises(SamplerError, match="flow-euler.*prediction_type='epsilon'"):
        pipeline.generate(cond, negative=uncond, sampler="flow-euler", steps=2)
    with pytest.raises(SamplerError, match="at least 1"):
        pipeline.generate(cond, negative=uncond, steps=0)
    with pytest.raises(SamplerError, match="unknown sampler 'nope'.*dpmpp-2m"):
        pipeline.generate(cond, negative=uncond, sampler="nope", steps=2)
    with pytest.raises(InputError, match="needs negative conditioning"):
        pipeline.generate(cond, steps=2)
    with pytest.raises(InputError, match=r"'encoder_hidden_states' has shape \[1, 9, 32\]"):
        pipeline.generate(np.zeros((1, 9, 32), np.float32), negative=uncond, steps=2)


def test_decoder_latent_mismatch_is_refused(artifact_set, compiled):
    set_dir, _ = artifact_set
    small_decoder = compiled("tiny-vae-decoder", "host").path  # latent 8, the UNet makes 16
    with pytest.raises(InputError, match=r"takes latents \[1, 4, 8, 8\].*produces \[1, 4, 16, 16\]"):
        Pipeline.from_artifacts(set_dir / "denoiser", small_decoder)


def _cli(*args, **kwargs):
    return [sys.executable, "-m", "edgediff", *args]


def test_generate_cli_writes_png_and_timings(artifact_set, tmp_path):
    set_dir, _ = artifact_set
    cond, uncond = _conditioning()
    np.save(tmp_path / "pe.npy", cond)
    np.save(tmp_path / "ne.npy", uncond)
    out = tmp_path / "img.png"
    result = subprocess.run(
        _cli(
            "generate",
            str(set_dir),
            "--prompt-embeds",
            str(tmp_path / "pe.npy"),
            "--negative-prompt-embeds",
            str(tmp_path / "ne.npy"),
            "--sampler",
            "unipc",
            "--steps",
            "3",
            "--seed",
            "1",
            "-o",
            str(out),
            "--profile",
            "--save-latents",
            str(tmp_path / "lat.npy"),
        ),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    for fragment in ("denoiser", "decoder", "total", "runtime overhead", "inside the compiled model"):
        assert fragment in result.stdout
    # the CLI run equals the API run with the same seed
    api = Pipeline.from_directory(set_dir).generate(
        cond, negative=uncond, sampler="unipc", steps=3, seed=1, guidance_scale=7.5
    )
    np.testing.assert_array_equal(np.load(tmp_path / "lat.npy"), api.latents)


def test_generate_cli_bad_input(artifact_set, tmp_path):
    set_dir, _ = artifact_set
    np.save(tmp_path / "pe.npy", np.zeros((1, 8, 32), np.float32))
    cases = [
        (("--steps", "0"), "at least 1"),
        (("--sampler", "flow-euler", "--guidance", "1"), "flow-euler"),
        (("--prompt", "a cat"), "text encoder"),
    ]
    for extra, fragment in cases:
        result = subprocess.run(
            _cli("generate", str(set_dir), "--prompt-embeds", str(tmp_path / "pe.npy"), *extra),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 1 and fragment in result.stderr and "Traceback" not in result.stderr


def _read_until(fd: int, pattern: str, timeout: float) -> str:
    """Read a pseudo-terminal until the regex `pattern` shows up: tests wait on progress, not on the clock."""
    seen = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed its end
                break
            seen += chunk.decode(errors="replace")
            if re.search(pattern, seen):
                return seen
    raise AssertionError(f"no {pattern!r} within {timeout} s; the terminal showed: {seen[-500:]!r}")


def test_ctrl_c_exits_cleanly_without_a_partial_png(artifact_set, tmp_path):
    set_dir, _ = artifact_set
    np.save(tmp_path / "pe.npy", np.zeros((1, 8, 32), np.float32))
    out = tmp_path / "never.png"
    # stderr on a pseudo-terminal draws the progress bar: the interrupt is sent once steps are running,
    # whatever the machine's speed
    terminal, child_side = pty.openpty()
    # a fresh pty is 0 columns wide, and tqdm draws nothing on a zero-width terminal
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen(
        _cli(
            "generate",
            str(set_dir),
            "--prompt-embeds",
            str(tmp_path / "pe.npy"),
            "--guidance",
            "1",
            "--steps",
            "1000",
            "--sampler",
            "ddim",
            "-o",
            str(out),
            "--save-latents",
            str(tmp_path / "l.npy"),
        ),
        stdout=subprocess.PIPE,
        stderr=child_side,
        text=True,
        # Ctrl-C in a terminal reaches a process whose SIGINT is at its default; the test runner's may be
        # ignored (a pytest-xdist worker, or a run started in the background), and an ignored SIGINT is
        # inherited and kept ignored by Python
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    os.close(child_side)
    try:
        _read_until(terminal, r"\b[1-9]\d*/1000\b", timeout=300)
        assert process.poll() is None, "generation finished before it could be interrupted"
        os.kill(process.pid, signal.SIGINT)
        # drain the terminal while the child winds down: a full pty buffer would block its last writes
        stderr = _read_until(terminal, r"interrupted", timeout=120)
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
        os.close(terminal)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    assert list(tmp_path.glob("*.png")) == [] and not list(tmp_path.glob(".never*"))
