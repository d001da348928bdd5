"""``edgediff.compile_model``: capture -> passes -> TVM build -> artifact."""

from __future__ import annotations

import datetime
import os
import re
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgediff.lowering.artifact import atomic_directory, file_record, write_manifest, write_weights
from edgediff.lowering.build import build, device_sources, export_library, run_passes
from edgediff.lowering.capture import capture
from edgediff.lowering.relax_import import import_to_relax
from edgediff.passes import resolve_pipeline
from edgediff.runtime.artifact import FORMAT_VERSION, Artifact
from edgediff.targets import load_target

STAGES = ("capture", "import", "passes", "build", "export", "write")
DEVICE_SOURCE_SUFFIX = {"opencl": ".cl", "vulkan": ".spv.txt", "metal": ".metal"}
# A kernel definition (not the forward declarations TVM repeats at the top of each kernel's source).
KERNEL_DEFINITION = re.compile(r"(?:__kernel|kernel)\s+void\s+(\w+)\s*\([^;{]*\)\s*\{")


class _Progress:
    """One tqdm bar over the compile stages (silent when disabled)."""

    def __init__(self, enabled: bool, name: str, target: str) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # draw only on a terminal, so logs and pipes get no redraw noise
            self.bar = tqdm(
                total=len(STAGES),
                desc=f"{name} -> {target}",
                unit="stage",
                leave=True,
                disable=not sys.stderr.isatty(),
            )

    def stage(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self, *, failed: bool) -> None:
        if self.bar is not None:
            # a failed compile's bar is erased so the error message stands alone
            self.bar.leave = not failed
            self.bar.close()


def _versions(source: str) -> dict[str, str]:
    import numpy
    import tvm

    import edgediff

    versions = {"edgediff": edgediff.__version__, "tvm": tvm.__version__, "numpy": numpy.__version__}
    if source == "torch":
        import torch

        versions["torch"] = torch.__version__
    return versions


def _target_notes(spec: Any) -> list[str]:
    notes = []
    if spec.kind == "npu":
        host_triple = spec.tvm_target.get("mtriple", "host") if isinstance(spec.tvm_target, dict) else "host"
        notes.append(
            "NPU program not generated yet: every kernel is built for the NPU's host CPU "
            f"({host_triple})"
            "; the npu-op-coverage report lists the ops the NPU would take"
        )
    if spec.features.get("texture_memory"):
        notes.append(
            "texture (image2d) memory is not used: TVM 0.27's texture layout conversion crashes on conv2d, "
            "so kernels read buffers"
        )
    return notes


def compile_model(
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    target: Any = "host",
    *,
    passes: Iterable[str] | Mapping[str, bool] | None = None,
    output_dir: str | os.PathLike | None = None,
    input_names: Sequence[str] | None = None,
    name: str | None = None,
    progress: bool = True,
    require_cross_compiler: bool = False,
    batch: int | None = None,
    latent_size: int | None = None,
) -> Artifact:
    """Compile a diffusion model (or any ``nn.Module`` / ONNX file) for an edge target.

    Args:
        model: a ``torch.nn.Module``, a :class:`edgediff.zoo.ZooModel`, a zoo name (``"tiny-sd15-unet"``),
            a local diffusers folder, or a path to an ``.onnx`` file.
        example_inputs: tensors with the shapes the compiled model will be called with (zoo models bring
            their own).
        target: a built-in target name, a path to a target YAML, or a ``TargetSpec``.
        passes: ``None`` for the target's default pipeline, a list naming exactly the passes to run, or a
            mapping switching passes on/off by name (``{"fuse-ops": False}``).
        output_dir: where the artifact directory goes (replaced atomically); default
            ``edgediff-out/<model>-<target>``.
        require_cross_compiler: fail instead of writing a ``.tar`` of objects when the target's cross
            compiler is missing.
        batch, latent_size: input shapes for zoo names and diffusers folders (batch 2 = one-call
            classifier-free guidance).

    Returns:
        The written :class:`Artifact`; ``artifact.load()`` gives a callable for host-runnable targets.
    """
    spec = load_target(target)
    pass_names = resolve_pipeline(spec, passes)
    start = time.perf_counter()

    bar = _Progress(progress, name or _display_name(model), spec.name)
    failed = True
    try:
        bar.stage("capture (torch.export)")
        captured = capture(
            model, example_inputs, input_names=input_names, name=name, batch=batch, latent_size=latent_size
        )
        bar.advance()

        bar.stage("import (fx -> Relax)")
        imported = import_to_relax(captured)
        # the Relax module now owns copies of the weights: let the torch graph go before the build
        captured.exported_program = captured.torch_module = None
        bar.advance()

        mod, pass_results = run_passes(
            imported.mod, spec, pass_names, on_pass=lambda p: bar.stage(f"pass {p}")
        )
        bar.advance()

        bar.stage("build (TVM)")
        executable = build(mod, spec)
        bar.advance()

        destination = (
            Path(output_dir) if output_dir else Path("edgediff-out") / f"{captured.name}-{spec.name}"
        )
        with atomic_directory(destination) as staging:
            bar.stage("export library")
            library = export_library(executable, spec, staging, require_compiler=require_cross_compiler)
            device_code = _write_device_sources(executable, staging)
            bar.advance()

            bar.stage("write weights + manifest")
            weights = write_weights(staging, imported.weights, imported.weight_names)
            notes = _target_notes(spec) + ([library.note] if library.note else [])
            manifest = {
                "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "compile_seconds": round(time.perf_counter() - start, 3),
                "model": {
                    "name": captured.name,
                    "family": captured.family,
                    "source": captured.source,
                    "meta": captured.meta,
                },
                "target": spec.to_dict(),
                "runs_on_host": bool(spec.runs_on_host and library.format == "shared"),
                "inputs": [info.to_dict() for info in imported.inputs],
                "outputs": [info.to_dict() for info in imported.outputs],
                "passes": [
                    {"name": r.name, "seconds": round(r.seconds, 3), "report": r.report} for r in pass_results
                ],
                "library": {
                    **file_record(staging, library.file),
                    "format": library.format,
                    "compiler": library.compiler,
                },
                "weights": weights,
                "device_code": device_code,
                "versions": _versions(captured.source),
                "notes": notes,
            }
            write_manifest(staging, manifest)
            bar.advance()
        failed = False
    finally:
        bar.close(failed=failed)
    return Artifact(destination)


def _display_name(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return Path(os.fspath(model)).stem or os.fspath(model)
    return getattr(model, "name", None) or type(model).__name__


def _write_device_sources(executable: Any, directory: Path) -> dict[str, Any]:
    records = {}
    for kind, source in device_sources(executable).items():
        relative = f"kernels/{kind}{DEVICE_SOURCE_SUFFIX.get(kind, '.txt')}"
        (directory / "kernels").mkdir(exist_ok=True)
        (directory / relative).write_text(source)
        records[kind] = {"file": relative, "kernels": len(set(KERNEL_DEFINITION.findall(source)))}
    return records
