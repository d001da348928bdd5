"""fp16 overflow guard: layers whose activations leave the float16 range keep float32.

Trained models can carry activations beyond float16's largest finite value (65504): the SDXL VAE decoder
is the known case, whose fp16 build decodes to inf/NaN. Calibration records the largest |input| and
|output| of every conv / linear / attention / norm layer over the kept evaluations
(:attr:`Calibration.activation_max`); a layer whose peak times ``headroom`` exceeds 65504 is *guarded*:

- ``precision="fp16"`` / ``"auto"`` plans give it ``fp32`` (weights and compute) instead of ``fp16``;
- builds for targets that compute in float16 (``cast-to-fp16``, the NPU's path) get the
  ``fp16-overflow-guard`` pass, which gives the layer's conv2d/matmul float32 operands again; on the NPU
  that layer then runs on the host CPU (the NPU has no float32), which the NPU program shows.

Why keep float32 rather than rescale: a rescaling (weights / s, output * s) only helps where the large
values end in a scale-invariant op, and in a VAE decoder they live in the residual stream that the
following blocks add to, so the scale would have to be carried through every later block; keeping a few
layers in float32 is exact and local.

Why a headroom of 4 (a limit of 16376): calibration sees a few random inputs (2 seeds x 4 evaluations), and
activation peaks grow with the input (another seed, prompt or resolution; a VAE's peaks scale with the
latent's); a layer seen at a quarter of the range has two binades of margin for inputs calibration did not
see. Lower headrooms guard fewer layers (faster, riskier); ``PrecisionConfig.fp16_headroom`` sets it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgediff.precision.calibration import Calibration
    from edgediff.precision.plan import PrecisionConfig

FP16_MAX = 65504.0  # the largest finite float16
DEFAULT_HEADROOM = 4.0


@dataclass
class GuardedLayer:
    """A layer whose activations (x headroom) leave the float16 range, with the peaks calibration saw."""

    name: str
    kind: str  # conv2d | linear | attention | norm
    input_max: float
    output_max: float
    weight: str | None = None  # state-dict name of the weight (conv2d / linear)
    weight_max: float = 0.0  # max |weight|, when that is what overflows float16 storage

    @property
    def peak(self) -> float:
        return max(self.input_max, self.output_max)

    def reason(self, limit: float) -> str:
        if self.weight_max > FP16_MAX:
            return f"max |weight| {self.weight_max:.4g} > {FP16_MAX:g} (fp16 max)"
        where = "input" if self.input_max >= self.output_max else "output"
        return f"max |{where}| {self.peak:.4g} > {limit:.6g} (fp16 max {FP16_MAX:g} / headroom)"


@dataclass
class OverflowGuard:
    """Which layers keep float32 in float16 builds, and why (plain data: JSON in the manifest)."""

    headroom: float = DEFAULT_HEADROOM
    layers: list[GuardedLayer] = field(default_factory=list)
    checked: int = 0  # layers whose activation ranges were recorded
    largest: tuple[str, float] | None = None  # the largest activation seen: (layer, max |x|)
    note: str = ""  # why the guard did not run, when it did not

    @property
    def limit(self) -> float:
        return FP16_MAX / self.headroom

    def weights(self) -> dict[str, GuardedLayer]:
        """Guarded layers with a weight (conv2d / linear), keyed by the weight's state-dict name."""
        return {layer.weight: layer for layer in self.layers if layer.weight}

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def summary(self) -> str:
        if self.note:
            return self.note
        if not self.layers:
            largest = f"; largest {self.largest[1]:.4g} at {self.largest[0]}" if self.largest else ""
            return (
                f"fp16 overflow guard: all {self.checked} layers within {self.limit:.6g} "
                f"(fp16 max / {self.headroom:g}){largest}"
            )
        names = ", ".join(layer.name for layer in self.layers[:4]) + (" ..." if len(self.layers) > 4 else "")
        return (
            f"fp16 overflow guard: {len(self.layers)} of {self.checked} layers kept in fp32 "
            f"(activations above {self.limit:.6g} = fp16 max / {self.headroom:g}): {names}"
        )

    def lines(self) -> list[str]:
        """The guarded layers, one readable line each."""
        return [f"{layer.name} ({layer.kind}): {layer.reason(self.limit)}" for layer in self.layers]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["limit"] = self.limit
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OverflowGuard:
        data = {k: v for k, v in data.items() if k != "limit"}
        layers = [GuardedLayer(**layer) for layer in data.pop("layers", [])]
        largest = data.pop("largest", None)
        return cls(**data, layers=layers, largest=tuple(largest) if largest else None)


def find_overflows(
    calibration: Calibration, headroom: float = DEFAULT_HEADROOM, module: Any = None
) -> OverflowGuard:
    """The layers of ``calibration`` whose recorded peaks times ``headroom`` exceed the float16 range; given
    the calibrated ``module``, also conv / linear layers with a weight beyond 65504 (not storable in fp16;
    weights do not vary with the input, so no headroom)."""
    guard = OverflowGuard(headroom=float(headroom), checked=len(calibration.activation_max))
    weights = {info.name: info.weight for info in calibration.layers}
    modules = dict(module.named_modules()) if module is not None else {}
    for name, (kind, peak_in, peak_out) in calibration.activation_max.items():
        peak = max(peak_in, peak_out)
        if guard.largest is None or peak > guard.largest[1]:
            guard.largest = (name, peak)
        weight = getattr(modules.get(name), "weight", None) if kind in ("conv2d", "linear") else None
        weight_max = float(weight.detach().abs().max()) if weight is not None else 0.0
        if weight_max > FP16_MAX:
            guard.layers.append(GuardedLayer(name, kind, peak_in, peak_out, weights.get(name), weight_max))
        elif peak > guard.limit:
            # a norm layer is found in the graph by its scale parameter (an affine GroupNorm / LayerNorm)
            weight = weights.get(name) or (f"{name}.weight" if kind == "norm" else None)
            guard.layers.append(GuardedLayer(name, kind, peak_in, peak_out, weight))
    return guard


def measure_overflow(
    module: Any,
    example_inputs: Sequence[Any],
    input_names: Sequence[str],
    meta: Mapping[str, Any] | None,
    config: PrecisionConfig | None = None,
) -> OverflowGuard:
    """Calibrate ``module`` as the precision planner does (same sampler loop, seeds and kept evaluations)
    and find its overflowing layers: what a float16 build without ``precision=`` needs."""

    from edgediff.precision.calibration import calibrate_as_configured
    from edgediff.precision.plan import PrecisionConfig

    config = config or PrecisionConfig()
    calibration = calibrate_as_configured(config, module, example_inputs, input_names, meta)
    return find_overflows(calibration, config.fp16_headroom, module)
