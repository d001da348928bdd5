"""``edgediff.compile_model``: capture -> passes -> TVM build -> artifact; ``compile_pipeline``: the
artifact set (denoiser, decoder, text encoder + tokenizer) that ``edgediff generate`` runs."""

from __future__ import annotations

import datetime
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgediff.backend.build import build, device_sources, export_library
from edgediff.backend.workspace import memory_record
from edgediff.backend.write_artifact import atomic_directory, file_record, write_manifest, write_weights
from edgediff.errors import InputError
from edgediff.frontend.capture import CapturedModel, capture
from edgediff.frontend.multires import (
    LoweredEntry,
    capture_resolutions,
    decision_order,
    entry_name,
    format_resolution,
    merge_entries,
    parse_resolutions,
    plan_at,
    share_weights,
    winograd_plan,
)
from edgediff.frontend.relax_import import ImportedModel, import_to_relax
from edgediff.linear_attention import LinearAttentionConfig, calibrate_attention, resolve_linear_attention
from edgediff.passes import resolve_pipeline
from edgediff.passes.analysis import kernel_count
from edgediff.passes.npu_tiling import npu_tiling_plan
from edgediff.passes.pack_matmul_weights import weight_layouts
from edgediff.passes.runner import PassResult, run_passes, weight_transform
from edgediff.precision.plan import resolve_request
from edgediff.runtime.artifact import FORMAT_VERSION, Artifact
from edgediff.targets import TargetSpec, load_target

STAGES = ("capture", "import", "passes", "build", "export", "write")
DEVICE_SOURCE_SUFFIX = {"opencl": ".cl", "vulkan": ".spv.txt", "metal": ".metal"}
# A kernel definition (not the forward declarations TVM repeats at the top of each kernel's source).
KERNEL_DEFINITION = re.compile(r"(?:__kernel|kernel)\s+void\s+(\w+)\s*\([^;{]*\)\s*\{")


def _stage_key(label: str) -> str:
    """The stage a progress label belongs to: one per pass and per resolution count as "passes", and the
    counts and ETAs of a long stage ("sensitivity 40/314 ETA 01:10") are not part of its name."""
    if label.startswith("pass"):
        return "passes"
    return re.split(r" \d", label, maxsplit=1)[0]


