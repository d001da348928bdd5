"""Make a precision plan: calibrate, measure sensitivity, assign under the budget, check.

:func:`make_plan` is the whole measurement side: calibrate the float model along the sampler trajectory,
measure every layer's sensitivity at every format the target supports (``precision="auto"``; a uniform
precision skips this), assign formats under the budget, and check the result with all layers quantized at
once (the assignment assumes layer errors add; the check says whether they did).
"""

from __future__ import annotations

import contextlib
import fnmatch
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import PrecisionError
from edgediff.precision.assignment import (
    Budget,
    aligned,
    assign,
    candidate_formats,
    layer_options,
    require_supported,
    weight_bytes,
)
from edgediff.precision.calibration import Calibration, LayerInfo, calibrate_as_configured, is_denoiser
from edgediff.precision.overflow import OverflowGuard, find_overflows
from edgediff.precision.plan import LayerPlan, PrecisionConfig, PrecisionPlan
from edgediff.precision.quantizers import UNIFORM_FALLBACK, compute_dtype, float_format, get_format
from edgediff.precision.sensitivity import Sensitivity, measure_assignment, measure_sensitivity

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

# With only a model-size or latency budget there is still a quality floor: without any budget, "auto" means
# the smallest model whose prediction SQNR stays above this (fp16-level error is ~60 dB, int8 weights ~40).
DEFAULT_SQNR_DB = 30.0
# Below this many multiply-accumulates per model call, torch's intra-op threads cost more than they save
# (on a loaded 2-core machine a tiny UNet runs 6x faster on one thread), so the measurement uses one.
SINGLE_THREAD_MACS = 2e9


@contextlib.contextmanager
def _torch_threads(count: int | None) -> Iterator[None]:
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pins(pins: Mapping[str, str], layers: Sequence[LayerInfo]) -> dict[str, str]:
    """Resolve pin patterns (exact names or globs) to layers; a pattern matching nothing is an error."""
    resolved: dict[str, str] = {}
    for pattern, fmt in pins.items():
        get_format(fmt)
        matched = [info.name for info in layers if fnmatch.fnmatchcase(info.name, pattern)]
        if not matched:
            raise PrecisionError(f"pinned layer pattern {pattern!r} matches no quantizable layer")
        resolved.update(dict.fromkeys(matched, get_format(fmt).name))
    return resolved


def _uniform(mode: str, kind: str, float_fmt: str, float_attention: bool) -> str:
    fmt = get_format(mode)
    if kind in fmt.kinds:
        return fmt.name
    if kind == "attention" and float_attention:
        return float_fmt
    return UNIFORM_FALLBACK.get(fmt.name, {}).get(kind, float_fmt)


def keeps_float_attention(spec: TargetSpec) -> bool:
    """Whether attention layers stay in float unless pinned: on CPU targets ``fuse-attention`` computes a
    whole attention in one kernel that never writes its score matrix, measured ~4.5x faster than the int8
    (``a8``) matmuls with a float softmax between them (SD 1.5's 1024-token self-attention, AVX2 and
    AVX512-VNNI alike; BENCHMARKS.md), and more accurate."""
    return spec.kind == "cpu"


