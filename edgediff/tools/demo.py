"""``make demo``: compile the project's trained text-to-image model, check it against diffusers, draw a grid.

Run as ``python -m edgediff.tools.demo --output demo-out``. The model is ``models/tiny-shapes-t2i`` (a tiny
Stable-Diffusion-style pipeline trained by ``scripts/train_tiny_t2i.py`` on colored shapes). The demo

1. compiles its UNet, VAE decoder and CLIP text encoder (plus the tokenizer) into an artifact set for the
   host and the same set for ``arm-a78`` (``compile_pipeline``, as ``edgediff compile-pipeline`` does);
2. runs one prompt through the compiled host set and through diffusers' ``StableDiffusionPipeline`` from the
   same initial noise with the same sampler, and reports how far the final latents differ;
3. generates a few prompts at a few seeds through the compiled host set, reads each picture with the
   independent checker (``edgediff.tools.shapes``) and writes ``grid.png`` (captions, green mark = the
   checker reads the prompt) and ``report.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "models" / "tiny-shapes-t2i"
CROSS_TARGET = "arm-a78"
PROMPTS = (
    "a red circle at the top left",
    "a green square in the center",
    "a blue triangle at the bottom right",
    "a yellow circle at the top right",
    "a blue square",
    "a red triangle at the bottom left",
    "a green circle at the bottom right",
    "a yellow square in the center",
)
SEEDS = (0, 1)
SAMPLER, STEPS, GUIDANCE = "dpmpp-2m", 20, 7.5  # edgediff generate's defaults


def diffusers_latents(model: Path, prompt: str, noise: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    """The final latents diffusers' StableDiffusionPipeline makes from ``noise`` (its saved scheduler, which
    is DPM-Solver++ 2M for the shapes model: the runtime's ``dpmpp-2m`` reads the same config)."""
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        out = pipe(
            prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.from_numpy(noise),
            output_type="latent",
        )
    return out.images.numpy()


def compare_with_diffusers(model: Path, pipeline, prompt: str, seed: int = 0) -> float:
    """Max abs difference of the final latents (compiled host set vs diffusers), relative to their max."""
    noise = np.random.default_rng(seed).standard_normal(pipeline.latent_shape).astype(np.float32)
    ours = pipeline.generate(
        prompt=prompt, latents=noise, sampler=SAMPLER, steps=STEPS, guidance_scale=GUIDANCE, decode=False
    ).latents
    theirs = diffusers_latents(model, prompt, noise, STEPS, GUIDANCE)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def generate_grid(pipeline, prompts=PROMPTS, seeds=SEEDS, steps: int = STEPS) -> tuple[list, list, list]:
    """(images, captions, checker verdicts) of every prompt at every seed through ``pipeline``."""
    from edgediff.tools.shapes import ShapeChecker

    checker = ShapeChecker()
    images, captions, verdicts = [], [], []
    for seed in seeds:
        for prompt in prompts:
            result = pipeline.generate(
                prompt=prompt, sampler=SAMPLER, steps=steps, guidance_scale=GUIDANCE, seed=seed
            )
            images.append(result.image)
            captions.append(prompt)
            verdicts.append(checker.matches(result.image, prompt))
    return images, captions, verdicts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo-out", help="directory for the artifacts and the report")
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="diffusers text-to-image pipeline folder")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from edgediff import compile_pipeline
    from edgediff.errors import ModelNotFoundError
    from edgediff.runtime.pipeline import Pipeline
    from edgediff.tools.shapes import labelled_grid

    model, out = Path(args.model), Path(args.output)
    if not (model / "model_index.json").is_file():
        raise ModelNotFoundError(f"demo model folder {model} has no model_index.json")
    lines = ["edgediff demo report", "====================", f"model: {model}"]
    sets = {}
    for target in ("host", CROSS_TARGET):
        start = time.perf_counter()
        sets[target] = compile_pipeline(model, model, model, target=target, output_dir=out / target, batch=2)
        lines.append(
            f"  {target:8s} artifact set {sets[target]} ({time.perf_counter() - start:.1f} s to compile)"
        )
    for role in ("denoiser", "decoder", "text_encoder"):
        from edgediff.runtime.artifact import read_manifest

        library = read_manifest(sets[CROSS_TARGET] / role)["library"]
        compiler = library.get("compiler") or "no cross compiler"
        lines.append(f"    {CROSS_TARGET} {role}: {library['format']}, {compiler}")

    pipeline = Pipeline.from_directory(sets["host"])
    err = compare_with_diffusers(model, pipeline, PROMPTS[0])
    lines += [
        "",
        f"compiled host set vs diffusers StableDiffusionPipeline ('{PROMPTS[0]}', same noise, {SAMPLER} x "
        f"{STEPS}, guidance {GUIDANCE}): final latents differ by {err:.2e} (max abs, relative to max)",
    ]
    if err > 1e-4:
        lines.append(f"  FAILED: difference {err:.2e} above 1e-4")

    start = time.perf_counter()
    images, captions, verdicts = generate_grid(pipeline)
    seconds = time.perf_counter() - start
    grid_path = out / "grid.png"
    labelled_grid(images, captions, verdicts).save(grid_path)
    from edgediff.runtime.image import write_png

    write_png(out / "image.png", images[PROMPTS.index("a blue square")])
    rate = sum(verdicts) / len(verdicts)
    from edgediff.tools.shapes import ShapeChecker, parse_caption

    checker = ShapeChecker()
    reads = [(parse_caption(c), checker.read(im)) for c, im in zip(captions, images, strict=True)]
    parts = {
        part: sum(got is not None and getattr(got, part) == getattr(want, part) for want, got in reads)
        / len(reads)
        for part in ("color", "shape")
    }
    lines += [
        "",
        f"generation: {len(PROMPTS)} prompts x seeds {list(SEEDS)}, {SAMPLER} x {STEPS}, "
        f"guidance {GUIDANCE}, "
        f"{images[0].shape[1]}x{images[0].shape[0]} ({seconds / len(images):.2f} s per image)",
        f"  grid            {grid_path} (green mark: the checker reads the prompt)",
        f"  image           {out / 'image.png'} ('a blue square', seed {SEEDS[0]})",
        f"  recognised      {sum(verdicts)}/{len(verdicts)} = {rate:.0%} (edgediff.tools.shapes checker: hue,"
        " mask moments, centroid)",
        f"  by part         color {parts['color']:.0%}, shape {parts['shape']:.0%}",
    ]
    for caption, ok in zip(captions, verdicts, strict=True):
        if not ok:
            lines.append(f"    not recognised: {caption}")
    report = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(report)
    print(report)
    print(f"report written to {out / 'report.txt'}")
    return 1 if "FAILED" in report else 0


if __name__ == "__main__":
    sys.exit(main())