class _Progress:
    """One tqdm bar over the compile stages (silent when disabled)."""

    def __init__(self, enabled: bool, name: str, target: str) -> None:
        self.bar = None
        # wall seconds per stage (the manifest's ``stage_seconds``): where a long compile spent its time
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None
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
        self._clock(_stage_key(label))
        if self.bar is not None:
            self.bar.set_postfix_str(label)

    def _clock(self, key: str | None) -> None:
        now = time.perf_counter()
        if self._current is not None:
            name, since = self._current
            self.seconds[name] = self.seconds.get(name, 0.0) + now - since
        self._current = None if key is None else (key, now)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds per stage so far (the stage under way included)."""
        if self._current is not None:
            self._clock(self._current[0])
        return {name: round(seconds, 2) for name, seconds in self.seconds.items()}

    def advance(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self, *, failed: bool) -> None:
        self._clock(None)
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


def _target_notes(spec: TargetSpec) -> list[str]:
    notes = []
    if spec.kind == "npu":
        host_triple = spec.tvm_target.get("mtriple", "host") if isinstance(spec.tvm_target, dict) else "host"
        notes.append(
            "NPU program (SRAM tiles, DMA) in npu_program.json when the npu-tiling pass runs; it is "
            "simulated "
            "(edgediff.npu.simulator), and every kernel is also built for the NPU's host CPU "
            f"({host_triple}), which is what model.so runs"
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
    precision: Any = None,
    precision_budget: Mapping[str, Any] | None = None,
    pass_options: Mapping[str, Mapping[str, Any]] | None = None,
    linear_attention: Any = None,
    resolutions: Any = None,
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
        precision: ``None`` (the model's own precision), ``"auto"`` (per-layer formats measured along the
            sampling trajectory, see :mod:`edgediff.precision`), one format for every layer (``"fp16"``,
            ``"w8"``, ``"int8"`` = ``"w8a8"``, ``"w8a8-token"``, ``"int4"`` = ``"w4"``), a
            :class:`~edgediff.precision.PrecisionConfig` (pins, calibration) or a ready
            :class:`~edgediff.precision.PrecisionPlan`.
        precision_budget: for ``"auto"``: ``{"bytes": 1e9 or "1GB", "latency_ms": ..., "sqnr_db": ...}``.
        pass_options: keyword arguments for individual passes by name, e.g.
            ``{"winograd-conv2d": {"variant": 4, "error_bound": 1e-4}}``.
        linear_attention: off (None) by default. ``{"feature_map": "taylor2", "max_error": 0.01}`` rewrites
            the softmax attention layers whose measured error is under the bound (per kind:
            ``{"self": 0.01, "cross": 0.0}``) and that the cost model expects to be faster; a feature-map
            name alone (``"relu"``) or ``fine_tuned=True`` is for weights fine-tuned with that map: every
            layer is rewritten (see :mod:`edgediff.linear_attention`).
        resolutions: image sizes ``(height, width)`` in pixels (or ``"768x512,512x512"``) for a zoo model
            or diffusers folder: one artifact with an entry per resolution, each compiled for its own static
            shapes, sharing one copy of the weights; the first is the default (``main``). The runtime picks
            the entry from the latent's shape (see :mod:`edgediff.frontend.multires`).

    Returns:
        The written :class:`Artifact`; ``artifact.load()`` gives a callable for host-runnable targets.
    """
    request = plan_request(
        target, passes, precision, precision_budget, linear_attention, resolutions, pass_options
    )
    start = time.perf_counter()
    bar = _Progress(progress, name or _display_name(model), request.spec.name)
    failed = True
    try:
        bar.stage("capture (torch.export)")
        captures = capture_stage(
            model,
            example_inputs,
            request,
            input_names=input_names,
            name=name,
            batch=batch,
            latent_size=latent_size,
        )
        bar.advance()

        bar.stage("import (fx -> Relax)")
        imported = import_stage(captures)
        plans = plan_stage(captures, imported, request, bar)
        bar.advance()

        lowered = passes_stage(imported, request, plans, bar)
        bar.advance()

        bar.stage("build (TVM)")
        executable, build_stats = build_stage(lowered.mod, request.spec)
        bar.advance()

        destination = (
            Path(output_dir)
            if output_dir
            else Path("edgediff-out") / f"{captures[0].name}-{request.spec.name}"
        )
        write_stage(
            destination,
            executable,
            build_stats,
            captures[0],
            imported,
            lowered,
            plans,
            request,
            started=start,
            require_cross_compiler=require_cross_compiler,
            bar=bar,
        )
        failed = False
    finally:
        bar.close(failed=failed)
    return Artifact(destination)


# --- the stages of compile_model, in order ----------------------------------------------------------------


@dataclass
class CompileRequest:
    """What the user asked for, resolved and checked before any work: the target, the passes in the
    compiler's order, the precision and linear-attention requests, the resolutions."""

    spec: TargetSpec
    pass_names: list[str]
    precision: Any  # edgediff.precision.plan.PrecisionRequest | None
    linear_attention: LinearAttentionConfig | None
    resolutions: list[tuple[int, int]] | None
    pass_options: dict[str, dict[str, Any]]