def make_plan(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    meta: Mapping[str, Any] | None,
    spec: TargetSpec,
    config: PrecisionConfig,
    *,
    weights: Mapping[str, tuple[tuple[int, ...], str]],
    progress: Callable[[str], None] | None = None,
    int8_column_sums: bool = False,
) -> PrecisionPlan:
    """Measure ``module`` and choose a format for every quantizable layer on target ``spec``.

    ``weights`` maps the compiled graph's weight names to (shape, dtype): layers whose weight is not a
    graph weight are left alone, and everything not quantized counts at its own size in the byte budget.
    ``int8_column_sums``: the target's int8 kernel stores an int32 sum per output channel of each layer
    with int8 activations (``passes.mixed_precision.stores_int8_column_sums``), counted in its bytes.
    """
    from edgediff.targets import CostModel

    dtypes = list(spec.dtypes)
    float_fmt = float_format(dtypes)
    budget = Budget.parse(config.budget)
    auto = config.mode == "auto"
    if not auto:
        require_supported(get_format(config.mode), dtypes, spec.name, "precision")
    notes: list[str] = []

    say = progress or (lambda _text: None)
    say("calibrate")
    calibration = calibrate_as_configured(config, module, example_inputs, input_names, meta)
    layers = [info for info in calibration.layers if info.kind == "attention" or info.weight in weights]
    skipped = [info.name for info in calibration.layers if info not in layers]
    if skipped:
        notes.append(
            f"{len(skipped)} layers are not weights of the graph and keep their precision: {skipped[:3]}"
        )
    pins = _pins(config.pins, layers)
    for name, fmt in pins.items():
        require_supported(get_format(fmt), dtypes, spec.name, f"pinned layer {name}")
        kind = next(info.kind for info in layers if info.name == name)
        if kind not in get_format(fmt).kinds:
            raise PrecisionError(
                f"pinned layer {name} ({kind}) cannot take format {fmt}, which applies to "
                f"{', '.join(get_format(fmt).kinds)} layers"
            )
    split = calibration.timestep_split() if config.timestep_aware else None
    scales = {
        info.name: calibration.activation_scales(info.name, split)
        for info in layers
        if info.kind != "attention"
    }
    float_attention = keeps_float_attention(spec)
    if auto:
        candidates = {
            info.name: [pins[info.name]]
            if info.name in pins
            else [
                f
                for f in candidate_formats(info.kind, dtypes)
                if not (float_attention and info.kind == "attention" and get_format(f).activations)
            ]
            for info in layers
        }
    else:
        candidates = {
            info.name: [pins.get(info.name) or _uniform(config.mode, info.kind, float_fmt, float_attention)]
            for info in layers
        }
    attention = [info.name for info in layers if info.kind == "attention" and info.name not in pins]
    int8_attention = "int8" in dtypes and (auto or get_format(config.mode).activations is not None)
    if float_attention and attention and int8_attention:
        notes.append(
            f"{len(attention)} attention layers keep float on this CPU target: its fused attention kernel is "
            "faster than int8 matmuls around a float softmax; pin them ('*.sdpa': a8) to quantize them"
        )
    guard, guarded = _overflow_guard(calibration, module, config, layers, pins, candidates, dtypes, notes)
    # on a float16-only target the guarded fp32 layers run on the host: fake quantization cannot emulate
    # them (it would round to float16), so they are not measured and count as exact
    unmeasured = {} if "float32" in dtypes else guarded

    macs = sum(info.macs for info in layers) * calibration.model_batch
    threads = 1 if macs < SINGLE_THREAD_MACS else None
    cost_model = CostModel(spec)
    with _torch_threads(threads):
        if auto:
            say("sensitivity")
            small = _sensitivity_calibration(
                module, example_inputs, input_names, meta, config, calibration, layers, notes
            )
            small_scales = (
                scales
                if small is calibration
                else {
                    info.name: small.activation_scales(info.name, split)
                    for info in layers
                    if info.kind != "attention"
                }
            )
            sensitivity = _measure_sensitivity(
                module,
                small,
                {n: c for n, c in candidates.items() if n not in unmeasured},
                dtypes,
                small_scales,
                split,
                config,
                say,
                progress is not None,
                notes,
            )
            notes.append(_sensitivity_note(sensitivity, config))
            errors = {
                n: {f: 0.0 if n in unmeasured else sensitivity.relative_mse(n, f) for f in fmts}
                for n, fmts in candidates.items()
            }
        else:
            sensitivity = None
            errors = {n: {} for n in candidates}
        options = {
            info.name: layer_options(
                info,
                candidates[info.name],
                errors[info.name],
                cost_model,
                dtypes,
                calibration.model_batch,
                int8_column_sums,
            )
            if info.name not in guarded
            else _guarded_options(info, candidates[info.name], cost_model, dtypes, calibration.model_batch)
            for info in layers
        }
        # Say which latency figures are measured on the device and which are the spec's roofline.
        notes.append(cost_model.sources_note(sorted({f for fmts in candidates.values() for f in fmts})))
        planned = {info.weight for info in layers if info.weight}
        fixed = sum(
            aligned(_nbytes(shape, dtype)) for name, (shape, dtype) in weights.items() if name not in planned
        )
        if auto and budget.empty:
            budget = Budget(sqnr_db=DEFAULT_SQNR_DB)
            notes.append(
                f"no budget given: the smallest model with prediction SQNR >= {DEFAULT_SQNR_DB:g} dB"
            )
        say("assign")
        chosen = assign(options, budget, fixed_bytes=fixed, target=spec.name)
        say("check (all layers at once, full size)")
        measured = measure_assignment(
            module,
            calibration,
            _measured(chosen.formats, unmeasured),
            dtypes,
            scales=scales,
            timestep_split=split,
        )
        # The additive error model can be optimistic (errors of consecutive layers compound); tighten the
        # SQNR target by the shortfall and assign again, a few times at most.
        for _ in range(3):
            if not auto or budget.sqnr_db is None or measured[-1] >= budget.sqnr_db:
                break
            tighter = Budget(
                budget.bytes, budget.latency_s, budget.sqnr_db + (budget.sqnr_db - measured[-1]) + 0.5
            )
            try:
                retry = assign(options, tighter, fixed_bytes=fixed, target=spec.name)
            except PrecisionError:
                break
            again = measure_assignment(
                module,
                calibration,
                _measured(retry.formats, unmeasured),
                dtypes,
                scales=scales,
                timestep_split=split,
            )
            chosen, measured, budget = retry, again, tighter
        if auto and budget.sqnr_db is not None and measured[-1] < budget.sqnr_db:
            notes.append(
                f"measured prediction SQNR {measured[-1]:.1f} dB is below the {budget.sqnr_db:g} dB asked: "
                "layer errors compound beyond the additive estimate"
            )

    float_options = {
        info.name: layer_options(info, [float_fmt], {}, cost_model, dtypes, calibration.model_batch)[0]
        for info in layers
    }
    plan_layers = []
    for info in layers:
        fmt = chosen.formats[info.name]
        option = next(o for o in options[info.name] if o.format == fmt)
        plan_layers.append(
            LayerPlan(
                name=info.name,
                kind=info.kind,
                format=fmt,
                weight=info.weight,
                weight_shape=list(info.weight_shape),
                attention_shape=list(info.attention_shape) if info.attention_shape else None,
                scales=scales.get(info.name) if get_format(fmt).activations == "static" else None,
                bytes=option.bytes,
                float_bytes=float_options[info.name].bytes,
                latency_s=option.latency_s,
                sqnr_db={f: round(sensitivity.sqnr_db(info.name, f), 2) for f in candidates[info.name]}
                if sensitivity and info.name not in unmeasured
                else {},
                sqnr_per_step=[round(x, 2) for x in sensitivity.sqnr_per_step(info.name, fmt)]
                if sensitivity and info.name not in unmeasured
                else [],
                pinned=info.name in pins,
                overflow=guarded[info.name] if info.name in guarded and fmt == "fp32" else None,
            )
        )
    totals = {
        "bytes": chosen.bytes,
        "float_bytes": fixed + sum(o.bytes for o in float_options.values()),
        "latency_s": chosen.latency_s,
        "float_latency_s": sum(o.latency_s for o in float_options.values()),
        "predicted_sqnr_db": round(chosen.sqnr_db, 2) if auto else None,
        "measured_sqnr_db": round(measured[-1], 2),
        "measured_sqnr_per_step": [round(x, 2) for x in measured[:-1]],
    }
    return PrecisionPlan(
        mode=config.mode if auto else get_format(config.mode).name,
        target=spec.name,
        dtypes=dtypes,
        layers=plan_layers,
        timestep_split=split if any(p.scales and len(p.scales) > 1 for p in plan_layers) else None,
        budget=budget.to_dict(),
        totals=totals,
        calibration={
            **calibration.summary(),
            "threads": threads or torch.get_num_threads(),
            **(_sensitivity_record(sensitivity, config) if sensitivity else {}),
        },
        notes=notes,
        fp16_guard=guard.to_dict() if guard is not None else {},
    )


