"""Quality on trained weights: the project's own text-to-image model (models/tiny-shapes-t2i) through the
compiled pipeline, each build read by the independent shapes checker beside its latent PSNR.

Tables (``--tables``):

- ``precision``: the denoiser rebuilt at each precision plan (fp32, fp16, w8, int8, w4, edges, auto as in
  ``benchmarks/precision.py``; the ``host`` spec with int8 added so int8 builds run here), calibrated on the
  model's real prompt embeddings. For every plan: weights size, the PSNR of the final latents (20-step
  DPM-Solver++ 2M, guidance 7.5, ``tools.shapes.EVAL_PROMPTS`` x seeds 0 and 1) against the fp32 build's
  (which equals diffusers' within 1e-4, tests/runtime/test_trained_model.py), and the share of pictures
  showing the whole prompt, its color, shape and place.
- ``linear-attention``: the denoiser compiled with
  ``linear_attention={"feature_map": ..., "max_error": ...}``: each attention layer's measured error and
  whether it was rewritten, and the same PSNR and recognition.
- ``tiled-vae``: the pictures decoded in overlapping 6x6-latent tiles against the whole decode: image PSNR
  and recognition.

    PYTHONPATH=. .venv/bin/python benchmarks/trained_quality.py [--tables precision linear-attention
        tiled-vae] [--model DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

MODEL = Path(__file__).resolve().parents[1] / "models" / "tiny-shapes-t2i"
PLANS = ("fp32", "fp16", "w8", "int8", "w4", "edges", "auto")
STEPS = 20
SEEDS = (0, 1)


def denoiser_model(model: Path, conditioning: np.ndarray) -> Any:
    """The UNet as compile_pipeline builds it (batch 2 for one-call guidance), with the real embeddings of
    an empty and a full prompt as its example (= calibration) conditioning instead of random ones."""
    import torch

    from edgediff import zoo

    seq_len = conditioning.shape[1]
    zm = zoo.load_local(model, subfolder="unet", batch=2, seq_len=seq_len)
    inputs = list(zm.example_inputs)
    inputs[2] = torch.from_numpy(conditioning).to(inputs[2].dtype)
    return dataclasses.replace(zm, example_inputs=tuple(inputs))


def with_denoiser(base: Path, out: Path, zm: Any, **options: Any) -> tuple[Path, Any]:
    """A copy of the artifact set ``base`` whose denoiser is compiled with ``options``."""
    from edgediff import compile_model

    shutil.copytree(base, out)
    shutil.rmtree(out / "denoiser")
    artifact = compile_model(zm, output_dir=out / "denoiser", progress=False, **options)
    return out, artifact


def pictures(root: Path, prompts: Any, steps: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(final latents, images) of every prompt x seed through the set at ``root``."""
    from edgediff.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_directory(root)
    latents, images = [], []
    for seed in SEEDS:
        for prompt in prompts:
            g = pipeline.generate(prompt=prompt, steps=steps, seed=seed)
            latents.append(g.latents)
            images.append(g.image)
    return latents, images


def rates(images: list[np.ndarray], prompts: Any) -> dict[str, float]:
    from edgediff.tools.shapes import recognition_rates

    by_key = dict(zip(((p, s) for s in SEEDS for p in prompts), images, strict=True))
    return recognition_rates(lambda p, s: by_key[p, s], prompts, SEEDS)