def plan_request(
    target: Any,
    passes: Iterable[str] | Mapping[str, bool] | None,
    precision: Any,
    precision_budget: Mapping[str, Any] | None,
    linear_attention: Any,
    resolutions: Any,
    pass_options: Mapping[str, Mapping[str, Any]] | None,
) -> CompileRequest:
    """Resolve ``compile_model``'s options: every bad option fails here, before a model is captured."""
    spec = load_target(target)
    pass_names = resolve_pipeline(spec, passes)
    precision_request = resolve_request(precision, precision_budget, spec)
    if precision_request is not None:
        pass_names = resolve_pipeline(spec, [*pass_names, "mixed-precision"])
    # float16 builds get the overflow guard unless it is switched off by name; a list of passes (or a
    # target spec's own list) is run exactly as given
    guard_off = isinstance(passes, Mapping) and passes.get("fp16-overflow-guard") is False
    explicit = passes is not None and not isinstance(passes, Mapping)
    wanted = not (guard_off or explicit or "fp16-overflow-guard" in pass_names)
    if "cast-to-fp16" in pass_names and wanted:
        pass_names = resolve_pipeline(spec, [*pass_names, "fp16-overflow-guard"])
    linear_config = resolve_linear_attention(linear_attention)
    if linear_config is not None:
        pass_names = resolve_pipeline(spec, [*pass_names, "rewrite-linear-attention"])
    return CompileRequest(
        spec,
        pass_names,
        precision_request,
        linear_config,
        None if resolutions is None else parse_resolutions(resolutions),
        {name: dict(opts) for name, opts in (pass_options or {}).items()},
    )


def capture_stage(
    model: Any,
    example_inputs: Sequence[Any] | None,
    request: CompileRequest,
    *,
    input_names: Sequence[str] | None,
    name: str | None,
    batch: int | None,
    latent_size: int | None,
) -> list[CapturedModel]:
    """torch.export (or ONNX loading) of the model: one capture, or one per resolution."""
    if request.resolutions is None:
        return [
            capture(
                model,
                example_inputs,
                input_names=input_names,
                name=name,
                batch=batch,
                latent_size=latent_size,
            )
        ]
    if latent_size is not None or example_inputs is not None:
        raise InputError("give resolutions or latent_size / example_inputs, not both")
    return capture_resolutions(model, request.resolutions, input_names=input_names, name=name, batch=batch)


def import_stage(captures: list[CapturedModel]) -> list[ImportedModel]:
    """fx -> Relax for each capture; the entries then share one copy of each weight."""
    imported = [import_to_relax(one) for one in captures]
    share_weights(imported)
    return imported


@dataclass
class Plans:
    """What is decided on the torch model before it is dropped: the precision plan and the options each
    pass gets (the linear-attention calibration among them)."""

    precision: Any  # edgediff.precision.plan.PrecisionPlan | None
    pass_options: dict[str, dict[str, Any]]


def plan_stage(
    captures: list[CapturedModel], imported: list[ImportedModel], request: CompileRequest, bar: _Progress
) -> Plans:
    """Measure what needs the torch model (precision plan, linear-attention errors), then let it go."""
    captured = captures[0]
    pass_options = {name: dict(opts) for name, opts in request.pass_options.items()}
    plan = None
    if request.precision is not None:
        from edgediff.passes.mixed_precision import stores_int8_column_sums
        from edgediff.precision.planner import plan_for_compile

        plan = plan_for_compile(
            request.precision,
            captured,
            imported[0],
            request.spec,
            progress=lambda s: bar.stage(f"precision: {s}"),
            int8_column_sums=stores_int8_column_sums(request.spec),
        )
    guard_options = pass_options.get("fp16-overflow-guard", {})
    if "fp16-overflow-guard" in request.pass_names and "guard" not in guard_options:
        bar.stage("fp16 overflow guard: calibration")
        pass_options.setdefault("fp16-overflow-guard", {})["guard"] = _overflow_guard(
            captured, plan, request.precision
        )
    config = request.linear_attention
    if config is not None:
        records = None
        if not config.fine_tuned:
            if len(captures) > 1:
                raise InputError(
                    "linear_attention with measured selection takes one resolution (calibration pairs"
                    " the layers of one shape); give fine_tuned=True or compile each resolution apart"
                )
            bar.stage("linear attention: calibration")
            records = calibrate_attention(captured.torch_module, captured.example_inputs, config)
        pass_options["rewrite-linear-attention"] = {"config": config, "calibration": records}
    # the Relax modules now own copies of the weights: let the torch graphs go before the build
    for one in captures:
        one.exported_program = one.torch_module = None
    return Plans(plan, pass_options)