def _measure_sensitivity(
    module: nn.Module,
    calibration: Calibration,
    candidates: Mapping[str, Sequence[str]],
    dtypes: Sequence[str],
    scales: Mapping[str, Sequence[float]],
    split: float | None,
    config: PrecisionConfig,
    say: Callable[[str], None],
    bar: bool,
    notes: list[str],
) -> Sensitivity:
    """:func:`measure_sensitivity` as configured, with its progress bar. The transfer estimate needs the
    model's backward pass: a model that cannot run one (an in-place update of a tensor autograd needs) is
    measured by the exhaustive replay instead, with a note."""
    method = config.sensitivity
    while True:
        with _ReplayBar(say, enabled=bar, unit="replay" if method == "replay" else "layer") as progress:
            try:
                return measure_sensitivity(
                    module,
                    calibration,
                    candidates,
                    dtypes,
                    scales=scales,
                    timestep_split=split,
                    progress=progress,
                    method=method,
                    probes=config.sensitivity_probes,
                )
            except RuntimeError as error:
                if method != "transfer":
                    raise
                first_line = (
                    str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                )
                notes.append(f"sensitivity by replay: the model has no usable backward pass ({first_line})")
                method = "replay"


def _sensitivity_note(sensitivity: Sensitivity, config: PrecisionConfig) -> str:
    """Which sensitivity measurement the plan rests on, and what it cost (whole-model work)."""
    if sensitivity.method == "replay":
        return (
            f"sensitivity: exhaustive replay, one calibration replay per layer and format "
            f"({sensitivity.replays} replays, {sensitivity.model_rows} model rows)"
        )
    return (
        f"sensitivity: transfer estimate, local errors carried to the prediction by "
        f"{config.sensitivity_probes} probe passes ({sensitivity.replays} replays, "
        f"{sensitivity.model_rows} model rows forward and backward; sensitivity='replay' measures it exactly)"
    )


