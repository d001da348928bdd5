"""The precision plan: which format each layer runs at, and the measurements behind the choice.

Plain data (torch-free, JSON in the manifest): :func:`edgediff.precision.planner.make_plan` makes it, the
``mixed-precision`` pass realises it in the graph and
:func:`edgediff.passes.mixed_precision.quantize_weights` in weights.bin.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from edgediff.precision.assignment import Budget

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class PrecisionConfig:
    """How to choose precisions: ``mode`` is "auto" or one format for every layer (``fp16``, ``w8``,
    ``w8a8``/``int8``, ``w8a8-token``, ``w4``/``int4``); ``pins`` fixes layers by name or glob
    (``{"*.conv_in": "fp32"}``); the rest configures calibration."""

    mode: str = "auto"
    budget: Budget | Mapping[str, Any] | None = None
    pins: Mapping[str, str] = field(default_factory=dict)
    sampler: str | None = None
    num_steps: int = 8
    keep: int = 4
    seeds: tuple[int, ...] = (0, 1)
    timestep_aware: bool = True  # int8 activation scales per timestep range (early / late)
    # fp16 overflow guard (precision/overflow.py): layers whose activations x this exceed 65504 keep fp32
    # instead of fp16; None switches the guard off
    fp16_headroom: float | None = 4.0
    # Per-layer sensitivity is measured on the same model run at this latent size (largest side) and
    # transferred to the full-size plan by layer name: one replay per (layer, format) costs ~(full/this)^2
    # less. None measures at the model's own size (exact, the slow exhaustive reference).
    sensitivity_latent: int | None = 16
    # How per-layer sensitivity is measured: "transfer" estimates every (layer, format) from each layer's
    # local error and a few forward/backward probe passes (precision/sensitivity.py; ~25x cheaper on a tiny
    # UNet); "replay" replays the calibration once per (layer, format) (exact, the exhaustive reference).
    sensitivity: str = "transfer"
    sensitivity_probes: int = 4  # random probes of "transfer" (each one forward and one backward pass)


@dataclass
class LayerPlan:
    """One layer of the plan: its format, static input scales, and the measurements behind the choice."""

    name: str
    kind: str
    format: str
    weight: str | None = None
    weight_shape: list[int] = field(default_factory=list)
    attention_shape: list[int] | None = None
    scales: list[float] | None = None  # static int8 input scales: [all] or [early, late]
    bytes: int = 0  # aligned weight bytes at the chosen format
    float_bytes: int = 0  # ... at the float format
    latency_s: float = 0.0
    sqnr_db: dict[str, float] = field(default_factory=dict)  # candidate format -> measured SQNR
    sqnr_per_step: list[float] = field(default_factory=list)  # chosen format, per kept evaluation
    pinned: bool = False
    overflow: str | None = None  # why the fp16 overflow guard kept this layer in fp32 (the peak seen)


@dataclass
class PrecisionPlan:
    """A per-layer precision assignment for one model on one target (JSON-serialisable)."""

    mode: str
    target: str
    dtypes: list[str]
    layers: list[LayerPlan]
    timestep_split: float | None = None
    budget: dict[str, Any] = field(default_factory=dict)
    totals: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    fp16_guard: dict[str, Any] = field(default_factory=dict)  # OverflowGuard.to_dict(); {}: not checked

    def layer(self, name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def by_weight(self) -> dict[str, LayerPlan]:
        """Layers with weights, keyed by the state-dict name of the weight."""
        return {layer.weight: layer for layer in self.layers if layer.weight}

    def format_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.format] = counts.get(layer.format, 0) + 1
        return counts

    def summary(self) -> str:
        t = self.totals
        formats = ", ".join(f"{n} {f}" for f, n in sorted(self.format_counts().items()))
        text = (
            f"{self.mode}: {formats}; weights {t.get('bytes', 0):,} B (float {t.get('float_bytes', 0):,} B)"
        )
        if t.get("measured_sqnr_db") is not None:
            text += f", prediction SQNR {t['measured_sqnr_db']:.1f} dB"
        guarded = [layer.name for layer in self.layers if layer.overflow]
        if guarded:
            text += f"; fp16 overflow guard kept {len(guarded)} in fp32 ({', '.join(guarded[:4])})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrecisionPlan:
        data = dict(data)
        data["layers"] = [LayerPlan(**layer) for layer in data["layers"]]
        return cls(**data)


def resolve_request(
    precision: str | PrecisionConfig | PrecisionPlan | None,
    budget: Budget | Mapping[str, Any] | None,
    spec: TargetSpec,
) -> PrecisionConfig | PrecisionPlan | None:
    """Check a ``compile_model(precision=..., precision_budget=...)`` request against the target before
    anything is captured: unknown formats, budget keys, or dtypes the target lacks fail here, in one line.
    """
    from edgediff.errors import PrecisionError
    from edgediff.precision.assignment import require_supported
    from edgediff.precision.quantizers import get_format

    if precision is None:
        if budget is not None:
            raise PrecisionError("precision_budget needs precision='auto'")
        return None
    if isinstance(precision, PrecisionPlan):
        if budget is not None:
            raise PrecisionError("precision_budget applies to precision='auto', not to a ready plan")
        for layer in precision.layers:
            if layer.overflow and layer.format == "fp32":
                continue  # kept in fp32 by the overflow guard: on a float16-only target it runs on the host
            require_supported(
                get_format(layer.format), spec.dtypes, spec.name, f"layer {layer.name}'s format"
            )
        return precision
    if isinstance(precision, str):
        config = PrecisionConfig(mode=precision)
    elif isinstance(precision, PrecisionConfig):
        config = precision
    else:
        raise PrecisionError(
            f"precision must be 'auto', a format name, a PrecisionConfig or a PrecisionPlan, "
            f"got {type(precision).__name__}"
        )
    if budget is not None:
        config = replace(config, budget=budget)
    parsed = Budget.parse(config.budget)
    if config.mode != "auto":
        require_supported(get_format(config.mode), spec.dtypes, spec.name, "precision")
        if not parsed.empty:
            raise PrecisionError(f"a precision budget needs precision='auto', not {config.mode!r}")
    from edgediff.precision.sensitivity import SENSITIVITY_METHODS

    if config.sensitivity not in SENSITIVITY_METHODS:
        raise PrecisionError(
            f"sensitivity must be one of {', '.join(SENSITIVITY_METHODS)}, got {config.sensitivity!r}"
        )
    if config.sensitivity_probes < 1:
        raise PrecisionError(f"sensitivity_probes must be at least 1, got {config.sensitivity_probes}")
    for layer, fmt in config.pins.items():
        require_supported(get_format(fmt), spec.dtypes, spec.name, f"pinned layer {layer}")
    return replace(config, budget=parsed)


def config_from_options(
    precision: str | None,
    *,
    max_bytes: str | None = None,
    max_latency_ms: float | None = None,
    min_sqnr_db: float | None = None,
    pins: list[str] | None = None,
    sensitivity_latent: int | None = 16,
    sensitivity: str = "transfer",
) -> PrecisionConfig | None:
    """The request of ``edgediff compile --precision ... --max-bytes ... --pin LAYER=FORMAT``: a budget alone
    implies ``auto``; pins are ``LAYER=FORMAT`` with ``LAYER`` a name or glob; ``sensitivity`` is "transfer"
    or "replay" (``--sensitivity``)."""
    from edgediff.errors import PrecisionError

    budget = {
        key: value
        for key, value in (("bytes", max_bytes), ("latency_ms", max_latency_ms), ("sqnr_db", min_sqnr_db))
        if value is not None
    }
    pinned = {}
    for item in pins or []:
        layer, sep, fmt = item.partition("=")
        if not sep or not layer or not fmt:
            raise PrecisionError(f"--pin expects LAYER=FORMAT (e.g. '*.conv_in=fp32'), got {item!r}")
        pinned[layer.strip()] = fmt.strip()
    if precision is None and not budget and not pinned:
        return None
    return PrecisionConfig(
        mode=precision or "auto",
        budget=budget or None,
        pins=pinned,
        sensitivity_latent=sensitivity_latent or None,
        sensitivity=sensitivity,
    )
