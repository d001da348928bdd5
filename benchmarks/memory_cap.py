"""Peak memory of a generation run against ``--max-memory``, and the tiled VAE decode's error.

Compiles an artifact set (denoiser, decoder, and the decoder for latent tiles), then runs ``generate`` in
fresh torch-free processes (torch made unimportable, as on a device: the TVM runtime otherwise imports it
when installed) without a cap, under ``--cap`` and under the tightest cap the plan allows (its smallest
footprint plus ``--slack``), and prints each run's measured peak RSS (VmHWM) beside its cap and the plan's
estimate. Last, the tiled decode against the untiled one on the same latents.

    .venv/bin/python benchmarks/memory_cap.py --quick        # tiny UNet + tiny VAE: about 3 minutes
    .venv/bin/python benchmarks/memory_cap.py                # tiny UNet + SD's VAE decoder at 512x512
    .venv/bin/python benchmarks/memory_cap.py --cap 1.5GB --latent 64 --tile 32 --workdir /tmp/memcap
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np

# As on a device: torch (which the TVM runtime imports when it is installed) cannot be imported.
_NO_TORCH = """
import sys

class _Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "diffusers", "transformers"):
            raise ModuleNotFoundError(name)
        return None

sys.meta_path.insert(0, _Absent())
"""

_CHILD = (
    _NO_TORCH
    + """import json
import numpy as np
from edgediff.runtime.memory import current_rss
from edgediff.runtime.pipeline import Pipeline

root, cap, embeds, steps, latents_out = sys.argv[1:6]
baseline = current_rss()
pipeline = Pipeline.from_directory(root, max_memory=cap or None)
result = pipeline.generate(np.load(embeds), steps=int(steps), guidance_scale=1.0, seed=0)
np.save(latents_out, result.latents)
plan = result.memory_plan
print(json.dumps({
    "peak": result.peak_rss,
    "baseline": baseline,
    "planned": plan.peak_estimate if plan else None,
    "minimum": plan.minimum if plan else None,
    "resident": plan.resident if plan else True,
    "tiled": plan.tiled_decode if plan else False,
    "seconds": result.timings.total,
}))
"""
)

_PROBE = (
    _NO_TORCH
    + """import json
from edgediff.runtime.pipeline import Pipeline

plan = Pipeline.from_directory(sys.argv[1], max_memory="1TB").memory_plan
print(json.dumps({"minimum": plan.minimum, "baseline": plan.baseline}))
"""
)


def build_set(root: Path, quick: bool, latent: int, tile: int) -> Path:
    """The artifact set (cached in ``root`` for the same configuration)."""
    from edgediff import compile_pipeline, zoo

    config = {"quick": quick, "latent": latent, "tile": tile}
    stamp = root / "config.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == config and (root / "set" / "denoiser").is_dir():
        return root / "set"
    denoiser = zoo.build("tiny-sd15-unet", batch=1, latent_size=latent)
    decoder = "tiny-vae-decoder" if quick else "sd-vae-decoder"
    compile_pipeline(denoiser, decoder, target="host", output_dir=root / "set", batch=1, decoder_tile=tile)
    stamp.write_text(json.dumps(config))
    return root / "set"


def run_child(code: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def mb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny VAE decoder instead of SD's")
    parser.add_argument("--cap", default="1.5GB", help="the cap of the second run (default 1.5GB)")
    parser.add_argument(
        "--slack",
        help="tight run: the plan's smallest footprint plus this (default 1MB quick, 16MB otherwise)",
    )
    parser.add_argument("--latent", type=int, help="latent size (default 16 quick, 64 otherwise)")
    parser.add_argument("--tile", type=int, help="decoder tile latent size (default latent / 2)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--workdir", default="edgediff-out/memory-cap", help="artifact set cache")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    from edgediff.runtime.memory import format_bytes, parse_bytes

    latent = args.latent or (16 if args.quick else 64)
    tile = args.tile or latent // 2
    root = Path(args.workdir) / ("quick" if args.quick else "full")
    root.mkdir(parents=True, exist_ok=True)
    set_dir = build_set(root, args.quick, latent, tile)
    embeds = root / "embeds.npy"
    np.save(embeds, np.random.default_rng(1).standard_normal((1, 8, 32)).astype(np.float32))

    probe = run_child(_PROBE, str(set_dir))
    tight = probe["minimum"] + parse_bytes(args.slack or ("1MB" if args.quick else "16MB"))
    runs = [("no cap", ""), (f"--max-memory {args.cap}", args.cap), ("tightest cap", str(tight))]
    print(
        f"artifact set {set_dir}: tiny-sd15-unet + {'tiny-vae-decoder' if args.quick else 'sd-vae-decoder'}"
        f" at latent {latent} ({latent * 8}x{latent * 8} image), decoder tile {tile}, {args.steps} steps"
    )
    print(
        f"smallest footprint the plan can reach: {format_bytes(probe['minimum'])} "
        f"(process before loading: {format_bytes(probe['baseline'])})"
    )
    print()
    print("| run | cap MB | plan | planned peak MB | measured peak RSS MB | under the cap | seconds |")
    print("|---|---:|---|---:|---:|---|---:|")
    for label, cap in runs:
        result = run_child(_CHILD, str(set_dir), cap, str(embeds), str(args.steps), str(root / "latents.npy"))
        if "error" in result:
            print(f"| {label} | {mb(parse_bytes(cap)) if cap else '-'} | error: {result['error']} | | | | |")
            continue
        cap_bytes = parse_bytes(cap) if cap else None
        plan = "all loaded" if result["resident"] else "one model per stage"
        plan += ", tiled decode" if result["tiled"] else ""
        under = "-" if cap_bytes is None else ("yes" if result["peak"] <= cap_bytes else "NO")
        print(
            f"| {label} | {mb(cap_bytes)} | {plan} | {mb(result['planned'])} | {mb(result['peak'])} "
            f"| {under} | {result['seconds']:.2f} |"
        )

    from edgediff.runtime.pipeline import Pipeline

    latents = np.load(root / "latents.npy")
    pipeline = Pipeline.from_directory(set_dir)
    full = pipeline.decode(latents)
    tiled = pipeline.decode(latents, tiled=True)
    error = np.abs(tiled - full)
    levels = np.abs(np.rint((tiled + 1) * 127.5) - np.rint((full + 1) * 127.5))
    print()
    print(
        f"tiled decode vs untiled (outputs in [-1, 1]): max abs error {error.max():.4f}, "
        f"mean {error.mean():.5f}; in 8-bit levels: max {levels.max():.0f}, mean {levels.mean():.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