def _sensitivity_record(sensitivity: Sensitivity, config: PrecisionConfig) -> dict[str, Any]:
    return {
        "sensitivity": {
            "method": sensitivity.method,
            "probes": config.sensitivity_probes if sensitivity.method == "transfer" else None,
            "replays": sensitivity.replays,
            "model_rows": sensitivity.model_rows,
        }
    }


def _fp16_compute(fmt: str, dtypes: Sequence[str]) -> bool:
    """Whether a layer at ``fmt`` computes on float16 activations (fp16; weight-only formats and the float
    format on float16-only targets), so that an activation beyond 65504 becomes inf."""
    return get_format(fmt).activations is None and compute_dtype(get_format(fmt), dtypes) == "float16"


def _overflow_guard(
    calibration: Any,
    module: nn.Module,
    config: PrecisionConfig,
    layers: Sequence[LayerInfo],
    pins: Mapping[str, str],
    candidates: dict[str, list[str]],
    dtypes: Sequence[str],
    notes: list[str],
) -> tuple[OverflowGuard | None, dict[str, str]]:
    """Apply the fp16 overflow guard to ``candidates`` (in place): a layer whose calibrated activations
    exceed the float16 range (with headroom) loses its float16-computing formats, fp32 if none is left
    (always fp32 on a float16-only target).
    Returns the guard and the guarded layers' reasons (pinned layers keep their pin, with a note)."""
    if config.fp16_headroom is None:
        return None, {}
    guard = find_overflows(calibration, config.fp16_headroom, module)
    guarded: dict[str, str] = {}
    for layer in guard.layers:
        fmts = candidates.get(layer.name)
        if not fmts or not any(_fp16_compute(f, dtypes) for f in fmts):
            continue
        if layer.name in pins:
            notes.append(f"{layer.name} is pinned to {pins[layer.name]} but {layer.reason(guard.limit)}")
            continue
        # with float32 on the target, formats keeping float32 activations (w8, w4, int8) remain choices; a
        # float16-only target runs the layer in fp32 on its host CPU (the cast-to-fp16 guard does the same)
        safe = [f for f in fmts if not _fp16_compute(f, dtypes)] if "float32" in dtypes else []
        candidates[layer.name] = safe or ["fp32"]
        if candidates[layer.name] == ["fp32"]:
            guarded[layer.name] = layer.reason(guard.limit)
    if guarded and "float32" not in dtypes:
        notes.append(
            f"{len(guarded)} layers overflow float16 and keep fp32 on the host CPU ({', '.join(guarded)})"
        )
    return guard, guarded


def _guarded_options(
    info: LayerInfo, fmts: Sequence[str], cost_model: Any, dtypes: Sequence[str], batch: int
) -> list[Any]:
    """Options of a layer the overflow guard keeps in fp32. A float16-only target has no float32 figures
    (its fp32 layers run on the host CPU): the latency is then estimated at the target's float16 rate."""
    if "float32" in dtypes:
        return layer_options(info, fmts, {}, cost_model, dtypes, batch)
    estimate = layer_options(info, ["fp16"], {}, cost_model, dtypes, batch)[0]
    return [replace(estimate, format="fp32", bytes=weight_bytes(info, get_format("fp32")))]


