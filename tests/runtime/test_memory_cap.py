"""Memory-capped generation: the plan (per-stage loading, tiled decode), seam-free tile blending, the tiled
decode's error against the untiled one, the cap errors, and the command line (``--max-memory``, ``--lora``,
``inspect``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.errors import InputError
from edgediff.runtime.memory import Footprint, make_plan, parse_bytes, tile_starts, tiled_decode
from edgediff.runtime.pipeline import Pipeline

LATENT, TILE = 16, 8


@pytest.fixture(scope="module")
def artifact_set(tmp_path_factory):
    """The tiny pipeline with a decoder for the full latents and one for 8x8 latent tiles."""
    from edgediff import compile_pipeline

    root = tmp_path_factory.mktemp("memcap") / "set"
    compile_pipeline(
        "tiny-sd15-unet",
        "tiny-vae-decoder",
        target="host",
        output_dir=root,
        batch=1,
        progress=False,
        decoder_tile=TILE,
    )
    return root


def _embeds(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 8, 32)).astype(np.float32)


def test_manifest_records_the_planned_workspace(artifact_set):
    manifest = json.loads((artifact_set / "decoder" / "manifest.json").read_text())
    memory = manifest["memory"]
    assert memory["workspace_bytes"] > 0 and memory["storage_blocks"] > 0
    assert memory["kernel_scratch_bytes"] is not None
    assert memory["weights_bytes"] == manifest["weights"]["bytes"]
    tile = json.loads((artifact_set / "decoder_tile" / "manifest.json").read_text())
    # a quarter of the pixels: the tile decoder plans less activation storage than the full one
    assert tile["memory"]["workspace_bytes"] < memory["workspace_bytes"]
    unet = json.loads((artifact_set / "denoiser" / "manifest.json").read_text())
    assert unet["memory"]["attention"]["fused_sites"] > 0
    assert unet["weights"]["transforms"]  # the kernels behind each precomputed weight, for LoRA merging


def test_tile_blending_is_seamless_for_a_local_decoder():
    """A decoder without global operations (pointwise + 8x upsampling) gives the same pixels tiled or not:
    any seam would come from the blending."""

    def decode(z: np.ndarray) -> np.ndarray:
        pixels = np.tanh(z[:, :3] * 1.7 + z[:, 3:4])
        return pixels.repeat(8, axis=2).repeat(8, axis=3)

    z = np.random.default_rng(0).standard_normal((1, 4, 20, 28)).astype(np.float32)
    for tile, overlap in ((8, 2), (8, 4), (12, 3), (20, 5)):
        np.testing.assert_allclose(tiled_decode(decode, z, tile, overlap), decode(z), atol=1e-6)
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(16, 8, 2) == [0, 4, 8]  # three tiles are needed: spread, they overlap by 4
    assert tile_starts(8, 8, 2) == [0]


def test_tiled_decode_against_untiled(artifact_set):
    pipeline = Pipeline.from_directory(artifact_set)
    latents = np.random.default_rng(3).standard_normal((1, 4, LATENT, LATENT)).astype(np.float32)
    full = pipeline.decode(latents)
    tiled = pipeline.decode(latents, tiled=True)
    assert tiled.shape == full.shape
    error = np.abs(tiled - full)
    # the tiny VAE's GroupNorm and mid-block attention see one tile at a time (random weights make it
    # sensitive to that): the tiled image follows the untiled one, with no seams
    correlation = np.corrcoef(tiled.ravel(), full.ravel())[0, 1]
    print(
        f"tiled vs untiled decode: max {error.max():.4f}, mean {error.mean():.5f} "
        f"(mean |output| {np.abs(full).mean():.4f}), correlation {correlation:.4f}"
    )
    assert correlation > 0.9
    assert error.mean() < 0.5 * np.abs(full).mean()
    # no seam: the error at the tile borders is no larger than elsewhere
    borders = [s * 8 for s in tile_starts(LATENT, TILE, 2)[1:]] + [(s + TILE) * 8 - 1 for s in [0, 4]]
    assert error[..., borders, :].mean() < 1.5 * error.mean()
    assert error[..., :, borders].mean() < 1.5 * error.mean()


def test_capped_run_loads_per_stage_and_matches_the_uncapped_run(artifact_set):
    reference = Pipeline.from_directory(artifact_set).generate(_embeds(), steps=3, guidance_scale=1.0)
    capped = Pipeline.from_directory(artifact_set, max_memory="100GB")
    assert capped.memory_plan.resident and not capped.memory_plan.tiled_decode
    stages = capped.memory_plan.stages
    # a cap that holds one model at a time and the full decoder, but not all models together (the
    # baseline is fixed: the test process's own RSS moves by more than these tiny models weigh)
    fixed = 500_000_000
    base = capped.set_memory_cap("100GB", baseline=fixed).baseline  # plus the loop's own arrays
    capped.set_memory_cap(base + max(stages["denoiser"].total, stages["decoder"].total), baseline=fixed)
    assert not capped.denoiser.loaded and not capped.decoder.loaded  # nothing loaded before its stage
    seen = []
    result = capped.generate(
        _embeds(), steps=3, guidance_scale=1.0, callback=lambda i, n: seen.append(capped.decoder.loaded)
    )
    plan = result.memory_plan
    assert not plan.resident and not plan.tiled_decode
    assert seen and not any(seen)  # the decoder was not loaded while the denoiser ran
    assert not capped.denoiser.loaded and not capped.decoder.loaded  # released after the run
    np.testing.assert_array_equal(result.latents, reference.latents)
    np.testing.assert_array_equal(result.image, reference.image)
    assert result.peak_rss > 0


def test_cap_below_the_full_decoder_decodes_in_tiles(artifact_set):
    manifests = {
        role: json.loads((artifact_set / role / "manifest.json").read_text())
        for role in ("denoiser", "decoder", "decoder_tile")
    }
    # a decoder whose activations dwarf the denoiser, as SD's VAE at 512x512 does (the tiny one does not)
    manifests["decoder"]["memory"]["workspace_bytes"] = 50_000_000
    manifests["decoder_tile"]["memory"]["workspace_bytes"] = 12_500_000
    baseline = 500_000_000
    everything = make_plan(manifests, None, baseline=baseline)
    stages, process = everything.stages, everything.baseline  # the process: baseline + a run's own objects
    cap = process + max(stages["denoiser"].total, stages["decoder_tile"].total)
    plan = make_plan(manifests, cap, baseline=baseline)
    assert plan.tiled_decode and not plan.resident and plan.peak_estimate <= cap
    roomy = make_plan(manifests, process + stages["decoder"].total, baseline=baseline)
    assert not roomy.tiled_decode and not roomy.resident
    assert make_plan(manifests, baseline + 10**9, baseline=baseline).resident
    del manifests["decoder_tile"]
    with pytest.raises(InputError, match=r"smallest footprint.*decoder 5[0-9.]+ MB.*--decoder-tile"):
        make_plan(manifests, cap, baseline=baseline)


def test_cap_below_the_smallest_footprint_says_what_it_is(artifact_set):
    # the footprint includes this process (a test run's is over 1 GB): MB or GB
    footprint = r"below the smallest footprint of this pipeline, [0-9.]+ [MG]B \(process .*denoiser"
    with pytest.raises(InputError, match=footprint):
        Pipeline.from_directory(artifact_set, max_memory="1MB")
    with pytest.raises(InputError, match="cannot read '1.5 GBs' as a size"):
        parse_bytes("1.5 GBs")
    assert parse_bytes("1.5GB") == 1_500_000_000 and parse_bytes("1GiB") == 2**30


def test_footprint_of_an_artifact_without_a_recorded_plan(artifact_set):
    manifest = json.loads((artifact_set / "decoder" / "manifest.json").read_text())
    del manifest["memory"]
    footprint = Footprint.of(manifest)
    assert not footprint.measured and footprint.workspace > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgediff", *args], capture_output=True, text=True, timeout=600
    )


def test_command_line_lora_memory_cap_and_inspect(artifact_set, tmp_path):
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{layer}.lora_down.weight": rng.standard_normal((2, 16)).astype(np.float32),
            f"{layer}.lora_up.weight": rng.standard_normal((16, 2)).astype(np.float32),
            f"{layer}.alpha": np.array(1.0, np.float32),
        },
        str(tmp_path / "style.safetensors"),
    )
    np.save(tmp_path / "c.npy", _embeds())
    common = ["generate", str(artifact_set), "--prompt-embeds", str(tmp_path / "c.npy"), "--guidance", "1"]
    common += ["--steps", "2", "-q", "-o", str(tmp_path / "x.png")]
    done = _cli(
        *common, "--lora", str(tmp_path / "style.safetensors"), "--lora-scale", "0.8", "--max-memory", "8GB"
    )
    assert done.returncode == 0, done.stderr
    assert "merged 1 denoiser layers" in done.stdout
    assert "memory plan: cap 8.00 GB" in done.stdout
    assert "peak RSS" in done.stdout and "under the cap of 8.00 GB" in done.stdout

    low = _cli(*common, "--max-memory", "1MB")
    assert low.returncode == 1
    assert "below the smallest footprint of this pipeline" in low.stderr

    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 4)
    bad = _cli(*common, "--lora", str(tmp_path / "bad.safetensors"))
    assert bad.returncode == 1 and "cannot read LoRA file" in bad.stderr

    shown = _cli("inspect", str(artifact_set / "denoiser"))
    assert shown.returncode == 0, shown.stderr
    assert "memory    " in shown.stdout and "workspace" in shown.stdout
    assert "take a LoRA at load time" in shown.stdout
    whole = _cli("inspect", str(artifact_set))
    assert whole.returncode == 0, whole.stderr
    assert "smallest footprint under --max-memory" in whole.stdout and "tiled decode" in whole.stdout