def psnr_all(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    from edgediff.tools.bench.quality import psnr

    return psnr(np.stack(got), np.stack(want))


def _fmt_rates(r: dict[str, float]) -> str:
    return f"{r['all']:.0%} | {r['color']:.0%} | {r['shape']:.0%} | {r['position']:.0%}"


def precision_table(base: Path, root: Path, zm: Any, reference: list[np.ndarray], prompts: Any) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from precision import note_edges, request  # benchmarks/precision.py: the same plans

    from edgediff.precision import PrecisionConfig
    from edgediff.tools.bench.quality import host_int8

    spec = host_int8()
    print(f"\n### Precision plans (target {spec.name}; latent PSNR against the fp32 build)\n")
    print("| plan | weights | of fp32 | latent PSNR dB | whole prompt | color | shape | place | formats |")
    print("|---|---|---|---|---|---|---|---|---|")
    edges: dict[str, Any] = {}
    fp32_bytes = None
    for plan in PLANS:
        mode, budget, pins = request(plan, edges)
        precision = None if mode is None else PrecisionConfig(mode=mode, budget=budget, pins=pins)
        out, artifact = with_denoiser(base, root / plan, zm, target=spec, precision=precision)
        size = artifact.manifest["weights"]["bytes"]
        fp32_bytes = fp32_bytes or size
        report = {p["name"]: p["report"] for p in artifact.manifest["passes"]}.get("mixed-precision")
        counts: dict[str, int] = {}
        if report:
            note_edges(plan, report["plan"]["layers"], size, edges)
            for layer in report["plan"]["layers"]:
                counts[layer["format"]] = counts.get(layer["format"], 0) + 1
        latents, images = pictures(out, prompts, STEPS)
        formats = ", ".join(f"{n} {f}" for f, n in sorted(counts.items())) or "all fp32"
        print(
            f"| {plan} | {size:,} | {size / fp32_bytes:.1%} | {psnr_all(latents, reference):.1f} | "
            f"{_fmt_rates(rates(images, prompts))} | {formats} |",
            flush=True,
        )


def linear_attention_table(
    base: Path, root: Path, zm: Any, reference: list[np.ndarray], prompts: Any, feature_map: str, bound: float
) -> None:
    """Per-layer errors and decisions of the measured rewrite, and the pictures of that build and of one
    with every attention layer forced linear (``fine_tuned=True`` on weights that were not: worst case)."""
    builds = {
        "measured decisions": {"feature_map": feature_map, "max_error": bound},
        "every layer linear": {"feature_map": feature_map, "fine_tuned": True},
    }
    rows = []
    for i, (build, request) in enumerate(builds.items()):
        out, artifact = with_denoiser(base, root / f"linear{i}", zm, linear_attention=request)
        passes = {p["name"]: p["report"] for p in artifact.manifest["passes"]}
        layers = passes.get("rewrite-linear-attention", {}).get("layers") or []
        if i == 0:
            print(f"\n### Linear attention ({feature_map}, max_error {bound}): per-layer decisions\n")
            print("| layer | kind | N x M | measured error | rewritten | why |\n|---|---|---|---|---|---|")
            for layer in layers:
                error = layer.get("error")
                print(
                    f"| {layer['name']} | {layer['kind']} | {layer['n']} x {layer['m']} | "
                    f"{'-' if error is None else f'{error:.4f}'} | {'yes' if layer['rewritten'] else 'no'} | "
                    f"{layer['reason']} |"
                )
        latents, images = pictures(out, prompts, STEPS)
        rewritten = sum(bool(layer["rewritten"]) for layer in layers)
        rows.append(
            f"| {build} | {rewritten} of {len(layers)} | {psnr_all(latents, reference):.1f} | "
            f"{_fmt_rates(rates(images, prompts))} |"
        )
    print("\n| build | layers linear | latent PSNR dB | whole prompt | color | shape | place |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


def tiled_vae_table(base: Path, reference: list[np.ndarray], images: list[np.ndarray], prompts: Any) -> None:
    """The fp32 pictures decoded in overlapping tiles (the ``decoder_tile/`` artifact) against whole."""
    from edgediff.runtime.image import to_uint8_image
    from edgediff.runtime.pipeline import Pipeline
    from edgediff.tools.bench.quality import psnr

    pipeline = Pipeline.from_directory(base)
    tiled = [to_uint8_image(pipeline.decode(z, tiled=True)) for z in reference]
    whole = np.stack(images).astype(np.float64)
    tile = pipeline.tile_decoder.inputs[0].shape[2]
    size = reference[0].shape[2]
    print(f"\n### Tiled VAE decode ({tile}x{tile}-latent tiles of the {size}x{size} latent) against whole\n")
    print("| decode | image PSNR dB | whole prompt | color | shape | place |\n|---|---|---|---|---|---|")
    print(f"| whole | inf | {_fmt_rates(rates(images, prompts))} |")
    error = psnr(np.stack(tiled).astype(np.float64), whole)
    print(f"| tiled | {error:.1f} | {_fmt_rates(rates(tiled, prompts))} |")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument(
        "--tables", nargs="+", default=["precision", "linear-attention", "tiled-vae"],
        choices=["precision", "linear-attention", "tiled-vae"],
    )  # fmt: skip
    parser.add_argument("--decoder-tile", type=int, default=6, help="tiled-vae: tile size in latent pixels")
    parser.add_argument("--feature-map", default="taylor2")
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--output", type=Path, help="where artifacts go (default: a temporary directory)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    from edgediff import compile_pipeline
    from edgediff.runtime.pipeline import Pipeline
    from edgediff.tools.shapes import EVAL_PROMPTS

    start = time.perf_counter()
    root = args.output or Path(tempfile.mkdtemp(prefix="edgediff-trained-"))
    model = args.model
    base = compile_pipeline(
        model, model, model, output_dir=root / "set", decoder_tile=args.decoder_tile, progress=False
    )
    pipeline = Pipeline.from_directory(base)
    conditioning = np.concatenate([pipeline.encode_prompt(""), pipeline.encode_prompt(EVAL_PROMPTS[0])])
    zm = denoiser_model(args.model, conditioning)
    reference, images = pictures(base, EVAL_PROMPTS, STEPS)
    print(
        f"{args.model.name}: {len(EVAL_PROMPTS)} prompts x seeds {SEEDS}, {STEPS}-step DPM-Solver++ 2M, "
        "guidance 7.5, through the compiled host pipeline; pictures read by tools.shapes.ShapeChecker"
    )
    if "precision" in args.tables:
        precision_table(base, root, zm, reference, EVAL_PROMPTS)
    if "linear-attention" in args.tables:
        linear_attention_table(base, root, zm, reference, EVAL_PROMPTS, args.feature_map, args.max_error)
    if "tiled-vae" in args.tables:
        tiled_vae_table(base, reference, images, EVAL_PROMPTS)
    print(f"\n({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