def _overflow_guard(captured: CapturedModel, plan: Any, request: Any) -> Any:
    """The fp16 overflow guard of a float16 build: the plan's (same calibration), else measured on the
    torch model with the planner's calibration; None where there is no torch model or it is switched off."""
    from edgediff.precision.overflow import OverflowGuard, measure_overflow
    from edgediff.precision.plan import PrecisionConfig

    if plan is not None:
        return OverflowGuard.from_dict(plan.fp16_guard) if plan.fp16_guard else None
    config = request if isinstance(request, PrecisionConfig) else PrecisionConfig()
    if config.fp16_headroom is None or captured.source != "torch" or captured.torch_module is None:
        return None
    from edgediff.errors import PrecisionError

    try:
        return measure_overflow(
            captured.torch_module, captured.example_inputs, captured.input_names, captured.meta, config
        )
    except PrecisionError as err:  # e.g. no conv/linear/attention layer: nothing to guard, the build goes on
        return OverflowGuard(note=f"fp16 overflow guard: not checked ({err})")


@dataclass
class Lowered:
    """The pass pipeline's result: one module with every entry, its stored weights, and per entry the
    pass results, kernel count and how the stored weights were made."""

    mod: Any
    arrays: list[Any]
    names: list[str]
    results: list[list[PassResult]]
    kernels: list[int]
    provenance: list[dict[str, Any]]


def passes_stage(
    imported: list[ImportedModel], request: CompileRequest, plans: Plans, bar: _Progress
) -> Lowered:
    """Run the pass pipeline on each entry (the largest resolution first, whose Winograd choices every entry
    then takes), compute the stored weights, and merge the entries into one module."""
    sizes: list[Any] = request.resolutions or [None]  # None: the one shape of an ordinary build
    pass_options = plans.pass_options
    entries: list[Any] = [None] * len(sizes)
    results: list[Any] = [None] * len(sizes)
    provenance: list[Any] = [None] * len(sizes)
    done: list[Any] = []  # weight computations already run (see _stored_weights)
    for index in decision_order(request.resolutions) if request.resolutions else [0]:
        options = {name: dict(opts) for name, opts in pass_options.items()}
        if plans.precision is not None:  # measured at the first size; attention token counts scaled
            latents = [imported[i].inputs[0].shape[-2:] for i in (0, index)]
            options["mixed-precision"] = {
                "plan": plan_at(plans.precision, *latents),
                "weight_names": imported[index].weight_names,
            }
        if "fp16-overflow-guard" in options:  # the guard finds its layers by weight name, like the plan
            options["fp16-overflow-guard"]["weight_names"] = imported[index].weight_names
        if len(sizes) > 1:
            bar.stage(f"passes at {format_resolution(sizes[index])}")
        mod, results[index] = run_passes(
            imported[index].mod,
            request.spec,
            request.pass_names,
            on_pass=lambda p: bar.stage(f"pass {p}"),
            options=options,
        )
        # the first run (the largest resolution) decides the per-layer Winograd variants of every
        # entry, so that all of them store the same transformed weights
        chosen = winograd_plan(results[index])
        if chosen is not None and "plan" not in pass_options.get("winograd-conv2d", {}):
            pass_options.setdefault("winograd-conv2d", {})["plan"] = chosen
        bar.stage("precompute weight transforms")
        arrays, names, provenance[index] = _stored_weights(
            imported[index], plans.precision, results[index], done
        )
        entries[index] = LoweredEntry(entry_name(index, sizes[index]), sizes[index], mod, arrays, names)
    kernels = [kernel_count(entry.mod) for entry in entries]
    mod, arrays, names = merge_entries(entries)
    for one in imported:  # the stored weights are computed: the build runs without the originals
        one.weights = []
    return Lowered(mod, arrays, names, results, kernels, provenance)


