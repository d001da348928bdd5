"""``make demo``: compile the tiny UNet and VAE decoder, check them against PyTorch, generate an image.

Run as ``python -m edgediff.tools.demo --output demo-out``. Writes ``demo-out/image.png`` and
``demo-out/report.txt``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

# role -> (zoo name, shape options). The denoiser is built with batch 2 so that classifier-free guidance is
# one call; the decoder takes the denoiser's 16x16 latents.
DEMO_MODELS: dict[str, tuple[str, dict[str, int]]] = {
    "denoiser": ("tiny-sd15-unet", {"batch": 2}),
    "decoder": ("tiny-vae-decoder", {"latent_size": 16}),
}
CROSS_TARGET = "arm-a78"


def _compare_with_torch(
    name: str, options: dict[str, int], artifact_path: Path
) -> tuple[float, float, float]:
    """Run the compiled host module and eager PyTorch on the same inputs: (max abs error, ms, torch ms)."""
    import torch

    from edgediff import load, zoo

    model = zoo.build(name, **options)
    module = load(artifact_path)
    with torch.no_grad():
        model.module(*model.example_inputs)  # warm-up
        start = time.perf_counter()
        expected = model.module(*model.example_inputs).numpy()
        torch_ms = 1e3 * (time.perf_counter() - start)
    module(*model.example_inputs)  # warm-up
    start = time.perf_counter()
    got = module(*model.example_inputs)
    ms = 1e3 * (time.perf_counter() - start)
    return float(np.abs(got - expected).max()), ms, torch_ms


def _generate(pipeline_dir: Path, out: Path) -> list[str]:
    """Run 20 DPM-Solver++ steps with guidance on the compiled host pipeline and write the PNG."""
    from edgediff.runtime.image import write_png
    from edgediff.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_directory(pipeline_dir)
    text_shape: Any = (1, *pipeline.conditioning[0].shape[1:])
    rng = np.random.default_rng(0)
    prompt_embeds = rng.standard_normal(text_shape).astype(np.float32)  # stands in for a text encoder
    negative = np.zeros(text_shape, np.float32)
    result = pipeline.generate(
        prompt_embeds, negative=negative, sampler="dpmpp-2m", steps=20, guidance_scale=7.5
    )
    image_path = write_png(out / "image.png", result.image)
    return [
        "",
        "generation: 20 x dpmpp-2m, guidance 7.5, seed 0, random prompt embeddings "
        "(random weights: expect noise)",
        f"  image           {image_path} ({result.image.shape[1]}x{result.image.shape[0]})",
        *("  " + line for line in result.timings.summary().splitlines()),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-out", help="directory for the artifacts and the report")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from edgediff import compile_model

    out = Path(args.output)
    lines = ["edgediff demo report", "===================="]
    details = []
    for role, (name, options) in DEMO_MODELS.items():
        host = compile_model(name, target="host", output_dir=out / "host" / role, **options)
        cross = compile_model(name, target=CROSS_TARGET, output_dir=out / CROSS_TARGET / role, **options)
        err, ms, torch_ms = _compare_with_torch(name, options, host.path)
        lines += [
            "",
            f"{role}: {name} {options}",
            f"  host build      {host.path}  ({host.manifest['compile_seconds']:.1f} s to compile)",
            f"  max abs error   {err:.2e} vs PyTorch eager (same weights, same inputs)",
            f"  one call        {ms:.2f} ms compiled (no tuning), {torch_ms:.2f} ms PyTorch eager",
            f"  {CROSS_TARGET} build  {cross.path} [{cross.manifest['library']['format']}, "
            f"{cross.manifest['library'].get('compiler') or 'no cross compiler'}]",
        ]
        if err > 1e-4:
            lines.append(f"  FAILED: error {err:.2e} above 1e-4")
        details += ["", host.describe()]
    lines += _generate(out / "host", out)
    report = "\n".join(lines + details) + "\n"
    (out / "report.txt").write_text(report)
    print(report)
    print(f"report written to {out / 'report.txt'}")
    return 1 if "FAILED" in report else 0


if __name__ == "__main__":
    sys.exit(main())
