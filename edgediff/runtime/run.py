"""The device-side command line: what a device bundle's ``run.py`` runs (``python3 run.py --help``).

Torch-free like the rest of the runtime: it needs numpy and the TVM runtime only, so it runs on a phone or
board that has neither PyTorch nor the edgediff compiler. Three commands:

- ``list``: the artifacts next to it, with their targets and signatures;
- ``run``: one artifact on ``.npy`` inputs, outputs saved as ``.npy`` (with ``--repeat`` for timing);
- ``generate``: an artifact set's sampler loop from prompt-embedding ``.npy`` files (or prompt text, when the
  set has a text encoder and tokenizer), writing the final latents (``.npy``) and, with a decoder, the PNG.

On the host the same code runs as ``python -m edgediff.runtime.run``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import EdgediffError, InputError
from edgediff.runtime.artifact import MANIFEST_FILE, CompiledModule, describe_manifest, read_manifest


def resolve(name: str, artifacts_dir: Path | None) -> Path:
    """``name`` as a path when it exists, else an entry of the bundle's ``artifacts/`` folder."""
    path = Path(name)
    if path.exists() or artifacts_dir is None:
        return path
    bundled = artifacts_dir / name
    if not bundled.exists():
        known = ", ".join(sorted(p.name for p in artifacts_dir.iterdir())) if artifacts_dir.is_dir() else ""
        raise EdgediffError(f"no artifact '{name}' here or in {artifacts_dir} (bundled: {known or 'none'})")
    return bundled


def load_array(path: str | os.PathLike, what: str) -> np.ndarray:
    """An ``.npy`` file as an array, with a one-line error naming the option when it cannot be read."""
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read {what} '{path}': {err}") from err


