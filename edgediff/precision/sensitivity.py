"""Sensitivity: how much each layer, alone at each candidate precision, disturbs the noise prediction.

The measurement is fake quantization on the float torch model (the compiled artifact then realises the
chosen plan): a layer's weights are replaced by ``dequantize(quantize(w))`` from ``quantizers.py``, its
inputs pass through the int8 / float16 rounding its format implies, and the calibration evaluations are
replayed. The error of a layer at a format is the relative MSE of the prediction against the float model,
``sum ||eps_q - eps||^2 / sum ||eps||^2`` over the kept evaluations, reported as SQNR
``-10 log10(relative MSE)`` dB; it is kept per evaluation too, so the report can show how a layer's
sensitivity changes along the trajectory (seed notes §3.2, Eq. 19, with the cheap metric of Eq. 12).

Replaying the calibration once per (layer, format) is exact but costs one whole-model replay per pair (1690
for SD1.5's UNet). :func:`estimate_sensitivity` ("transfer", the default) gets all of them from a few
forward/backward passes instead: each layer's *local* output error at each format is computed on the inputs
the layer saw in the float run (one layer call per format), and carried to the prediction by the model's
Jacobian, ``||J e||^2`` - small errors propagate linearly. ``||J e||^2`` is estimated with random probes
``r ~ N(0, I)`` on the prediction (``E[(r . J e)^2] = ||J e||^2``, and ``r . J e = (J^T r) . e`` is the
gradient of ``r . prediction`` at the layer's output dotted with its local error), so one backward pass per
probe serves every layer and format at once. :func:`measure_sensitivity` chooses between the two.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import PrecisionError
from edgediff.precision.calibration import Calibration, ModelHooks
from edgediff.precision.quantizers import (
    compute_dtype,
    fake_quant_dynamic,
    fake_quant_static,
    fake_quant_weight,
    get_format,
    round_fp16,
    sqnr_db,
)

EVAL_BATCH = 16  # calibration rows per forward when replaying (and rows x probes per transfer pass)
SENSITIVITY_METHODS = ("transfer", "replay")
# Random probes of the transfer estimate: the estimate of one (layer, format) over R calibration rows is a
# chi-square with ~R x probes degrees of freedom (relative spread sqrt(2 / (R x probes)): 25% = 1 dB for
# 8 rows and 4 probes), and each probe costs one forward and one backward over the rows.
DEFAULT_PROBES = 4


class FakeQuant(ModelHooks):
    """Run a torch model as if its layers had the precisions of ``assignment`` ({layer name: format}).

    Used as a context manager: weights are swapped in place on entry and restored on exit. ``scales`` holds
    the static int8 input scales of layers whose format needs them (one, or [early, late] split at
    ``timestep_split``); :attr:`timesteps` must be set to the rows' timesteps before each forward when
    scales are per timestep range.
    """

    def __init__(
        self,
        module: nn.Module,
        assignment: Mapping[str, str],
        dtypes: Sequence[str],
        scales: Mapping[str, Sequence[float]] | None = None,
        timestep_split: float | None = None,
    ) -> None:
        super().__init__(module)
        self.formats = {name: get_format(fmt) for name, fmt in assignment.items()}
        self.dtypes = tuple(dtypes)
        self.scales = dict(scales or {})
        self.split = timestep_split
        self.timesteps: torch.Tensor | None = None
        self._saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> FakeQuant:
        modules = dict(self.module.named_modules())
        for name, fmt in self.formats.items():
            layer = modules.get(name)
            if not isinstance(layer, (nn.Conv2d, nn.Linear)):  # attention calls have no weights
                continue
            self._saved[name] = layer.weight.data
            fake = fake_quant_weight(layer.weight.detach().cpu().numpy(), fmt)
            layer.weight.data = torch.from_numpy(fake).to(layer.weight.dtype)
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        modules = dict(self.module.named_modules())
        for name, weight in self._saved.items():
            modules[name].weight.data = weight
        self._saved.clear()

    def _half_compute(self, fmt_name: str) -> torch.dtype | None:
        """The 16-bit float a layer's inputs are rounded to (None: it computes in float32 or int8)."""
        compute = compute_dtype(self.formats[fmt_name], self.dtypes)
        return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(compute)

    def layer_input(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        fmt = self.formats.get(name)
        if fmt is None:
            return None
        if fmt.activations == "static":
            return fake_quant_static(x, self._static_scale(name, x))
        if fmt.activations == "token":
            return fake_quant_dynamic(x, dim=-1)
        half = self._half_compute(name)
        return None if half is None else _round_half(x, half)

    def _static_scale(self, name: str, x: torch.Tensor) -> torch.Tensor | float:
        scales = self.scales[name]
        if len(scales) == 1 or self.timesteps is None:
            return float(scales[0])
        if self.timesteps.shape[0] != x.shape[0]:  # not batch-major: the bucket of the first row
            return float(scales[0] if float(self.timesteps[0]) >= self.split else scales[1])
        per_row = torch.where(self.timesteps >= self.split, scales[0], scales[1]).to(x.dtype)
        return per_row.reshape((-1,) + (1,) * (x.ndim - 1))

    def attention(
        self, name: str, original: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw
    ):
        fmt = self.formats.get(name)
        if fmt is None or (fmt.name == "fp32" and "float32" in self.dtypes):
            return original(q, k, v, *a, **kw)
        half = self._half_compute(name) if fmt.activations is None else None
        return quantized_attention(q, k, v, *a, fp16=fmt.activations is None, half=half, **kw)


def _round_half(x: torch.Tensor, half: torch.dtype) -> torch.Tensor:
    """``x`` rounded to ``half`` (float16 or bfloat16) and back; float16 goes through the one-argument call
    of ``round_fp16`` (tests/precision/ties.py stands in for it to find rounding ties)."""
    return round_fp16(x) if half == torch.float16 else round_fp16(x, half)


def quantized_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    fp16: bool,
    half: torch.dtype | None = None,
) -> torch.Tensor:
    """Scaled-dot-product attention with both matmuls' operands rounded to float16 (``fp16``; bfloat16 with
    ``half=torch.bfloat16``) or
    int8-quantized with dynamic scales: per row of the left operand and per column of the right one, the
    scheme the compiled graph uses (it is invariant to how the softmax scale is split between q and k)."""
    if enable_gqa and q.shape[-3] != k.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(repeat, dim=-3), v.repeat_interleave(repeat, dim=-3)
    rounded = lambda x: _round_half(x, half or torch.float16)  # noqa: E731
    left = rounded if fp16 else (lambda x: fake_quant_dynamic(x, dim=-1))
    right = rounded if fp16 else (lambda x: fake_quant_dynamic(x, dim=-2))
    scores = left(q) @ right(k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if is_causal:
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        scores = (
            scores.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else scores + attn_mask
        )
    return left(scores.softmax(dim=-1)) @ right(v)


@dataclass
class Sensitivity:
    """Per layer and candidate format: the prediction error energy at each kept calibration evaluation."""

    reference_energy: np.ndarray  # (evaluations,) sum of squared float predictions
    error_energy: dict[str, dict[str, np.ndarray]] = field(
        default_factory=dict
    )  # layer -> format -> (evals,)
    timesteps: list[float | None] = field(default_factory=list)
    method: str = "replay"  # "replay": exact, one whole-model replay per pair; "transfer": estimated
    replays: int = 0  # whole-model replays of the calibration run
    model_rows: int = 0  # rows through the model's forward (a replay is one pass over every calibration row)

    def relative_mse(self, layer: str, fmt: str) -> float:
        return float(self.error_energy[layer][fmt].sum() / max(self.reference_energy.sum(), 1e-30))

    def sqnr_db(self, layer: str, fmt: str) -> float:
        return sqnr_db(self.relative_mse(layer, fmt))

    def sqnr_per_step(self, layer: str, fmt: str) -> list[float]:
        """SQNR at each kept evaluation: the timestep profile of a layer's sensitivity."""
        errors = self.error_energy[layer][fmt] / np.maximum(self.reference_energy, 1e-30)
        return [sqnr_db(float(e)) for e in errors]

    def ranking(self, fmt: str) -> list[tuple[str, float]]:
        """Layers measured at ``fmt``, most sensitive (lowest SQNR) first."""
        rows = [
            (layer, self.sqnr_db(layer, fmt)) for layer, by_fmt in self.error_energy.items() if fmt in by_fmt
        ]
        return sorted(rows, key=lambda row: row[1])


def replay(module: nn.Module, calibration: Calibration, fake: FakeQuant | None = None) -> np.ndarray:
    """Error energy of ``module`` (under ``fake``, if given) against the float predictions, per evaluation.

    All kept evaluations go through the model in batches of up to :data:`EVAL_BATCH` rows, each row with its
    own timestep (so per-timestep-range scales apply row by row).
    """
    start, stop = calibration.output_channels
    steps = calibration.steps
    rows = steps[0].reference.shape[0]
    inputs = [torch.cat(parts) for parts in zip(*(s.inputs for s in steps), strict=True)]
    reference = torch.cat([s.reference for s in steps])
    outputs = []
    per_call = max(rows, EVAL_BATCH // rows * rows)
    with torch.no_grad():
        for first in range(0, reference.shape[0], per_call):
            chunk = [x[first : first + per_call] for x in inputs]
            if fake is not None and len(chunk) > 1 and calibration.steps[0].timestep is not None:
                fake.timesteps = chunk[1].float()
            outputs.append(module(*chunk)[:, start:stop].float())
    error = (torch.cat(outputs) - reference.float()).pow(2).reshape(len(steps), -1).sum(dim=1)
    return error.double().numpy()


def reference_energy(calibration: Calibration) -> np.ndarray:
    return np.array([float(s.reference.double().pow(2).sum()) for s in calibration.steps])


def measure_sensitivity(
    module: nn.Module,
    calibration: Calibration,
    candidates: Mapping[str, Sequence[str]],
    dtypes: Sequence[str],
    *,
    scales: Mapping[str, Sequence[float]] | None = None,
    timestep_split: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    method: str = "replay",
    probes: int = DEFAULT_PROBES,
) -> Sensitivity:
    """Every layer's prediction error at each of its candidate formats, the layer alone quantized.

    ``method="replay"`` quantizes one layer at a time and replays the calibration (exact; one whole-model
    replay per pair), ``"transfer"`` estimates the same figures from ``probes`` forward/backward passes
    (:func:`estimate_sensitivity`). ``candidates`` maps layer names to formats; the target's float format at
    float32 is exact by definition and not run. ``progress(done, total)`` is called after each measurement.
    """
    if method == "transfer":
        return estimate_sensitivity(
            module,
            calibration,
            candidates,
            dtypes,
            scales=scales,
            timestep_split=timestep_split,
            progress=progress,
            probes=probes,
        )
    if method != "replay":
        raise PrecisionError(
            f"sensitivity method must be one of {', '.join(SENSITIVITY_METHODS)}, got {method!r}"
        )
    result, measured, fake_quant = _setup(module, calibration, candidates, dtypes, scales, timestep_split)
    rows = sum(s.reference.shape[0] for s in calibration.steps)
    total = sum(len(formats) for formats in candidates.values())
    done = 0
    for layer, formats in candidates.items():
        for fmt in formats:
            if fmt in measured[layer]:
                with fake_quant({layer: fmt}) as fake:
                    result.error_energy[layer][fmt] = replay(module, calibration, fake)
                result.replays += 1
                result.model_rows += rows
            done += 1
            if progress is not None:
                progress(done, total)
    return result


def _exact(fmt: str, dtypes: Sequence[str]) -> bool:
    return fmt == "fp32" and "float32" in dtypes


def _setup(
    module: nn.Module,
    calibration: Calibration,
    candidates: Mapping[str, Sequence[str]],
    dtypes: Sequence[str],
    scales: Mapping[str, Sequence[float]] | None,
    timestep_split: float | None,
    method: str = "replay",
) -> tuple[Sensitivity, dict[str, list[str]], Callable[[Mapping[str, str]], FakeQuant]]:
    """What both sensitivity methods start from: the result with every candidate pair at zero error, in
    candidate order (the exact pairs stay so: the target's float format at float32 is not run; the others
    are overwritten when measured), per layer the formats to measure, and a :class:`FakeQuant` for an
    assignment under the run's dtypes and input scales."""
    result = Sensitivity(
        reference_energy(calibration), timesteps=[s.timestep for s in calibration.steps], method=method
    )
    zeros = len(calibration.steps)
    result.error_energy = {
        layer: {f: np.zeros(zeros) for f in formats} for layer, formats in candidates.items()
    }
    measured = {layer: [f for f in formats if not _exact(f, dtypes)] for layer, formats in candidates.items()}
    fake_quant = functools.partial(
        FakeQuant, module, dtypes=dtypes, scales=scales, timestep_split=timestep_split
    )
    return result, measured, fake_quant


def estimate_sensitivity(
    module: nn.Module,
    calibration: Calibration,
    candidates: Mapping[str, Sequence[str]],
    dtypes: Sequence[str],
    *,
    scales: Mapping[str, Sequence[float]] | None = None,
    timestep_split: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    probes: int = DEFAULT_PROBES,
    rows_per_pass: int = EVAL_BATCH,
    seed: int = 0,
) -> Sensitivity:
    """The figures of :func:`measure_sensitivity` without a replay per (layer, format): local errors carried
    to the prediction by the model's Jacobian, estimated with ``probes`` random probes (module docstring).

    The calibration rows go through the float model in chunks, each chunk repeated ``probes`` times in one
    batch (one probe per copy); one backward pass of ``sum(r * prediction)`` then gives, at every layer's
    output, the gradient of each probe, which is dotted with the layer's local error at each format
    (computed on the chunk's recorded inputs, once per format). Linear in the error, so exact for small
    errors up to the probes' sampling spread; a catastrophic error is still reported as one (its
    linearised size), which is all the assignment needs of it. Deterministic: probes come from ``seed``.
    """
    if probes < 1:
        raise PrecisionError(f"the transfer sensitivity needs at least one probe, got {probes}")
    steps = calibration.steps
    result, measured, fake_quant = _setup(
        module, calibration, candidates, dtypes, scales, timestep_split, method="transfer"
    )
    start, stop = calibration.output_channels
    inputs = [torch.cat(parts) for parts in zip(*(s.inputs for s in steps), strict=True)]
    rows = inputs[0].shape[0]
    timed = len(inputs) > 1 and steps[0].timestep is not None
    chunk = max(1, rows_per_pass // probes)
    pairs = sum(len(formats) for formats in candidates.values())
    chunks = -(-rows // chunk)
    counter = _Counter(progress, pairs * chunks)
    dots = {
        layer: {fmt: torch.zeros(probes, rows, dtype=torch.float64) for fmt in formats}
        for layer, formats in measured.items()
    }
    fakes = {
        fmt: fake_quant(dict.fromkeys(candidates, fmt))
        for fmt in {f for formats in measured.values() for f in formats}
    }
    gen = torch.Generator().manual_seed(seed)
    for first in range(0, rows, chunk):
        part = [x[first : first + chunk] for x in inputs]
        count = part[0].shape[0]
        for fake in fakes.values():
            fake.timesteps = part[1].float() if timed else None
        probe = _Probe(module, measured, fakes, dots, slice(first, first + count), count, probes, counter)
        batch = [x.repeat(probes, *(1,) * (x.ndim - 1)) for x in part]
        for x in batch:  # so that every layer output is inside the graph (a leaf cannot be changed in place)
            if x.is_floating_point() and x.ndim >= 2:
                x.requires_grad_(True)
        with torch.enable_grad(), probe:
            prediction = module(*batch)[:, start:stop].float()
            direction = torch.randn(prediction.shape, generator=gen, dtype=prediction.dtype)
            prediction.backward(direction)
        counter.finish_chunk(pairs)
        result.model_rows += count * probes
    for layer, by_fmt in dots.items():
        for fmt, dot in by_fmt.items():
            per_row = dot.pow(2).mean(dim=0)  # E[(r . J e)^2] = ||J e||^2, per row
            result.error_energy[layer][fmt] = per_row.reshape(len(steps), -1).sum(dim=1).numpy()
    return result


class _Counter:
    """``progress(done, total)`` over (layer, format) pairs and chunks; exact pairs and layers the
    prediction does not depend on are counted when their chunk ends."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int) -> None:
        self.progress = progress
        self.total = total
        self.done = 0
        self.in_chunk = 0

    def step(self) -> None:
        self.done += 1
        self.in_chunk += 1
        if self.progress is not None:
            self.progress(self.done, self.total)

    def finish_chunk(self, pairs: int) -> None:
        while self.in_chunk < pairs:
            self.step()
        self.in_chunk = 0


class _Probe(ModelHooks):
    """Hooks of one transfer pass: at each measured layer call, keep the first copy's inputs and float
    output, and on the way back dot the probes' gradients with the local error of every format."""

    def __init__(
        self,
        module: nn.Module,
        measured: Mapping[str, Sequence[str]],
        fakes: Mapping[str, FakeQuant],
        dots: dict[str, dict[str, torch.Tensor]],
        rows: slice,
        count: int,
        probes: int,
        counter: _Counter,
    ) -> None:
        super().__init__(module)
        self.measured = measured
        self.fakes = fakes
        self.dots = dots
        self.rows = rows
        self.count = count
        self.probes = probes
        self.counter = counter
        self.seen: set[tuple[str, str]] = set()

    def layer_output(self, name: str, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        if not self.measured.get(name):
            return
        first = x[: self.count].detach().clone()
        reference = out[: self.count].detach().clone()
        self._watch(out, functools.partial(self._layer_grad, name, layer, first, reference))

    def attention(
        self, name: str, original: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw
    ):
        out = original(q, k, v, *a, **kw)
        if self.measured.get(name):
            first = [self._first(t) for t in (q, k, v)]
            args = [self._first(t) for t in a]
            kwargs = {key: self._first(t) for key, t in kw.items()}
            reference = out[: self.count].detach().clone()
            self._watch(
                out, functools.partial(self._attention_grad, name, original, first, args, kwargs, reference)
            )
        return out

    def _first(self, value: Any) -> Any:
        """The first probe copy of a batched tensor argument (others, e.g. a broadcast mask, as they are)."""
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == self.count * self.probes:
            return value[: self.count].detach().clone()
        return value

    def _watch(self, out: torch.Tensor, hook: Callable[[torch.Tensor], None]) -> None:
        if not out.requires_grad:  # computed from no graph input (the timestep embedding): a leaf
            out.requires_grad_(True)
        out.register_hook(hook)

    def _layer_grad(
        self, name: str, layer: nn.Module, x: torch.Tensor, reference: torch.Tensor, grad: torch.Tensor
    ) -> None:
        weights: dict[tuple[int | None, str | None], torch.Tensor] = {}
        with torch.no_grad():
            for fmt in self.measured[name]:
                fake = self.fakes[fmt]
                spec = fake.formats[name]
                # w8, w8a8 and w8a8-token store the same int8 weights: quantized once
                key = (spec.weight_bits, spec.storage)
                if key not in weights:
                    weights[key] = torch.from_numpy(
                        fake_quant_weight(layer.weight.detach().cpu().numpy(), spec)
                    ).to(layer.weight.dtype)
                weight = weights[key]
                rounded = fake.layer_input(name, layer, x)
                local = _call(layer, x if rounded is None else rounded, weight)
                self._accumulate(name, fmt, grad, local - reference)

    def _attention_grad(
        self,
        name: str,
        original: Any,
        qkv: Sequence[torch.Tensor],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        reference: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        with torch.no_grad():
            for fmt in self.measured[name]:
                local = self.fakes[fmt].attention(name, original, *qkv, *args, **kwargs)
                self._accumulate(name, fmt, grad, local - reference)

    def _accumulate(self, name: str, fmt: str, grad: torch.Tensor, error: torch.Tensor) -> None:
        per_probe = grad.reshape(self.probes, self.count, -1).transpose(0, 1)  # (rows, probes, n)
        # one (probes x n) @ (n,) product per row (float32 sums, enough for an error estimate); a layer
        # called more than once per forward adds up its calls' contributions before squaring
        dots = torch.bmm(per_probe, error.reshape(self.count, -1, 1).to(grad.dtype)).squeeze(-1)
        self.dots[name][fmt][:, self.rows] += dots.transpose(0, 1).double()
        if (name, fmt) not in self.seen:
            self.seen.add((name, fmt))
            self.counter.step()


def _call(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with ``weight`` in place of its own, without running the model's hooks on it."""
    if isinstance(layer, nn.Conv2d):
        return layer._conv_forward(x, weight, layer.bias)
    return nn.functional.linear(x, weight, layer.bias)


def measure_assignment(
    module: nn.Module,
    calibration: Calibration,
    assignment: Mapping[str, str],
    dtypes: Sequence[str],
    *,
    scales: Mapping[str, Sequence[float]] | None = None,
    timestep_split: float | None = None,
) -> list[float]:
    """SQNR (dB) of the prediction with every layer of ``assignment`` quantized at once, per evaluation
    and (last element) over all of them: the check of the additive error model the assignment assumes."""
    energy = reference_energy(calibration)
    with FakeQuant(module, assignment, dtypes, scales, timestep_split) as fake:
        error = replay(module, calibration, fake)
    per_step = [sqnr_db(float(e / max(r, 1e-30))) for e, r in zip(error, energy, strict=True)]
    return [*per_step, sqnr_db(float(error.sum() / max(energy.sum(), 1e-30)))]