def build_stage(mod: Any, spec: TargetSpec) -> tuple[Any, dict[str, Any]]:
    """TVM build of the scheduled module; also returns the planned activation workspace."""
    build_stats: dict[str, Any] = {}
    return build(mod, spec, stats=build_stats), build_stats


def write_stage(
    destination: Path,
    executable: Any,
    build_stats: dict[str, Any],
    captured: CapturedModel,
    imported: list[ImportedModel],
    lowered: Lowered,
    plans: Plans,
    request: CompileRequest,
    *,
    started: float,
    require_cross_compiler: bool,
    bar: _Progress,
) -> None:
    """Write the artifact atomically: library (cross-linked when needed), device code, weights, manifest and
    the precision / NPU reports."""
    spec = request.spec
    pass_results = lowered.results[0]
    with atomic_directory(destination) as staging:
        bar.stage("export library")
        library = export_library(executable, spec, staging, require_compiler=require_cross_compiler)
        device_code = _write_device_sources(executable, staging)
        bar.advance()

        bar.stage("write weights + manifest")
        weights = write_weights(staging, lowered.arrays, lowered.names)
        weights.update(lowered.provenance[0])  # the entries share their weights: the first one's say it all
        notes = _target_notes(spec) + ([library.note] if library.note else [])
        manifest = {
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "compile_seconds": round(time.perf_counter() - started, 3),
            "stage_seconds": bar.stage_seconds(),
            "model": {
                "name": captured.name,
                "family": captured.family,
                "source": captured.source,
                "meta": captured.meta,
            },
            "target": spec.to_dict(),
            "runs_on_host": bool(spec.runs_on_host and library.format == "shared"),
            "inputs": [info.to_dict() for info in imported[0].inputs],
            "outputs": [info.to_dict() for info in imported[0].outputs],
            "passes": [
                {"name": r.name, "seconds": round(r.seconds, 3), "report": r.report.to_dict()}
                for r in pass_results
            ],
            "library": {
                **file_record(staging, library.file),
                "format": library.format,
                "compiler": library.compiler,
            },
            "weights": weights,
            "memory": memory_record(weights, build_stats, pass_results),
            "device_code": device_code,
            "versions": _versions(captured.source),
            "notes": notes,
        }
        if request.resolutions is not None:
            manifest["resolutions"] = [
                {
                    **_resolution_record(entry_name(i, res), res, imported[i], lowered.results[i]),
                    "kernels": lowered.kernels[i],
                }
                for i, res in enumerate(request.resolutions)
            ]
            # kernels equal at every size are in the library once
            manifest["library"]["kernels"] = kernel_count(lowered.mod)
        if plans.precision is not None:
            from edgediff.precision.report import write_report

            manifest["precision"] = write_report(staging, plans.precision)
        tiling = npu_tiling_plan(pass_results)
        if tiling is not None:  # the NPU program, its per-block DRAM table and plot
            from edgediff.npu.tiling_report import write_report as write_tiling_report

            manifest["npu"] = write_tiling_report(staging, tiling.analysis, tiling.program)
        write_manifest(staging, manifest)
        bar.advance()


