"""The ``edgediff`` command line.

User errors (:class:`~edgediff.errors.EdgediffError`) print one line and exit with status 1; pass
``--traceback`` to see where they came from. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence

from edgediff.errors import EdgediffError
from edgediff.runtime.run import add_generation_arguments, run_command
from edgediff.tools import remote
from edgediff.tools.bench import add_arguments as add_bench_arguments

RESOLUTIONS_HELP = (
    "image sizes HEIGHTxWIDTH in pixels, comma-separated (512x512,768x512): one artifact with an entry per "
    "size sharing the weights; the first is the default"
)


def _cmd_compile(args: argparse.Namespace) -> int:
    from edgediff.api import compile_model
    from edgediff.linear_attention import format_layer_table, linear_attention_from_options
    from edgediff.precision.plan import config_from_options

    passes = None
    if args.passes:
        passes = [name.strip() for name in args.passes.split(",") if name.strip()]
    elif args.disable_pass:
        passes = {name: False for name in args.disable_pass}
    artifact = compile_model(
        args.model,
        target=args.target,
        passes=passes,
        output_dir=args.output,
        progress=not args.quiet,
        require_cross_compiler=args.require_cross_compiler,
        batch=args.batch,
        latent_size=args.latent_size,
        resolutions=args.resolutions,
        precision=config_from_options(
            args.precision,
            max_bytes=args.max_bytes,
            max_latency_ms=args.max_latency_ms,
            min_sqnr_db=args.min_sqnr,
            pins=args.pin,
            sensitivity_latent=args.sensitivity_latent,
            sensitivity=args.sensitivity,
        ),
        linear_attention=linear_attention_from_options(
            args.linear_attention,
            max_error=args.linear_attention_max_error,
            cross_max_error=args.linear_attention_cross_max_error,
            fine_tuned=args.linear_attention_fine_tuned,
            features=args.linear_attention_features,
        ),
    )
    print(artifact.describe())
    for record in artifact.manifest["passes"]:
        if record["name"] == "rewrite-linear-attention" and record["report"].get("layers"):
            print(format_layer_table(record["report"]["layers"]))
    if artifact.manifest.get("precision"):
        record = artifact.manifest["precision"]
        print(f"  precision {record['report']} (table), {record['plot']} (plot)")
    return 0


def _cmd_compile_pipeline(args: argparse.Namespace) -> int:
    from edgediff.api import compile_pipeline
    from edgediff.runtime.artifact import Artifact

    root = compile_pipeline(
        args.denoiser,
        args.decoder,
        args.text_encoder,
        args.tokenizer,
        target=args.target,
        output_dir=args.output,
        batch=args.batch,
        progress=not args.quiet,
        require_cross_compiler=args.require_cross_compiler,
        decoder_tile=args.decoder_tile,
        resolutions=args.resolutions,
        max_sequence_length=args.max_sequence_length,
    )
    for role in ("denoiser", "decoder", "text_encoder", "text_encoder_2", "decoder_tile"):
        if (root / role).is_dir():
            artifact = Artifact(root / role)
            signature = "; ".join(i.describe() for i in artifact.inputs)
            signature += " -> " + "; ".join(o.describe() for o in artifact.outputs)
            print(f"{role + '/':<14} {artifact.manifest['model']['name']}: {signature}")
    for name in ("tokenizer", "tokenizer_2"):
        if (root / name).is_dir():
            print(f"{name + '/':<14} {', '.join(sorted(p.name for p in (root / name).iterdir()))}")
    if (root / "conditioning.json").is_file():
        print(f"{'conditioning':<14} {(root / 'conditioning.json').read_text().strip()}".replace("\n", ""))
    print(f"wrote artifact set {root} for {args.target}")
    return 0


def _load_array(path: str | None, what: str):
    import numpy as np

    if path is None:
        return None
    try:
        return np.load(path)
    except (OSError, ValueError) as err:
        raise EdgediffError(f"cannot read {what} '{path}': {err}") from err


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.rpc:
        from edgediff.tools.remote import cmd_generate

        return cmd_generate(args)
    import numpy as np

    from edgediff.runtime.image import write_png
    from edgediff.runtime.run import open_pipeline, print_memory

    pipeline = open_pipeline(args.artifacts, args)
    if (args.prompt is not None or args.negative_prompt is not None) and pipeline.conditioner is None:
        parts = (("text_encoder/", pipeline.text_encoder), ("tokenizer/", pipeline.tokenizer))
        missing = [name for name, part in parts if part is None]
        if missing:
            raise EdgediffError(
                f"--prompt needs a compiled text encoder and its tokenizer in {args.artifacts}; this "
                f"artifact set has no {' or '.join(missing)}: pass --prompt-embeds FILE.npy (or build the "
                "set with edgediff compile-pipeline --text-encoder ... --tokenizer ...)"
            )
    conditioning = _load_array(args.prompt_embeds, "--prompt-embeds")
    negative = _load_array(args.negative_prompt_embeds, "--negative-prompt-embeds")
    if args.class_label is not None:
        conditioning = {"class_labels": np.array([args.class_label], dtype=np.int64)}
    if conditioning is None and args.prompt is None:
        raise EdgediffError(
            "give the conditioning: --prompt TEXT (needs a text encoder in the set), "
            "--prompt-embeds FILE.npy, or --class-label N for DiT"
        )

    bar = None
    if not args.quiet and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc=f"{args.sampler} x {args.steps}", unit="eval")

    def progress(i: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.update(1)

    try:
        result = pipeline.generate(
            conditioning,
            negative=negative,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            callback=progress,
            decode=pipeline.decoder is not None or pipeline.tile_decoder is not None,
            height=args.height,
            width=args.width,
        )
    finally:
        if bar is not None:
            bar.close()
    if args.save_latents:
        np.save(args.save_latents, result.latents)
    if result.image is not None:
        write_png(args.output, result.image)
        print(f"wrote {args.output} ({result.image.shape[0]}x{result.image.shape[1]}, height x width)")
    else:
        print(
            f"no decoder/ in {args.artifacts}: latents only"
            + ("" if args.save_latents else " (--save-latents)")
        )
    print(result.timings.summary())
    print_memory(result)
    if args.profile:
        steps = np.asarray(result.timings.steps) * 1e3
        model = np.asarray(result.timings.model) * 1e3
        print("per model evaluation (ms): step total / inside the compiled model / runtime overhead")
        for i, (total, inside) in enumerate(zip(steps, model, strict=True)):
            print(f"  {i:3d}  {total:9.3f}  {inside:9.3f}  {total - inside:7.3f}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.rpc or args.artifacts:
        from edgediff.tools.remote import cmd_bench

        if not args.rpc:
            raise EdgediffError(
                "bench ARTIFACT... times artifacts on devices: give --rpc HOST:PORT --key KEY"
            )
        return cmd_bench(args)
    from edgediff.tools.bench import run

    return run(args)


def _cmd_devices(args: argparse.Namespace) -> int:
    from edgediff.tools.remote import cmd_devices

    return cmd_devices(args)


def _cmd_run(args: argparse.Namespace) -> int:
    from edgediff.tools.remote import cmd_run

    return cmd_run(args)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgediff.runtime.artifact import MANIFEST_FILE, check_artifact, describe_manifest

    root = Path(args.artifact)
    if not (root / MANIFEST_FILE).is_file() and (root / "denoiser").is_dir():
        return _inspect_set(root, args)
    manifest = check_artifact(args.artifact, verify=not args.no_verify)
    print(json.dumps(manifest, indent=2) if args.json else describe_manifest(manifest, args.artifact))
    return 0


def _inspect_set(root, args: argparse.Namespace) -> int:
    """``inspect`` of an artifact set: each model, then the memory plan of a run with one model per stage."""
    from edgediff.runtime.artifact import MANIFEST_FILE, check_artifact, describe_manifest
    from edgediff.runtime.memory import format_bytes, make_plan

    manifests = {}
    for role in ("text_encoder", "denoiser", "decoder", "decoder_tile"):
        if (root / role / MANIFEST_FILE).is_file():
            manifests[role] = check_artifact(root / role, verify=not args.no_verify)
    if args.json:
        print(json.dumps(manifests, indent=2))
        return 0
    for role, manifest in manifests.items():
        print(describe_manifest(manifest, root / role))
    plan = make_plan(manifests, None, baseline=0)
    plan.resident = False
    together = sum(f.total for f in plan.stages.values())
    print(
        f"artifact set {root}: all models together {format_bytes(together)}; "
        f"smallest footprint under --max-memory (one model per stage"
        + (", tiled decode" if "decoder_tile" in manifests else "")
        + f") {format_bytes(plan.minimum)} plus the process itself"
    )
    return 0


def _cmd_bundle(args: argparse.Namespace) -> int:
    from edgediff.tools.bundle import bundle_name, make_bundle

    path = make_bundle(args.artifacts, args.output)
    name = bundle_name(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    print(f"on the device: tar xf {path.name} && python3 {name}/run.py list  (see {name}/README.md)")
    return 0


def _cmd_targets_list(_args: argparse.Namespace) -> int:
    from edgediff.targets import list_targets, load_target

    for name in list_targets():
        spec = load_target(name)
        print(f"{name:<12} {spec.kind:<4} {spec.description}")
        print(f"{'':<17} dtypes {', '.join(spec.dtypes)}; {spec.cost_figures()}")
        if spec.detected is not None:
            print(f"{'':<17} detected {spec.detected}")
    return 0


def _cmd_targets_show(args: argparse.Namespace) -> int:
    from edgediff.targets import load_target

    print(load_target(args.target).describe())
    return 0


def _cmd_targets_validate(args: argparse.Namespace) -> int:
    from edgediff.targets import validate_target_file

    spec = validate_target_file(args.file)
    print(f"{args.file}: valid target spec '{spec.name}' ({spec.kind})")
    return 0


def _cmd_calibrate_target(args: argparse.Namespace) -> int:
    from edgediff.tools.calibrate_target import calibrate_target

    # the command that re-measures, recorded in the measured block
    argv = ["--target", args.target] + (["--output", args.output] if args.output else [])
    argv += (["--formats", *args.formats] if args.formats else []) + (["--rpc", args.rpc] if args.rpc else [])
    argv += ["--key", args.key] if args.key else []
    device = None
    if args.rpc:
        device = remote.open_device(
            args.rpc, args.key, timeout=args.timeout, session_timeout=args.session_timeout
        )
    try:
        calibration, path = calibrate_target(
            args.target,
            args.output,
            args.formats,
            args.runs,
            argv=argv,
            device=device,
            progress=lambda text: print(f"  {text}", flush=True),
        )
    finally:
        if device is not None:
            device.close()
    print(f"measured on {calibration.cpu}, {calibration.threads} thread(s):")
    for fmt, gflops in calibration.gflops.items():
        print(f"  {fmt:<11} {calibration.seconds[fmt] * 1e3:8.2f} ms  {gflops:8.2f} GFLOP/s")
    print(f"wrote {path}")
    return 0


def _cmd_passes(args: argparse.Namespace) -> int:
    from edgediff.passes import PASS_ORDER, PASSES, default_pipeline
    from edgediff.targets import load_target

    enabled = set(default_pipeline(load_target(args.target))) if args.target else None
    for name in PASS_ORDER:
        entry = PASSES[name]
        mark = "" if enabled is None else ("on " if name in enabled else "off ")
        required = " (required)" if entry.required else ""
        print(f"{mark}{name:<24} {entry.summary}{required}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgediff", description="Compile diffusion models for edge targets."
    )
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    compile_ = commands.add_parser("compile", help="compile a model into an artifact directory")
    compile_.add_argument("--model", required=True, help="zoo name, diffusers folder or .onnx file")
    compile_.add_argument("--target", default="host", help="built-in target name or target YAML path")
    compile_.add_argument("-o", "--output", required=True, help="artifact directory to write")
    compile_.add_argument("--passes", help="comma-separated passes to run instead of the target default")
    compile_.add_argument(
        "--disable-pass",
        action="append",
        default=[],
        metavar="NAME",
        help="switch off one pass of the default pipeline (repeatable)",
    )
    compile_.add_argument(
        "--require-cross-compiler",
        action="store_true",
        help="fail instead of writing a .tar of objects when the cross compiler is missing",
    )
    compile_.add_argument("--batch", type=int, help="batch of a zoo/diffusers model (2 = one-call CFG)")
    compile_.add_argument("--latent-size", type=int, help="latent height/width of a zoo/diffusers model")
    compile_.add_argument("--resolutions", help=RESOLUTIONS_HELP)
    compile_.add_argument(
        "--precision",
        help="auto (per-layer, measured) or one format for all layers: fp32, fp16, w8, int8 (= w8a8), "
        "w8a8-token, int4 (= w4)",
    )
    compile_.add_argument("--max-bytes", help="auto precision: largest weights size, e.g. 800MB or 1GiB")
    compile_.add_argument("--max-latency-ms", type=float, help="auto precision: largest estimated latency")
    compile_.add_argument("--min-sqnr", type=float, help="auto precision: smallest prediction SQNR in dB")
    compile_.add_argument(
        "--sensitivity-latent",
        type=int,
        default=16,
        help="auto precision: measure layer sensitivity at this latent size and transfer it by layer name "
        "(0 = at the model's full size: exact, slow)",
    )
    compile_.add_argument(
        "--sensitivity",
        choices=("transfer", "replay"),
        default="transfer",
        help="auto precision: how layer sensitivity is measured: transfer (local errors carried to the "
        "prediction by a few probe passes; fast) or replay (one calibration replay per layer and format; "
        "exact, slow)",
    )
    compile_.add_argument(
        "--pin", action="append", default=[], metavar="LAYER=FORMAT", help="fix a layer's format (glob ok)"
    )
    compile_.add_argument(
        "--linear-attention",
        metavar="MAP",
        help="rewrite softmax attention to linear attention with this feature map: relu, elu+1, taylor2, "
        "favor+ (layers under --linear-attention-max-error that the cost model expects to be faster)",
    )
    compile_.add_argument(
        "--linear-attention-max-error",
        type=float,
        metavar="E",
        help="largest relative output error of a rewritten layer (self and cross attention)",
    )
    compile_.add_argument(
        "--linear-attention-cross-max-error",
        type=float,
        metavar="E",
        help="a separate bound for cross attention (0 leaves cross attention alone)",
    )
    compile_.add_argument(
        "--linear-attention-fine-tuned",
        action="store_true",
        help="the weights were fine-tuned with this feature map: rewrite every layer, exact",
    )
    compile_.add_argument("--linear-attention-features", type=int, help="favor+: random features (256)")
    compile_.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    compile_.set_defaults(run=_cmd_compile)

    pipe = commands.add_parser(
        "compile-pipeline", help="compile denoiser, decoder and text encoder into an artifact set"
    )
    pipe.add_argument("--denoiser", required=True, help="zoo name, diffusers component or pipeline folder")
    pipe.add_argument("--decoder", help="VAE decoder: zoo name or folder (built for the denoiser's latents)")
    pipe.add_argument("--text-encoder", help="CLIP text encoder: zoo name or folder")
    pipe.add_argument("--tokenizer", help="CLIP tokenizer folder (default: the one beside --text-encoder)")
    pipe.add_argument("--target", default="host", help="built-in target name or target YAML path")
    pipe.add_argument("-o", "--output", required=True, help="artifact set directory to write")
    pipe.add_argument("--batch", type=int, default=2, help="denoiser batch (2 = one-call CFG, default)")
    pipe.add_argument(
        "--decoder-tile",
        type=int,
        metavar="LATENT",
        help="also compile the decoder for LATENT x LATENT tiles (decoder_tile/), for tiled decoding under "
        "generate --max-memory",
    )
    pipe.add_argument("--require-cross-compiler", action="store_true", help="as for compile")
    pipe.add_argument("--resolutions", help=RESOLUTIONS_HELP + " (denoiser and decoder)")
    pipe.add_argument(
        "--max-sequence-length",
        type=int,
        help="text tokens of a PixArt-alpha (default 120) or SANA (300) pipeline folder's prompts",
    )
    pipe.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    pipe.set_defaults(run=_cmd_compile_pipeline)

    generate = commands.add_parser("generate", help="run the sampler loop on an artifact set, write a PNG")
    generate.add_argument("artifacts", help="directory with denoiser/ (and decoder/) artifacts")
    add_generation_arguments(generate)
    generate.add_argument("--profile", action="store_true", help="per-step time inside/outside the model")
    generate.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    remote.add_generate_arguments(generate, required=False)
    generate.set_defaults(run=_cmd_generate)

    bench = commands.add_parser(
        "bench",
        help="time host builds of zoo models against PyTorch eager and onnxruntime; with --rpc, time "
        "artifacts on devices",
    )
    add_bench_arguments(bench)
    remote.add_bench_arguments(bench, required=False)
    bench.set_defaults(run=_cmd_bench)

    devices = commands.add_parser("devices", help="device keys at a TVM RPC tracker, free and busy")
    devices.add_argument("--tracker", required=True, help="tracker HOST:PORT")
    devices.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the tracker")
    devices.set_defaults(run=_cmd_devices)

    run = commands.add_parser("run", help="run an artifact on a device over TVM RPC, save outputs as .npy")
    run.add_argument("artifact", help="artifact directory")
    run.add_argument("inputs", nargs="*", help="one .npy per input, in order (default: seeded random)")
    run.add_argument("-o", "--output", default="outputs", help="folder for <output name>.npy")
    remote.add_remote_arguments(run)
    run.set_defaults(run=_cmd_run)

    inspect_ = commands.add_parser("inspect", help="print an artifact's manifest readably")
    inspect_.add_argument("artifact")
    inspect_.add_argument("--json", action="store_true", help="print the raw manifest")
    inspect_.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    inspect_.set_defaults(run=_cmd_inspect)

    bundle = commands.add_parser("bundle", help="pack artifacts + the torch-free runtime for a device")
    bundle.add_argument("artifacts", nargs="+", help="artifact or artifact-set directories")
    bundle.add_argument("-o", "--output", required=True, help="bundle file (.tar, .tar.gz or .tgz)")
    bundle.set_defaults(run=_cmd_bundle)

    targets = commands.add_parser("targets", help="list, show and validate target specs")
    target_commands = targets.add_subparsers(dest="targets_command", required=True)
    target_commands.add_parser("list", help="list built-in targets").set_defaults(run=_cmd_targets_list)
    show = target_commands.add_parser("show", help="show a target spec")
    show.add_argument("target", help="built-in name or YAML path")
    show.set_defaults(run=_cmd_targets_show)
    validate = target_commands.add_parser("validate", help="validate a target YAML file")
    validate.add_argument("file")
    validate.set_defaults(run=_cmd_targets_validate)

    calibrate = commands.add_parser(
        "calibrate-target",
        help="measure a target's kernel throughput per precision format (the cost model's figures)",
        description="Compile a small conv + feed-forward probe at each precision format the target computes "
        "in, time it (here: least CPU time on one thread; with --rpc: on the device) and store GFLOP/s per "
        "format with the target: a <name>.measured.yaml sidecar next to a target YAML, or for a built-in "
        "target a full target YAML (default edgediff-out/targets/<name>-measured.yaml) to pass as --target.",
    )
    calibrate.add_argument("--target", default="host", help="built-in name or YAML path (default: host)")
    calibrate.add_argument("--output", help="file to write (a *.measured.yaml name writes only the block)")
    calibrate.add_argument("--formats", nargs="+", help="formats to measure (default: all the target has)")
    calibrate.add_argument("--runs", type=int, default=5, help="timed calls per format (least is kept)")
    remote.add_remote_arguments(calibrate, required=False)
    calibrate.set_defaults(run=_cmd_calibrate_target)

    passes = commands.add_parser("passes", help="list the passes (and which a target runs)")
    passes.add_argument("--target", help="mark the passes this target runs by default")
    passes.set_defaults(run=_cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch.export's own deprecation chatter is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning)
    return run_command("edgediff", build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
