"""The ``edgediff`` command line.

User errors (:class:`~edgediff.errors.EdgediffError`) print one line and exit with status 1; pass
``--traceback`` to see where they came from. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Callable, Sequence

from edgediff.errors import EdgediffError


def _cmd_compile(args: argparse.Namespace) -> int:
    from edgediff.api import compile_model

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
    )
    print(artifact.describe())
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from edgediff.runtime.artifact import check_artifact, describe_manifest

    manifest = check_artifact(args.artifact, verify=not args.no_verify)
    print(json.dumps(manifest, indent=2) if args.json else describe_manifest(manifest, args.artifact))
    return 0


def _cmd_targets_list(_args: argparse.Namespace) -> int:
    from edgediff.targets import list_targets, load_target

    for name in list_targets():
        spec = load_target(name)
        print(f"{name:<12} {spec.kind:<4} {spec.description}")
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
    compile_.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    compile_.set_defaults(run=_cmd_compile)

    inspect_ = commands.add_parser("inspect", help="print an artifact's manifest readably")
    inspect_.add_argument("artifact")
    inspect_.add_argument("--json", action="store_true", help="print the raw manifest")
    inspect_.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    inspect_.set_defaults(run=_cmd_inspect)

    targets = commands.add_parser("targets", help="list, show and validate target specs")
    target_commands = targets.add_subparsers(dest="targets_command", required=True)
    target_commands.add_parser("list", help="list built-in targets").set_defaults(run=_cmd_targets_list)
    show = target_commands.add_parser("show", help="show a target spec")
    show.add_argument("target", help="built-in name or YAML path")
    show.set_defaults(run=_cmd_targets_show)
    validate = target_commands.add_parser("validate", help="validate a target YAML file")
    validate.add_argument("file")
    validate.set_defaults(run=_cmd_targets_validate)

    passes = commands.add_parser("passes", help="list the passes (and which a target runs)")
    passes.add_argument("--target", help="mark the passes this target runs by default")
    passes.set_defaults(run=_cmd_passes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # torch.export's own deprecation chatter is not the user's business
    warnings.filterwarnings("ignore", category=FutureWarning)
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except EdgediffError as err:
        if args.traceback:
            raise
        print(f"edgediff: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("edgediff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
