"""Several resolutions in one artifact (issue #9): one entry per resolution, one copy of the weights."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
import torch

from edgediff import compile_model, zoo
from edgediff.errors import InputError
from edgediff.frontend.multires import parse_resolutions, resolution_inputs
from edgediff.runtime.artifact import Artifact, CompiledModule
from edgediff.runtime.pipeline import Pipeline

# tiny-sd15-unet's native size is latent 16 (128 px); 192x128 is a non-square second entry (latent 24x16)
UNET_SIZES = [(128, 128), (192, 128)]


@pytest.fixture(scope="module")
def unet_multi(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    out = tmp_path_factory.mktemp("multires") / "unet"
    return compile_model("tiny-sd15-unet", output_dir=out, progress=False, resolutions=UNET_SIZES)


@pytest.fixture(scope="module")
def vae_multi(tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    # Winograd forced on every eligible conv: its compile-time weight transform must be stored once for
    # both entries
    out = tmp_path_factory.mktemp("multires") / "vae"
    return compile_model(
        "tiny-vae-decoder",
        output_dir=out,
        progress=False,
        resolutions="128x128,192x128",
        pass_options={"winograd-conv2d": {"variant": 2}},
    )


def _check_against_torch(artifact: Artifact, name: str, sizes: list[tuple[int, int]]) -> None:
    module = artifact.load()
    zm = zoo.build(name)
    for size in sizes:
        inputs = resolution_inputs(zm, size, seed=7)
        with torch.no_grad():
            expected = zm.module(*inputs).numpy()
        got = module(*inputs)
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4, err_msg=f"{name} at {size}")


def test_unet_entries_match_torch(unet_multi: Artifact) -> None:
    _check_against_torch(unet_multi, "tiny-sd15-unet", UNET_SIZES)


def test_unet_shares_weights_and_grows_by_code(
    unet_multi: Artifact, compiled: Callable[..., Artifact]
) -> None:
    single = compiled("tiny-sd15-unet", "host")  # the specialised 128x128 build
    multi, one = unet_multi.manifest, single.manifest
    assert multi["weights"]["bytes"] == one["weights"]["bytes"]
    assert [t["name"] for t in multi["weights"]["tensors"]] == [t["name"] for t in one["weights"]["tensors"]]
    assert multi["library"]["bytes"] > one["library"]["bytes"]
    assert [r["function"] for r in multi["resolutions"]] == ["main", "main_192x128"]
    assert multi["inputs"] == multi["resolutions"][0]["inputs"]  # the default entry's, as before


def test_wrong_resolution_lists_the_compiled_ones(unet_multi: Artifact) -> None:
    module = unet_multi.load()
    zm = zoo.build("tiny-sd15-unet")
    with pytest.raises(InputError, match=r"128x128.*192x128"):
        module(*resolution_inputs(zm, (128, 192)))
    with pytest.raises(InputError, match=r"not compiled for 256x256.*128x128, 192x128"):
        module.entry_for(256, 256)
    assert module.entry_for(192).function == "main_192x128"  # width defaults to the default entry's


def test_inspect_shows_resolutions(unet_multi: Artifact) -> None:
    text = unet_multi.describe()
    assert "resolutions 2" in text
    assert "192x128 (sample: float32[1, 4, 24, 16])" in text and "main_192x128" in text
    manifest = unet_multi.manifest
    per_entry = [r["kernels"] for r in manifest["resolutions"]]
    # the time embedding and the text projections are the same at every size: kept once
    assert max(per_entry) < manifest["library"]["kernels"] < sum(per_entry)
    assert f"{sum(per_entry) - manifest['library']['kernels']} kernels shared by entries" in text


def test_single_resolution_artifact_still_loads(compiled: Callable[..., Artifact]) -> None:
    single = compiled("tiny-sd15-unet", "host")
    assert "resolutions" not in single.manifest
    module = single.load()
    assert [e.function for e in module.entries] == ["main"]
    assert module.resolutions == [(128, 128)]  # from the latent and the VAE scale factor
    assert "resolution 128x128" in single.describe()
    zm = zoo.build("tiny-sd15-unet")
    assert module(*zm.example_inputs).shape == (1, 4, 16, 16)
    with pytest.raises(InputError, match="not compiled for 192x128"):
        module.entry_for(192, 128)


def test_vae_winograd_weights_stored_once(vae_multi: Artifact) -> None:
    _check_against_torch(vae_multi, "tiny-vae-decoder", [(128, 128), (192, 128)])
    manifest = vae_multi.manifest
    names = [t["name"] for t in manifest["weights"]["tensors"]]
    assert len(names) == len(set(names))
    assert any(name.endswith(":winograd_weight") for name in names)
    summaries = [
        p["summary"] for r in manifest["resolutions"] for p in r["passes"] if p["name"] == "winograd-conv2d"
    ]
    assert len(summaries) == 2 and summaries[0].split(" (")[0] == summaries[1].split(" (")[0]


def test_pipeline_chooses_resolution(unet_multi: Artifact, vae_multi: Artifact) -> None:
    pipeline = Pipeline(CompiledModule(unet_multi.path), CompiledModule(vae_multi.path))
    cond = np.random.default_rng(0).standard_normal((1, 8, 32)).astype(np.float32)
    default = pipeline.generate(cond, steps=2, guidance_scale=1.0)
    assert default.image.shape == (128, 128, 3)
    tall = pipeline.generate(cond, steps=2, guidance_scale=1.0, height=192, width=128)
    assert tall.latents.shape == (1, 4, 24, 16) and tall.image.shape == (192, 128, 3)
    with pytest.raises(InputError, match=r"not compiled for 128x192.*compiled for 128x128, 192x128"):
        pipeline.generate(cond, steps=2, guidance_scale=1.0, height=128, width=192)


def test_dit_square_resolutions(tmp_path) -> None:
    artifact = compile_model("tiny-dit", output_dir=tmp_path / "dit", progress=False, resolutions=[64, 96])
    _check_against_torch(artifact, "tiny-dit", [(64, 64), (96, 96)])
    with pytest.raises(InputError, match="DiT takes square resolutions only"):
        compile_model("tiny-dit", output_dir=tmp_path / "bad", progress=False, resolutions=["96x64"])


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("512x512,768x512", [(512, 512), (768, 512)]),
        ([(512, 768), "512x512", 512], [(512, 768), (512, 512)]),
        ((768, 512), [(768, 512)]),
    ],
)
def test_parse_resolutions(value: object, expected: list[tuple[int, int]]) -> None:
    assert parse_resolutions(value) == expected


@pytest.mark.parametrize("value", ["512x", "0x512", "axb", []])
def test_parse_resolutions_rejects(value: object) -> None:
    with pytest.raises(InputError):
        parse_resolutions(value)


def test_bad_resolution_requests(tmp_path) -> None:
    with pytest.raises(InputError, match="not a multiple of 8"):
        compile_model("tiny-sd15-unet", output_dir=tmp_path / "a", progress=False, resolutions=["100x128"])
    with pytest.raises(InputError, match="zoo models and diffusers folders"):
        compile_model(
            torch.nn.Linear(4, 4), output_dir=tmp_path / "b", progress=False, resolutions=[(64, 64)]
        )
    with pytest.raises(InputError, match="not both"):
        compile_model(
            "tiny-sd15-unet", output_dir=tmp_path / "c", progress=False, resolutions=[64], latent_size=8
        )


def test_cli_compile_and_generate_accept_resolutions() -> None:
    from edgediff.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["compile", "--model", "m", "-o", "x", "--resolutions", "512x512,768x512"])
    assert args.resolutions == "512x512,768x512"
    args = parser.parse_args(["compile-pipeline", "--denoiser", "m", "-o", "x", "--resolutions", "768x512"])
    assert args.resolutions == "768x512"
    args = parser.parse_args(["generate", "set", "--height", "768", "--width", "512"])
    assert (args.height, args.width) == (768, 512)


def test_manifest_is_json_with_resolutions(unet_multi: Artifact) -> None:
    manifest = json.loads((unet_multi.path / "manifest.json").read_text())
    assert [(r["height"], r["width"]) for r in manifest["resolutions"]] == UNET_SIZES
    assert manifest["model"]["meta"]["latent_size"] == 16


def test_quantized_weights_shared(unet_multi: Artifact, host_int8, tmp_path) -> None:
    """precision= with resolutions: the plan is measured at the first size and applied to every entry
    (its attention layers found at each size's token counts); the int8 weights are stored once."""
    artifact = compile_model(
        "tiny-sd15-unet",
        target=host_int8,
        output_dir=tmp_path / "w8",
        progress=False,
        precision="w8",
        resolutions=UNET_SIZES,
    )
    assert artifact.manifest["weights"]["bytes"] < unet_multi.manifest["weights"]["bytes"] / 3
    module = artifact.load()
    zm = zoo.build("tiny-sd15-unet")
    for size in UNET_SIZES:
        inputs = resolution_inputs(zm, size, seed=7)
        with torch.no_grad():
            expected = zm.module(*inputs).numpy()
        assert np.abs(module(*inputs) - expected).max() < 0.05 * np.abs(expected).max()