def _stored_weights(
    imported: Any, plan: Any, results: list[Any], done: list[tuple[Any, list[str], list[Any], list[str]]]
) -> tuple[list[Any], list[str], dict[str, Any]]:
    """The weights one entry's ``main`` takes, as stored: quantized by the precision plan, then through the
    compile-time weight transform; and the manifest's record of how they were made (``transforms``: stored
    name -> kernels, ``layouts``: weights stored in a kernel's layout), which a LoRA merge reads. ``done``
    holds the transforms earlier entries ran: an equal transform of the same weights is not run again, so
    the entries share the very same arrays."""
    import tvm_ffi

    arrays, names = list(imported.weights), list(imported.weight_names)
    for stage, inputs, outputs, output_names in done:
        if stage == "quantize" and inputs == names:
            arrays, names = outputs, output_names
            break
    else:
        if plan is not None:  # the weight half of the mixed-precision rewrite
            from edgediff.passes.mixed_precision import quantize_weights

            quantized, quantized_names = quantize_weights(plan, arrays, names)
            done.append(("quantize", names, list(quantized), list(quantized_names)))
            arrays, names = list(quantized), list(quantized_names)
    provenance: dict[str, Any] = {"transforms": {}}
    layouts = weight_layouts(results, names)
    if layouts:
        provenance["layouts"] = layouts
    transform = weight_transform(results)
    if transform is None:
        return arrays, names, provenance
    provenance["transforms"] = transform.kernel_chains(names)
    key = (transform.kept, transform.transform_inputs, names)
    for stage, inputs, outputs, output_names in done:
        if (
            not isinstance(stage, str)
            and (stage.kept, stage.transform_inputs, inputs) == key
            and tvm_ffi.structural_equal(stage.module, transform.module)
        ):
            return outputs, output_names, provenance
    transformed, transformed_names = transform.apply(arrays, names)
    done.append((transform, names, list(transformed), list(transformed_names)))
    return list(transformed), list(transformed_names), provenance


def _resolution_record(
    function: str, resolution: tuple[int, int], imported: Any, results: list[Any]
) -> dict[str, Any]:
    """The manifest's record of one entry: its resolution, function, signature and pass summaries (the
    default entry's full reports are the manifest's ``passes``)."""
    return {
        "function": function,
        "height": resolution[0],
        "width": resolution[1],
        "inputs": [info.to_dict() for info in imported.inputs],
        "outputs": [info.to_dict() for info in imported.outputs],
        "passes": [{"name": r.name, "summary": r.report.summary} for r in results],
    }


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


# The subfolder of a diffusers pipeline folder each role of an artifact set comes from (None: load_local's
# own choice, the unet/ or transformer/).
PIPELINE_SUBFOLDERS = {
    "denoiser": None,
    "decoder": "vae",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
}