def _measured(formats: Mapping[str, str], guarded: Mapping[str, str]) -> dict[str, str]:
    """The formats the fake-quantized measurement applies: a guarded fp32 layer runs in float32 even on a
    float16-only target (on its host CPU), so it is left out (the float model computes it)."""
    return {name: fmt for name, fmt in formats.items() if not (name in guarded and fmt == "fp32")}


class _ReplayBar:
    """Progress of the sensitivity measurement (replays, or layers of the transfer passes): a tqdm bar with
    rate and ETA (drawn on a terminal), and the same ``done/total`` and ETA through the compile's stage
    callback (seen in logs and pipes too)."""

    def __init__(self, say: Callable[[str], None], *, enabled: bool, unit: str = "replay") -> None:
        self.say = say
        self.enabled = enabled
        self.unit = unit
        self.bar: Any = None
        self.start = 0.0

    def __enter__(self) -> _ReplayBar:
        self.start = time.monotonic()
        return self

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        from tqdm.auto import tqdm

        if self.bar is None:
            self.bar = tqdm(
                total=total, desc="sensitivity", unit=self.unit, leave=False, disable=not sys.stderr.isatty()
            )
        self.bar.update(1)
        elapsed = time.monotonic() - self.start
        eta = tqdm.format_interval(elapsed / done * (total - done)) if done else "?"
        self.say(f"sensitivity {done}/{total} ETA {eta}")

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()


def _sensitivity_calibration(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    meta: Mapping[str, Any] | None,
    config: PrecisionConfig,
    calibration: Calibration,
    layers: Sequence[LayerInfo],
    notes: list[str],
) -> Calibration:
    """The calibration the sensitivity replays run on: the same sampler trajectory at a latent whose
    largest side is ``config.sensitivity_latent`` (layer errors transfer by name to the full-size plan), or
    the full-size one when that is off, not smaller, not a denoiser, or the model does not run there."""
    sample = example_inputs[0]
    target = config.sensitivity_latent
    if not target or not is_denoiser(input_names) or sample.ndim != 4 or max(sample.shape[2:]) <= target:
        return calibration
    height, width = (max(1, round(int(d) * target / max(sample.shape[2:]))) for d in sample.shape[2:])
    small_inputs = (torch.zeros((*sample.shape[:2], height, width), dtype=sample.dtype), *example_inputs[1:])
    try:
        small = calibrate_as_configured(config, module, small_inputs, input_names, meta)
    except Exception as error:  # a model tied to its size (fixed position embeddings): measure at full size
        notes.append(f"sensitivity at full size: the model does not run at latent {height}x{width} ({error})")
        return calibration
    missing = {info.name for info in layers} - {info.name for info in small.layers}
    if missing:
        notes.append(
            f"sensitivity at full size: {sorted(missing)[0]} does not run at latent {height}x{width}"
        )
        return calibration
    notes.append(
        f"sensitivity measured at latent {height}x{width} and transferred by layer name "
        f"(full size {tuple(int(d) for d in sample.shape[2:])}; sensitivity_latent=None measures it exactly)"
    )
    return small


def _nbytes(shape: Sequence[int], dtype: str) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


def plan_for_compile(
    request: PrecisionConfig | PrecisionPlan,
    captured: Any,
    imported: Any,
    spec: TargetSpec,
    progress: Callable[[str], None] | None = None,
    int8_column_sums: bool = False,
) -> PrecisionPlan:
    """The plan ``compile_model`` realises: a given plan as is, else one measured on the captured torch
    model, accounting bytes against the weights the Relax import actually holds (``int8_column_sums``: see
    :func:`make_plan`)."""
    weights = {
        name: (tuple(int(d) for d in w.shape), str(w.dtype))
        for name, w in zip(imported.weight_names, imported.weights, strict=True)
    }
    if isinstance(request, PrecisionPlan):
        missing = [layer.weight for layer in request.layers if layer.weight and layer.weight not in weights]
        if missing:
            raise PrecisionError(
                f"the precision plan names weight {missing[0]!r}, which this model does not have"
            )
        return request
    if captured.source != "torch" or captured.torch_module is None:
        raise PrecisionError(
            f"precision={request.mode!r} measures the float PyTorch model; {captured.name} is a "
            f"{captured.source} model (compile it from PyTorch, or without precision)"
        )
    return make_plan(
        captured.torch_module,
        captured.example_inputs,
        captured.input_names,
        captured.meta,
        spec,
        request,
        weights=weights,
        progress=progress,
        int8_column_sums=int8_column_sums,
    )
