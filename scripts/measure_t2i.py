"""Recognition rates of a shapes text-to-image model through the compiled host pipeline.

    PYTHONPATH=. python scripts/measure_t2i.py --model models/tiny-shapes-t2i --steps 10 20

Compiles the folder with ``compile_pipeline`` (fp32, host; ``--fp16`` rebuilds the denoiser at fp16), then
generates ``edgediff.tools.shapes.EVAL_PROMPTS`` x seeds 0 and 1 and prints the share of pictures the checker
reads as the whole prompt and as its color, shape and place; ``--grid`` writes the pictures.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/tiny-shapes-t2i"))
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--fp16", action="store_true", help="the denoiser at fp16")
    ap.add_argument("--grid", type=Path, help="PNG of the last --steps' pictures")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")

    from edgediff import compile_model, compile_pipeline, zoo
    from edgediff.runtime.pipeline import Pipeline
    from edgediff.tools.shapes import EVAL_PROMPTS, ShapeChecker, labelled_grid, recognition_rates

    with tempfile.TemporaryDirectory() as tmp:
        root = compile_pipeline(
            args.model, args.model, args.model, output_dir=Path(tmp) / "set", progress=False
        )
        if args.fp16:
            shutil.rmtree(root / "denoiser")
            seq_len = Pipeline.from_directory(root).conditioning[0].shape[1]  # the text encoder's
            unet = zoo.load_local(args.model, subfolder="unet", batch=2, seq_len=seq_len)
            compile_model(unet, output_dir=root / "denoiser", precision="fp16", progress=False)
        pipeline = Pipeline.from_directory(root)
        checker = ShapeChecker()
        print("| steps | whole prompt | color | shape | place |\n|---|---|---|---|---|")
        pictures: list[tuple[str, np.ndarray]] = []
        for steps in args.steps:
            pictures.clear()

            def generate(prompt: str, seed: int, steps: int = steps) -> np.ndarray:
                image = pipeline.generate(prompt=prompt, steps=steps, seed=seed).image
                pictures.append((prompt, image))
                return image

            r = recognition_rates(generate, EVAL_PROMPTS, (0, 1), checker)
            print(f"| {steps} | {r['all']:.0%} | {r['color']:.0%} | {r['shape']:.0%} | {r['position']:.0%} |")
        if args.grid:
            prompts, images = zip(*pictures, strict=True)
            verdicts = [checker.matches(im, p) for p, im in pictures]
            labelled_grid(images, prompts, verdicts).save(args.grid)


if __name__ == "__main__":
    main()