def compile_pipeline(
    denoiser: Any,
    decoder: Any = None,
    text_encoder: Any = None,
    tokenizer: str | os.PathLike | None = None,
    *,
    target: Any = "host",
    output_dir: str | os.PathLike,
    batch: int = 2,
    progress: bool = True,
    require_cross_compiler: bool = False,
    decoder_tile: int | None = None,
    resolutions: Any = None,
    max_sequence_length: int | None = None,
) -> Path:
    """Compile an artifact set: ``output_dir`` with ``denoiser/``, and ``decoder/``, ``text_encoder/`` and
    ``tokenizer/`` when given, which ``Pipeline.from_directory`` and ``edgediff generate`` run.

    Each model is a zoo name, a :class:`~edgediff.zoo.ZooModel`, or a local folder: a component folder, or a
    diffusers pipeline folder whose ``unet``/``transformer``, ``vae`` or ``text_encoder`` is taken.
    ``tokenizer`` is a CLIP tokenizer folder (default: the ``tokenizer/`` beside a local text encoder); it is
    copied, not compiled. The denoiser is built for the text encoder's sequence length and the decoder for
    the denoiser's latent size; the text encoder must make the denoiser's conditioning (one input of its
    width, as SD 1.x/2.x UNets take it) and the tokenizer must fit the text encoder, all checked before
    anything is compiled. ``batch`` is the denoiser's (2: one-call classifier-free guidance; the text
    encoder runs once per prompt). ``decoder_tile`` (a latent size) also compiles the decoder for tiles of
    that size into ``decoder_tile/``: a memory-capped run decodes in overlapping tiles with it.
    ``resolutions`` (see :func:`compile_model`) apply to the denoiser and the decoder alike, so that every
    latent the denoiser makes can be decoded. The set is written atomically, like an artifact.

    A pipeline folder of SDXL, PixArt-alpha, SANA or DiT as ``denoiser`` is compiled whole, every component
    from the folder (see :mod:`edgediff.zoo.pipelines`); ``max_sequence_length`` is then the prompt tokens
    of PixArt-alpha (default 120) or SANA (300).
    """
    from edgediff import zoo
    from edgediff.errors import InputError
    from edgediff.runtime.tokenizer import TOKENIZER_FILES, CLIPTokenizer
    from edgediff.zoo.pipelines import pipeline_family

    if pipeline_family(denoiser) is not None:
        return _compile_family_set(
            Path(denoiser),
            {"decoder": decoder, "text_encoder": text_encoder, "tokenizer": tokenizer},
            target=target,
            output_dir=output_dir,
            batch=batch,
            progress=progress,
            require_cross_compiler=require_cross_compiler,
            decoder_tile=decoder_tile,
            resolutions=resolutions,
            max_sequence_length=max_sequence_length,
        )
    if max_sequence_length is not None:
        raise InputError("max_sequence_length applies to PixArt-alpha and SANA pipeline folders only")
    enc = tok = None
    if text_encoder is not None:
        enc = _set_component(text_encoder, "text_encoder")
        if enc.family != "text-encoder":
            raise InputError(f"text encoder {enc.name} is a {enc.family}")
        if tokenizer is None:
            tokenizer = _beside(text_encoder, "tokenizer")
        if tokenizer is None:
            raise InputError(
                f"text encoder {enc.name} needs its tokenizer folder: pass tokenizer= (--tokenizer DIR)"
            )
        if (Path(tokenizer) / "model_index.json").is_file():
            tokenizer = Path(tokenizer) / PIPELINE_SUBFOLDERS["tokenizer"]
        tok = CLIPTokenizer.from_directory(tokenizer)
        tok.check_fits(enc.meta, f"text encoder {enc.name}")
    elif tokenizer is not None:
        raise InputError("a tokenizer without a text encoder has nothing to feed; pass text_encoder too")

    # A UNet attends to any number of text tokens: give it the encoder's (its tokenizer pads to that many).
    seq_len = enc.meta["seq_len"] if enc is not None else None
    den = _set_component(denoiser, "denoiser", batch=batch, seq_len=seq_len)
    denoisers = [f for f in zoo.FAMILIES if f not in ("vae-decoder", "text-encoder")]
    if den.family not in denoisers:
        raise InputError(f"denoiser {den.name} is a {den.family}; expected one of {', '.join(denoisers)}")
    if enc is not None:
        makes = (enc.meta["seq_len"], enc.meta["hidden_size"])
        takes = [tuple(t.shape[1:]) for t in den.example_inputs[2:]]
        if takes != [makes]:
            raise InputError(
                f"text encoder {enc.name} makes [1, {makes[0]}, {makes[1]}] embeddings; the denoiser "
                f"{den.name} takes {list(den.input_names[2:])} of {[[1, *t] for t in takes]}"
            )
    dec = None
    if decoder is not None:
        sample = tuple(den.example_inputs[0].shape[1:])
        dec = _set_component(decoder, "decoder", latent_size=den.meta["latent_size"])
        if dec.family != "vae-decoder" or tuple(dec.example_inputs[0].shape[1:]) != sample:
            raise InputError(
                f"decoder {dec.name} ({dec.family}) takes {list(dec.example_inputs[0].shape)}; the denoiser "
                f"makes latents {[1, *sample]}"
            )

    tile_dec = None
    if decoder_tile is not None:
        if decoder is None or not 0 < decoder_tile <= den.meta["latent_size"]:
            raise InputError(
                f"decoder_tile {decoder_tile} needs a decoder and a tile no larger than the latents "
                f"({den.meta['latent_size']})"
            )
        if isinstance(decoder, zoo.ZooModel):  # built for one latent size already
            raise InputError("decoder_tile needs the decoder as a zoo name or folder, not a built ZooModel")
        tile_dec = _set_component(decoder, "decoder", latent_size=decoder_tile)

    with atomic_directory(Path(output_dir)) as staging:
        roles = {"denoiser": den, "decoder": dec, "text_encoder": enc, "decoder_tile": tile_dec}
        _compile_roles(staging, roles, target, progress, require_cross_compiler, resolutions)
        if tok is not None and tok.path is not None:
            (staging / "tokenizer").mkdir()
            for name in TOKENIZER_FILES:
                if (tok.path / name).is_file():
                    shutil.copy2(tok.path / name, staging / "tokenizer" / name)
    return Path(output_dir)


