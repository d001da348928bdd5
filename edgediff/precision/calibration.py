"""Calibration: run the float model through a real sampler loop and record what each layer sees.

A denoiser's inputs are not a fixed distribution: ``x_t`` goes from pure noise to a clean latent over the
trajectory, and activation ranges drift with it (seed notes §5.1-5.3). So, as Q-Diffusion does, the float
model is driven by one of the runtime's samplers on random conditioning for several seeds, and the model
inputs of evaluations spread uniformly over the trajectory are kept. At those evaluations every
quantizable layer's input range is recorded; the kept inputs and the float outputs are what the sensitivity
measurement replays. The largest |input| and |output| of every conv/linear/attention/norm layer over all
kept evaluations is recorded as well: the fp16 overflow guard (``overflow.py``) reads it.

Quantizable layers are ``nn.Conv2d``, ``nn.Linear`` and the two matmuls of every scaled-dot-product
attention call (QK^T and PV; named ``<attention module>.sdpa``). Models that are not denoisers (a VAE
decoder) are calibrated on random inputs shaped like the example inputs instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from edgediff.errors import PrecisionError
from edgediff.precision.quantizers import INT8_MAX
from edgediff.runtime.samplers import get_sampler

# Conditioning inputs that describe the requested image rather than its content: kept as given.
_FIXED_CONDITIONING = ("time_ids", "guidance")
ATTENTION_SUFFIX = ".sdpa"


@dataclass
class LayerInfo:
    """A quantizable layer as the calibration run saw it. Sizes are per batch element and model call."""

    name: str  # module path; attention: "<attention module>.sdpa"
    kind: str  # "conv2d" | "linear" | "attention"
    weight: str | None = None  # state-dict name of the weight (None for attention)
    weight_shape: tuple[int, ...] = ()
    macs: int = 0
    input_elems: int = 0
    output_elems: int = 0
    # attention only: (heads, queries, keys, head dim) of the QK^T and PV matmuls
    attention_shape: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "weight": self.weight,
            "weight_shape": list(self.weight_shape),
            "macs": self.macs,
            "input_elems": self.input_elems,
            "output_elems": self.output_elems,
            "attention_shape": list(self.attention_shape) if self.attention_shape else None,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerInfo:
        shape = data.get("attention_shape")
        return cls(
            **{**data, "weight_shape": tuple(data["weight_shape"]), "attention_shape": shape and tuple(shape)}
        )


@dataclass
class CalibrationStep:
    """One kept model evaluation: the batched inputs (one row per seed), its timestep and float output."""

    inputs: tuple[torch.Tensor, ...]
    timestep: float | None
    reference: torch.Tensor  # the prediction channels of the float model's output


@dataclass
class Calibration:
    """What calibration measured: the layers, the kept evaluations and each layer's input range per step."""

    layers: list[LayerInfo]
    steps: list[CalibrationStep]
    absmax: dict[str, np.ndarray]  # layer -> max |input| at each kept step (over the batch and calls)
    output_channels: tuple[int, int]
    sampler: str | None = None
    num_steps: int = 0
    seeds: tuple[int, ...] = ()
    model_batch: int = 1  # the batch the model is compiled for (cost estimates are per call at that batch)
    # layer -> (kind, max |input|, max |output|) over every kept evaluation; also norm layers, which are not
    # quantizable but whose inputs are as exposed to fp16 overflow as any conv's
    activation_max: dict[str, tuple[str, float, float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def timesteps(self) -> np.ndarray:
        return np.array([s.timestep for s in self.steps if s.timestep is not None], dtype=np.float64)

    def layer(self, name: str) -> LayerInfo:
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(name)

    def timestep_split(self) -> float | None:
        """The timestep separating the early (noisy, ``t >= split``) and late halves of the kept steps."""
        t = np.unique(self.timesteps)
        if len(t) < 2:
            return None
        return float(np.median(t)) if len(t) % 2 else float((t[len(t) // 2 - 1] + t[len(t) // 2]) / 2)

    def activation_scales(self, name: str, split: float | None) -> list[float]:
        """Static int8 input scales of a layer: one for the whole trajectory, or ``[early, late]`` when
        ``split`` is given (activation ranges drift with the noise level, so each half gets its own)."""
        ranges = self.absmax[name]
        if split is None:
            return [_scale(ranges.max())]
        t = np.array([s.timestep for s in self.steps], dtype=np.float64)
        return [_scale(ranges[t >= split].max()), _scale(ranges[t < split].max())]

    def summary(self) -> dict[str, Any]:
        return {
            "sampler": self.sampler,
            "num_steps": self.num_steps,
            "seeds": list(self.seeds),
            "kept_timesteps": [s.timestep for s in self.steps],
            "layers": len(self.layers),
        }


def _scale(absmax: float) -> float:
    return float(absmax) / INT8_MAX if absmax > 0 else 1.0


def is_denoiser(input_names: Sequence[str]) -> bool:
    return list(input_names[:2]) == ["sample", "timestep"]


def default_sampler(meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The sampler calibration drives the model with: flow-euler for flow models, else DDIM."""
    if meta.get("prediction_type") == "flow":
        return "flow-euler", {"shift": meta["flow_shift"]} if "flow_shift" in meta else {}
    return "ddim", {}


def calibrate(
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    meta: dict[str, Any] | None = None,
    *,
    sampler: str | None = None,
    num_steps: int = 8,
    keep: int = 4,
    seeds: Sequence[int] = (0, 1),
) -> Calibration:
    """Drive ``module`` through a ``num_steps`` sampler loop for each seed (batched, one row per seed) and
    keep ``keep`` evaluations spread evenly over the trajectory (first and last included).

    Conditioning is random per seed (prompt embeddings ~ N(0, 1), class labels uniform); image-size
    conditioning (``time_ids``, ``guidance``) keeps the example's value.
    """
    meta = dict(meta or {})
    example_inputs = tuple(example_inputs)
    if len(seeds) < 1 or keep < 1 or num_steps < 1:
        raise PrecisionError("calibration needs at least one seed, one step and one kept evaluation")
    batch = len(seeds)
    out_start, out_stop = meta.get("noise_pred_channels") or (0, int(example_inputs[0].shape[1]))
    recorder = _Recorder(module)
    steps: list[CalibrationStep] = []
    module.eval()
    with recorder, torch.no_grad():
        if is_denoiser(input_names):
            name, options = (sampler, {}) if sampler else default_sampler(meta)
            prediction = meta.get("prediction_type") or "epsilon"
            chosen = get_sampler(name, num_steps=num_steps, prediction_type=prediction, **options)
            evaluations = len(chosen.timesteps)
            kept = set(np.unique(np.linspace(0, evaluations - 1, min(keep, evaluations)).round().astype(int)))
            gen = torch.Generator().manual_seed(int(seeds[0]))
            conditioning = [
                _conditioning(x, n, meta, batch, gen)
                for x, n in zip(example_inputs[2:], input_names[2:], strict=True)
            ]
            x_T = np.concatenate(
                [
                    np.random.default_rng(s).standard_normal(tuple(example_inputs[0].shape[1:]))[None]
                    for s in seeds
                ]
            ).astype(np.float32)
            counter = iter(range(evaluations))

            def denoise(x: np.ndarray, t: float) -> np.ndarray:
                i = next(counter)
                timestep = torch.full((batch,), t, dtype=example_inputs[1].dtype)
                inputs = (torch.from_numpy(np.ascontiguousarray(x)), timestep, *conditioning)
                recorder.step = len(steps) if i in kept else None
                out = module(*inputs)[:, out_start:out_stop]
                if i in kept:
                    steps.append(CalibrationStep(inputs, float(t), out.clone()))
                return out.float().numpy()

            chosen.sample(denoise, x_T, rng=np.random.default_rng(int(seeds[0])))
            sampler_name = name
        else:
            for i in range(keep):
                gen = torch.Generator().manual_seed(int(seeds[0]) * 1000 + i)
                inputs = tuple(
                    torch.randn((batch, *x.shape[1:]), generator=gen, dtype=x.dtype)
                    if x.dtype.is_floating_point
                    else x[:1].expand(batch, *x.shape[1:]).clone()
                    for x in example_inputs
                )
                recorder.step = len(steps)
                out = module(*inputs)[:, out_start:out_stop]
                steps.append(CalibrationStep(inputs, None, out.clone()))
            sampler_name = None
    layers = list(recorder.infos.values())
    if not layers:
        raise PrecisionError(f"{type(module).__name__} has no conv2d, linear or attention layers to quantize")
    ranges = {info.name: np.asarray(recorder.absmax.get(info.name, []), dtype=np.float64) for info in layers}
    return Calibration(
        layers=layers,
        steps=steps,
        absmax={name: np.pad(r, (0, len(steps) - len(r))) for name, r in ranges.items()},
        output_channels=(int(out_start), int(out_stop)),
        sampler=sampler_name,
        num_steps=num_steps if sampler_name else 0,
        seeds=tuple(int(s) for s in seeds),
        model_batch=int(example_inputs[0].shape[0]),
        activation_max=dict(recorder.extremes),
    )


def calibrate_as_configured(
    config: Any,
    module: nn.Module,
    example_inputs: Sequence[torch.Tensor],
    input_names: Sequence[str],
    meta: dict[str, Any] | None = None,
) -> Calibration:
    """:func:`calibrate` with the sampler, steps, kept evaluations and seeds of a ``PrecisionConfig``."""
    with torch.no_grad():
        return calibrate(
            module,
            example_inputs,
            input_names,
            dict(meta or {}),
            sampler=config.sampler,
            num_steps=config.num_steps,
            keep=config.keep,
            seeds=config.seeds,
        )


def _conditioning(
    example: torch.Tensor, name: str, meta: dict[str, Any], batch: int, gen: torch.Generator
) -> torch.Tensor:
    if name in _FIXED_CONDITIONING or example.ndim == 0:
        return example[:1].expand(batch, *example.shape[1:]).clone()
    if example.dtype.is_floating_point:
        return torch.randn((batch, *example.shape[1:]), generator=gen, dtype=example.dtype)
    high = int(meta.get("num_classes") or int(example.max()) + 1)
    return torch.randint(0, high, (batch, *example.shape[1:]), generator=gen, dtype=example.dtype)


class ModelHooks:
    """Hooks on a model's quantizable layers, shared by calibration and the fake-quant measurement.

    Subclasses override :meth:`layer_input` (called before every conv/linear with its input; may return a
    replacement), :meth:`layer_output` and :meth:`attention` (called instead of every
    scaled-dot-product-attention, with the call's layer name). Attention calls are named after the diffusers
    ``Attention`` module they happen in (a processor calls ``F.scaled_dot_product_attention`` on q, k, v).
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handles: list[Any] = []
        self._owners: list[str] = []
        self._sdpa_calls: dict[str, int] = {}

    def __enter__(self) -> ModelHooks:
        self._handles.append(self.module.register_forward_pre_hook(self._reset))
        for name, sub in self.module.named_modules():
            if isinstance(sub, (nn.Conv2d, nn.Linear)):
                self._handles.append(sub.register_forward_pre_hook(self._pre_hook(name)))
                self._handles.append(sub.register_forward_hook(self._post_hook(name)))
            elif hasattr(sub, "processor"):  # a diffusers Attention module: owns the SDPA calls inside it
                self._handles.append(sub.register_forward_pre_hook(self._enter_attention(name)))
                self._handles.append(sub.register_forward_hook(self._leave_attention))
        self._patch = patch_sdpa(self._sdpa)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._patch.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---------------------------------------------------------------------------------- for subclasses

    def layer_input(self, name: str, layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return None

    def layer_output(self, name: str, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        return None

    def attention(
        self, name: str, original: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw
    ):
        return original(q, k, v, *a, **kw)

    # ------------------------------------------------------------------------------------------ plumbing

    def _pre_hook(self, name: str) -> Any:
        def hook(sub: nn.Module, args: tuple) -> tuple | None:
            replaced = self.layer_input(name, sub, args[0])
            return None if replaced is None else (replaced, *args[1:])

        return hook

    def _post_hook(self, name: str) -> Any:
        def hook(sub: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self.layer_output(name, sub, args[0], output)

        return hook

    def _enter_attention(self, name: str) -> Any:
        def hook(_sub: nn.Module, _args: tuple) -> None:
            self._owners.append(name)

        return hook

    def _leave_attention(self, _sub: nn.Module, _args: tuple, _output: Any) -> None:
        if self._owners:
            self._owners.pop()

    def _reset(self, _sub: nn.Module, _args: tuple) -> None:
        self._sdpa_calls = {}

    def _sdpa(self, original: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw) -> Any:
        owner = self._owners[-1] if self._owners else "sdpa"
        index = self._sdpa_calls.get(owner, 0)
        self._sdpa_calls[owner] = index + 1
        # an attention module calling SDPA twice in one forward gets ".sdpa", ".sdpa2"
        name = owner + ATTENTION_SUFFIX + (str(index + 1) if index else "")
        return self.attention(name, original, q, k, v, *a, **kw)


class _Recorder(ModelHooks):
    """Records shapes (on the first kept evaluation) and input ranges (per kept evaluation)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.step: int | None = None
        self.infos: dict[str, LayerInfo] = {}
        self.absmax: dict[str, list[float]] = {}
        self.extremes: dict[str, tuple[str, float, float]] = {}  # see Calibration.activation_max

    def __enter__(self) -> _Recorder:
        super().__enter__()
        for name, sub in self.module.named_modules():
            if isinstance(sub, (nn.GroupNorm, nn.LayerNorm)):
                self._handles.append(sub.register_forward_hook(self._norm_hook(name)))
        return self

    def _extreme(self, name: str, kind: str, inputs: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        if self.step is None:
            return
        _, seen_in, seen_out = self.extremes.get(name, (kind, 0.0, 0.0))
        # nan_to_num: an inf already in the float32 model is reported as the float32 maximum, not lost
        peak_in = max(float(torch.nan_to_num(x.detach().float()).abs().max()) for x in inputs)
        peak_out = float(torch.nan_to_num(out.detach().float()).abs().max())
        self.extremes[name] = (kind, max(seen_in, peak_in), max(seen_out, peak_out))

    def _norm_hook(self, name: str) -> Any:
        def hook(sub: nn.Module, args: tuple, output: torch.Tensor) -> None:
            self._extreme(name, "norm", args[:1], output)

        return hook

    def layer_output(self, name: str, layer: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.step is None:
            return
        self._extreme(name, "conv2d" if isinstance(layer, nn.Conv2d) else "linear", (x,), out)
        ranges = self.absmax.setdefault(name, [])
        ranges.extend([0.0] * (self.step + 1 - len(ranges)))
        ranges[self.step] = max(ranges[self.step], float(x.detach().abs().max()))
        if name not in self.infos:
            if isinstance(layer, nn.Conv2d):
                kind, per_output = (
                    "conv2d",
                    layer.in_channels // layer.groups * int(np.prod(layer.kernel_size)),
                )
            else:
                kind, per_output = "linear", layer.in_features
            out_elems = out[0].numel()
            self.infos[name] = LayerInfo(
                name,
                kind,
                f"{name}.weight",
                tuple(layer.weight.shape),
                out_elems * per_output,
                x[0].numel(),
                out_elems,
            )

    def attention(
        self, name: str, original: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *a, **kw
    ):
        if self.step is not None and name not in self.infos:
            heads, queries, dim = int(np.prod(q.shape[1:-2])), q.shape[-2], q.shape[-1]
            keys, dim_v = k.shape[-2], v.shape[-1]
            self.infos[name] = LayerInfo(
                name,
                "attention",
                macs=heads * queries * keys * (dim + dim_v),
                input_elems=q[0].numel() + k[0].numel() + v[0].numel(),
                output_elems=heads * queries * dim_v,
                attention_shape=(heads, queries, keys, dim),
            )
        out = original(q, k, v, *a, **kw)
        self._extreme(name, "attention", (q, k, v), out)
        return out


@contextlib.contextmanager
def patch_sdpa(wrapper: Any) -> Iterator[None]:
    """Route ``torch.nn.functional.scaled_dot_product_attention`` through ``wrapper(original, q, k, v, ...)``.

    diffusers' attention processors look the function up on ``torch.nn.functional`` at call time, so
    replacing the attribute reaches every attention call of the model.
    """
    functional = torch.nn.functional
    original = functional.scaled_dot_product_attention

    def routed(*args: Any, **kwargs: Any) -> Any:
        return wrapper(original, *args, **kwargs)

    functional.scaled_dot_product_attention = routed
    try:
        yield
    finally:
        functional.scaled_dot_product_attention = original
