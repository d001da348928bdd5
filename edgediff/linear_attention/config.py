"""What a user asks for (``linear_attention=``): feature map, error bounds; the per-layer table."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgediff.errors import InputError
from edgediff.linear_attention.feature_maps import FEATURE_MAPS

KINDS = ("self", "cross")


@dataclass
class LinearAttentionConfig:
    """What ``compile_model(linear_attention=...)`` asked for.

    ``max_error``: the largest relative L2 error of a layer's output (against exact softmax, on the
    calibration inputs) for which the layer is rewritten; one number, or per kind ``{"self": .., "cross":
    ..}`` (a kind left out is not rewritten). ``fine_tuned``: the weights were trained with this feature
    map, so every attention layer is rewritten, nothing is measured, and the result is exact.
    """

    feature_map: str
    max_error: dict[str, float] = field(default_factory=dict)
    fine_tuned: bool = False
    features: int = 256  # favor+: random features
    seed: int = 0  # favor+: the projection's seed
    calibration_seeds: tuple[int, ...] = (0, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "feature_map": self.feature_map,
            "max_error": dict(self.max_error),
            "fine_tuned": self.fine_tuned,
            "features": self.features,
            "seed": self.seed,
        }


def resolve_linear_attention(request: Any) -> LinearAttentionConfig | None:
    """``compile_model``'s ``linear_attention`` argument as a config (None: off).

    Accepts None/False, a feature-map name (fine-tuned weights), a mapping with ``feature_map`` and
    ``max_error`` (or ``fine_tuned=True``), ``features``, ``seed``, ``calibration_seeds``, or a config.
    """
    if request is None or request is False:
        return None
    if isinstance(request, LinearAttentionConfig):
        config = request
    elif isinstance(request, str):
        config = LinearAttentionConfig(request, fine_tuned=True)
    elif isinstance(request, Mapping):
        known = {"feature_map", "max_error", "fine_tuned", "features", "seed", "calibration_seeds"}
        unknown = set(request) - known
        if unknown:
            raise InputError(f"linear_attention: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if "feature_map" not in request:
            raise InputError(f"linear_attention needs a feature_map (one of {', '.join(FEATURE_MAPS)})")
        bound = request.get("max_error")
        if bound is None:
            max_error = {}
        elif isinstance(bound, Mapping):
            if set(bound) - set(KINDS):
                raise InputError(
                    f"linear_attention max_error keys must be among {KINDS}, got {sorted(bound)}"
                )
            max_error = {k: float(v) for k, v in bound.items()}
        else:
            max_error = dict.fromkeys(KINDS, float(bound))
        config = LinearAttentionConfig(
            str(request["feature_map"]),
            max_error,
            bool(request.get("fine_tuned", False)),
            int(request.get("features", 256)),
            int(request.get("seed", 0)),
            tuple(int(s) for s in request.get("calibration_seeds", (0, 1))),
        )
    else:
        raise InputError(f"linear_attention must be None, a feature map name or a mapping, got {request!r}")
    if config.feature_map not in FEATURE_MAPS:
        raise InputError(
            f"linear_attention feature_map {config.feature_map!r} is not one of {', '.join(FEATURE_MAPS)}"
        )
    if not config.fine_tuned and not config.max_error:
        raise InputError("linear_attention needs max_error (the error bound per layer) or fine_tuned=True")
    if config.features < 1:
        raise InputError(f"linear_attention features must be positive, got {config.features}")
    return config


def linear_attention_from_options(
    feature_map: str | None,
    *,
    max_error: float | None = None,
    cross_max_error: float | None = None,
    fine_tuned: bool = False,
    features: int | None = None,
) -> dict[str, Any] | None:
    """The ``linear_attention`` argument of the command line's flags (None when no feature map is given)."""
    if feature_map is None:
        if max_error is not None or cross_max_error is not None or fine_tuned or features is not None:
            raise InputError("--linear-attention-* options need --linear-attention MAP")
        return None
    request: dict[str, Any] = {"feature_map": feature_map, "fine_tuned": fine_tuned}
    if max_error is not None or cross_max_error is not None:
        bounds = dict.fromkeys(KINDS, max_error) if max_error is not None else {}
        if cross_max_error is not None:
            bounds["cross"] = cross_max_error
        request["max_error"] = {kind: bound for kind, bound in bounds.items() if bound is not None}
    if features is not None:
        request["features"] = features
    return request


def format_layer_table(layers: Sequence[Mapping[str, Any]]) -> str:
    """The per-layer report of ``rewrite-linear-attention`` as a text table."""
    lines = [
        f"  {'layer':<64} {'kind':<5} {'N':>6} {'M':>6} {'error':>9} {'saving ms':>10}  decision",
    ]
    for layer in layers:
        error = "-" if layer["error"] is None else f"{layer['error']:.3g}"
        decision = "rewritten" if layer["rewritten"] else f"kept: {layer['reason']}"
        lines.append(
            f"  {layer['name'][-64:]:<64} {layer['kind']:<5} {layer['n']:>6} {layer['m']:>6} {error:>9} "
            f"{layer['saving_ms']:>10.3f}  {decision}"
        )
    return "\n".join(lines)


# --- the feature maps (numpy reference) ------------------------------------------------------------------