def _compile_family_set(
    root: Path,
    others: Mapping[str, Any],
    *,
    target: Any,
    output_dir: str | os.PathLike,
    batch: int,
    progress: bool,
    require_cross_compiler: bool,
    decoder_tile: int | None,
    resolutions: Any,
    max_sequence_length: int | None,
) -> Path:
    """An SDXL, PixArt-alpha, SANA or DiT pipeline folder as an artifact set: every component the family
    needs comes from the folder (see :mod:`edgediff.zoo.pipelines`), all loaded and checked before any is
    compiled; the tokenizers are copied and ``conditioning.json`` says how the runtime builds the
    conditioning from prompts."""
    import json

    from edgediff.runtime.conditioning import CONDITIONING_FILE
    from edgediff.zoo.pipelines import plan_set

    for role, value in others.items():
        # the folder holds the components that fit its denoiser: another one would be a mismatch
        if value is not None and (not isinstance(value, (str, os.PathLike)) or Path(value) != root):
            raise InputError(
                f"{root} is a pipeline folder: its {role} comes from it; do not pass {role}= (got {value})"
            )
    if decoder_tile is not None:
        raise InputError("decoder_tile is supported for SD 1.x/2.x sets only")
    plan = plan_set(
        root, batch=batch, decoder=(root / "vae").is_dir(), max_sequence_length=max_sequence_length
    )
    with atomic_directory(Path(output_dir)) as staging:
        _compile_roles(staging, plan.models, target, progress, require_cross_compiler, resolutions)
        for name, source in plan.tokenizers.items():
            shutil.copytree(source, staging / name)
        if plan.conditioning is not None:
            (staging / CONDITIONING_FILE).write_text(json.dumps(plan.conditioning, indent=1) + "\n")
    return Path(output_dir)


def _compile_roles(
    staging: Path,
    models: Mapping[str, Any],
    target: Any,
    progress: bool,
    require_cross_compiler: bool,
    resolutions: Any,
) -> None:
    """Compile each model of an artifact set into ``staging/<role>`` (None: the set has no such role)."""
    for role, model in models.items():
        if model is not None:
            compile_model(
                model,
                target=target,
                output_dir=staging / role,
                progress=progress,
                require_cross_compiler=require_cross_compiler,
                # the text encoders' outputs do not depend on the image size; the tile decoder's input is
                # one tile, whatever the image size
                resolutions=resolutions if role in ("denoiser", "decoder") else None,
            )


def _set_component(model: Any, role: str, **options: Any) -> Any:
    """A zoo name, local folder or ZooModel as the ZooModel of one role of an artifact set."""
    from edgediff import zoo
    from edgediff.errors import ModelNotFoundError

    if isinstance(model, zoo.ZooModel):
        return model
    if not isinstance(model, (str, os.PathLike)):
        raise ModelNotFoundError(
            f"{role}: expected a zoo name, a local folder or a ZooModel, got a {type(model).__name__}"
        )
    path = Path(model)
    if path.is_dir():
        subfolder = PIPELINE_SUBFOLDERS[role] if (path / "model_index.json").is_file() else None
        return zoo.load_local(path, subfolder=subfolder, **options)
    if os.path.sep in os.fspath(model) or os.fspath(model).startswith("."):
        raise ModelNotFoundError(f"{role}: model path '{os.fspath(model)}' does not exist")
    return zoo.build(os.fspath(model), **options)


def _beside(model: Any, subfolder: str) -> Path | None:
    """``subfolder`` of the pipeline folder a local component came from (or is), if there is one."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_dir():
        return None
    path = Path(model)
    for pipeline in (path, path.parent):
        if (pipeline / "model_index.json").is_file() and (pipeline / subfolder).is_dir():
            return pipeline / subfolder
    return None