def _cmd_list(args: argparse.Namespace) -> int:
    root = args.artifacts_dir
    if root is None or not root.is_dir():
        raise EdgediffError("no artifacts/ folder next to run.py")
    for entry in sorted(root.iterdir()):
        # an artifact, or an artifact set: its roles (denoiser/, decoder/, ...) are artifacts
        members = [entry] if (entry / MANIFEST_FILE).is_file() else sorted(entry.glob(f"*/{MANIFEST_FILE}"))
        for member in (m if m == entry else m.parent for m in members):
            print(describe_manifest(read_manifest(member), member.relative_to(root).as_posix()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    module = CompiledModule(resolve(args.artifact, args.artifacts_dir), verify=not args.no_verify)
    inputs = [load_array(path, f"input {i}") for i, path in enumerate(args.inputs)]
    outputs: Any = None
    seconds = []
    for _ in range(max(1, args.repeat)):
        start = time.perf_counter()
        outputs = module(*inputs)
        seconds.append(time.perf_counter() - start)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    for info, value in zip(module.outputs, outputs, strict=True):
        path = out_dir / f"{info.name}.npy"
        np.save(path, value)
        print(f"wrote {path}: {value.dtype}{list(value.shape)}")
    times = np.asarray(seconds) * 1e3
    print(f"{module.name}: {len(times)} runs, median {np.median(times):.2f} ms (min {times.min():.2f} ms)")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from edgediff.runtime.image import write_png

    pipeline = open_pipeline(resolve(args.artifacts, args.artifacts_dir), args, verify=not args.no_verify)
    # prompt text goes through the set's text encoder and tokenizer; passed only when given
    given = (("prompt", args.prompt), ("negative_prompt", args.negative_prompt))
    text = {key: value for key, value in given if value is not None}
    conditioning: Any = None
    if args.class_label is not None:
        conditioning = {"class_labels": np.array([args.class_label], dtype=np.int64)}
    elif args.prompt_embeds is not None:
        conditioning = load_array(args.prompt_embeds, "--prompt-embeds")
    elif args.prompt is None:
        raise InputError(
            "give the conditioning: --prompt TEXT (needs text_encoder/ and tokenizer/ in the set), "
            "--prompt-embeds FILE.npy, or --class-label N for DiT"
        )
    negative = None
    if args.negative_prompt_embeds is not None:
        negative = load_array(args.negative_prompt_embeds, "--negative-prompt-embeds")
    latents = load_array(args.latents, "--latents") if args.latents is not None else None
    result = pipeline.generate(
        conditioning,
        negative=negative,
        sampler=args.sampler,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        latents=latents,
        height=args.height,
        width=args.width,
        **text,
    )
    if args.save_latents:
        np.save(args.save_latents, result.latents)
        print(f"wrote {args.save_latents}")
    if result.image is not None:
        write_png(args.output, result.image)
        print(f"wrote {args.output} ({result.image.shape[0]}x{result.image.shape[1]}, height x width)")
    else:
        print("no decoder/ in the artifact set: latents only")
    print(result.timings.summary())
    print_memory(result)
    return 0


def open_pipeline(path: str | os.PathLike, args: argparse.Namespace, *, verify: bool = True) -> Any:
    """The artifact set at ``path`` with the generation options' LoRA and memory cap applied (and said)."""
    from edgediff.runtime.pipeline import Pipeline

    pipeline = Pipeline.from_directory(path, verify=verify, max_memory=args.max_memory)
    if args.lora is not None:
        print(pipeline.set_lora(args.lora, args.lora_scale))
    elif args.lora_scale != 1.0:
        raise InputError("--lora-scale needs --lora FILE.safetensors")
    if pipeline.memory_plan is not None:
        print(pipeline.memory_plan.describe())
    return pipeline


def print_memory(result: Any) -> None:
    """The measured peak resident set size, beside the cap when the run had one."""
    from edgediff.runtime.memory import format_bytes

    plan = result.memory_plan
    line = f"peak RSS      {format_bytes(result.peak_rss)}"
    if plan is not None and plan.cap:
        verdict = "under" if result.peak_rss <= plan.cap else "OVER"
        line += (
            f" ({verdict} the cap of {format_bytes(plan.cap)}; planned {format_bytes(plan.peak_estimate)})"
        )
    print(line)


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """The conditioning, sampler and output options of ``generate``, shared by ``edgediff generate`` and the
    device's ``run.py generate`` so that one command line works on both."""
    parser.add_argument("--prompt", help="prompt text (needs text_encoder/ and tokenizer/ in the set)")
    parser.add_argument("--negative-prompt", help="negative prompt text (default: the empty prompt)")
    parser.add_argument("--prompt-embeds", help="prompt embeddings (.npy, batch 1)")
    parser.add_argument("--negative-prompt-embeds", help="negative (empty) prompt embeddings for guidance")
    parser.add_argument("--class-label", type=int, help="class label for class-conditional models (DiT)")
    parser.add_argument("--sampler", default="dpmpp-2m", help="sampler name (default dpmpp-2m)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5, help="guidance scale (<= 1: no guidance)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise and the sampler")
    parser.add_argument("--height", type=int, help="image height in pixels (a compiled resolution)")
    parser.add_argument("--width", type=int, help="image width in pixels (a compiled resolution)")
    parser.add_argument("--save-latents", help="save the final latents (.npy)")
    parser.add_argument("--lora", help="LoRA .safetensors merged into the weights at load (no rebuild)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    parser.add_argument(
        "--max-memory",
        help="cap on the run's resident memory, e.g. 1.5GB: models load per stage, tiled decode if needed",
    )
    parser.add_argument("-o", "--output", default="out.png", help="PNG to write when there is a decoder")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run.py", description="Run edgediff artifacts with the torch-free runtime."
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks of the weights")
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("list", help="list the bundled artifacts").set_defaults(run=_cmd_list)

    run = commands.add_parser("run", help="run one artifact on .npy inputs, save its outputs as .npy")
    run.add_argument("artifact", help="bundled artifact name or artifact directory")
    run.add_argument("inputs", nargs="*", help="one .npy file per input, in the artifact's input order")
    run.add_argument("-o", "--output", default="outputs", help="folder for <output name>.npy")
    run.add_argument("--repeat", type=int, default=1, help="run N times and report the median time")
    run.set_defaults(run=_cmd_run)

    generate = commands.add_parser("generate", help="sampler loop on an artifact set: latents and a PNG")
    generate.add_argument("artifacts", help="bundled set name or directory with denoiser/ (and decoder/)")
    add_generation_arguments(generate)
    generate.add_argument("--latents", help="initial latents (.npy) instead of seeded noise")
    generate.set_defaults(run=_cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None, *, artifacts_dir: str | os.PathLike | None = None) -> int:
    """Run the device command line; ``artifacts_dir`` is the bundle's ``artifacts/`` folder (run.py's)."""
    args = build_parser().parse_args(argv)
    args.artifacts_dir = Path(artifacts_dir) if artifacts_dir is not None else None
    return run_command("run.py", args)


def run_command(prog: str, args: argparse.Namespace) -> int:
    """Run the parsed subcommand ``args.run`` the way both command lines (``edgediff`` and the device's
    ``run.py``) do: an edgediff error is one line and exit 1 (the traceback only with ``--traceback``),
    Ctrl-C is exit 130."""
    try:
        return int(args.run(args))
    except EdgediffError as err:
        if args.traceback:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
