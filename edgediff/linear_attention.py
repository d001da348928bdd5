"""Linear attention for softmax-attention models: feature maps, their numpy reference, calibration.

``compile_model(..., linear_attention={"feature_map": "taylor2", "max_error": 0.01})`` replaces chosen
softmax attention layers by ``phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k)_j)`` (pass
``rewrite-linear-attention``). Feature maps:

* ``relu``, ``elu+1``: for weights fine-tuned with that map (LinFusion, MobileDiffusion-style); on weights
  trained for softmax they are a different model, which the measured error says.
* ``taylor2``: ``exp(s) ~ 1 + s + s^2 / 2`` with ``s = q.k * scale``: ``phi(x) = [1, x, x_i x_j]`` over
  ``i <= j`` (``x_i^2 / sqrt(2)`` on the diagonal) for ``x`` scaled by ``sqrt(scale)``: ``1 + d + d(d+1)/2``
  features. ``1 + s + s^2/2 > 0`` for every ``s``, so the normaliser is positive. Accurate while ``|s|``
  is small (about 1e-2 relative for ``|s| < 0.5``); attention with peaked scores is not.
* ``favor+``: Performer's positive random features, ``phi(x) = exp(w^T x - |x|^2 / 2) / sqrt(m)`` for ``m``
  Gaussian ``w`` (orthogonal blocks, seeded): an unbiased estimate of ``exp(q.k)``, error ~ 1/sqrt(m).

This module is the specification: :func:`feature_map` and :func:`linear_attention` (numpy, float64) are
what the pass's Relax ops compute and what calibration measures against exact softmax; tests check the
compiled kernels against them. :func:`linear_sdpa` runs a torch model with linear attention (the
reference for fine-tuned weights). Calibration (:func:`calibrate_attention`) runs the torch model on its
example inputs and on random inputs of the same shapes (one set per seed) and records, for every
scaled-dot-product-attention call in call order, its shape, kind (self or cross) and the relative error
of the linear form against the exact softmax on that call's own q, k, v.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgediff.errors import InputError

FEATURE_MAPS = ("relu", "elu+1", "taylor2", "favor+")
# added to the normaliser: ReLU features can all be 0 (SANA adds 1e-15 for the same reason); the other maps
# are positive, so nothing is added that would bias them
FEATURE_EPS = {"relu": 1e-15, "elu+1": 0.0, "taylor2": 0.0, "favor+": 0.0}
KINDS = ("self", "cross")
# rows of a calibration call whose output error is measured (all keys; a strided subset of the queries)
ERROR_QUERY_ROWS = 1024


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


def taylor2_terms(d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``phi(x)_f = c_f a_{i_f} a_{j_f}`` over ``a = [1, x]``: the indices ``i``, ``j`` and coefficients ``c``
    of taylor2's ``1 + d + d(d+1)/2`` features (1; x; the upper triangle of x x^T, 1/sqrt(2) on the
    diagonal), so that ``phi(q).phi(k) = 1 + q.k + (q.k)^2 / 2``."""
    i = [0] + [0] * d
    j = [0] + list(range(1, d + 1))
    c = [1.0] * (d + 1)
    for a in range(1, d + 1):
        for b in range(a, d + 1):
            i.append(a)
            j.append(b)
            c.append(math.sqrt(0.5) if a == b else 1.0)
    return np.array(i, dtype=np.int64), np.array(j, dtype=np.int64), np.array(c, dtype=np.float64)


def favor_projection(d: int, m: int, seed: int) -> np.ndarray:
    """FAVOR+'s (d, m) projection: orthogonal blocks of Gaussian directions with chi-distributed norms."""
    rng = np.random.default_rng(seed)
    blocks = []
    for _ in range(-(-m // d)):
        q, r = np.linalg.qr(rng.standard_normal((d, d)))
        # signs from R's diagonal make Q uniformly (Haar) distributed; without them directions are biased
        blocks.append((q * np.sign(np.diag(r))).T)
    directions = np.concatenate(blocks)[:m]
    norms = np.linalg.norm(rng.standard_normal((m, d)), axis=1)
    return (directions * norms[:, None]).T


def feature_dim(name: str, d: int, features: int = 256) -> int:
    """The number of features of a map for head dim ``d``."""
    return {"relu": d, "elu+1": d, "taylor2": 1 + d + d * (d + 1) // 2, "favor+": features}[name]


def feature_map(
    name: str, x: np.ndarray, *, scale: float = 1.0, features: int = 256, seed: int = 0
) -> np.ndarray:
    """``phi(x)`` over the last axis of ``x`` (float64). ``scale`` is the attention's ``q.k`` scale:
    taylor2 and favor+ approximate ``exp(scale q.k)``; relu and elu+1 ignore it (it cancels in the
    normalisation)."""
    x = np.asarray(x, dtype=np.float64)
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "elu+1":
        return np.maximum(x, 0.0) + np.exp(np.minimum(x, 0.0))
    xs = x * math.sqrt(scale)
    if name == "taylor2":
        i, j, c = taylor2_terms(x.shape[-1])
        a = np.concatenate([np.ones_like(xs[..., :1]), xs], axis=-1)
        return a[..., i] * a[..., j] * c
    if name == "favor+":
        w = favor_projection(x.shape[-1], features, seed)
        return np.exp(xs @ w - 0.5 * (xs * xs).sum(-1, keepdims=True)) / math.sqrt(features)
    raise InputError(f"unknown feature map {name!r}; expected one of {', '.join(FEATURE_MAPS)}")


def linear_attention(phi_q: np.ndarray, phi_k: np.ndarray, v: np.ndarray, eps: float = 0.0) -> np.ndarray:
    """``phi_q (phi_k^T v) / (phi_q sum_j phi_k_j + eps)`` over (..., tokens, features) arrays (float64)."""
    kv = np.swapaxes(phi_k, -1, -2) @ v
    den = phi_q @ phi_k.sum(-2)[..., None]
    return (phi_q @ kv) / (den + eps)


def linear_reference(
    name: str,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    scale: float,
    features: int = 256,
    seed: int = 0,
) -> np.ndarray:
    """Linear attention with feature map ``name`` on (..., N, d) q and (..., M, d) k, v (float64)."""
    options = {"scale": scale, "features": features, "seed": seed}
    phi_q, phi_k = feature_map(name, q, **options), feature_map(name, k, **options)
    return linear_attention(phi_q, phi_k, np.asarray(v, dtype=np.float64), FEATURE_EPS[name])


def softmax_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    s = (np.asarray(q, np.float64) @ np.swapaxes(np.asarray(k, np.float64), -1, -2)) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    return (p / p.sum(-1, keepdims=True)) @ np.asarray(v, np.float64)


def relative_error(approx: np.ndarray, exact: np.ndarray) -> float:
    """``||approx - exact|| / ||exact||`` (Frobenius)."""
    norm = float(np.linalg.norm(exact))
    return float(np.linalg.norm(approx - exact)) / norm if norm > 0 else float(np.linalg.norm(approx))


# --- torch side: a reference run with linear attention, and calibration ----------------------------------


def _sdpa_args(q: Any, a: tuple, kw: dict) -> tuple[Any, bool, float]:
    """(attn_mask, is_causal, scale) of a scaled_dot_product_attention call."""
    names = ("attn_mask", "dropout_p", "is_causal", "scale")
    given = dict(zip(names, a, strict=False)) | kw
    scale = given.get("scale")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return given.get("attn_mask"), bool(given.get("is_causal", False)), scale


@contextlib.contextmanager
def linear_sdpa(name: str, *, features: int = 256, seed: int = 0) -> Iterator[None]:
    """Run torch models with every scaled-dot-product attention replaced by linear attention (feature map
    ``name``, computed in float64): the reference for weights fine-tuned with that map."""
    import torch

    from edgediff.precision.calibration import patch_sdpa

    def linear(original: Any, q: Any, k: Any, v: Any, *a: Any, **kw: Any) -> Any:
        mask, causal, scale = _sdpa_args(q, a, kw)
        if mask is not None or causal:
            return original(q, k, v, *a, **kw)
        out = linear_reference(
            name,
            q.detach().numpy(),
            k.detach().numpy(),
            v.detach().numpy(),
            scale=scale,
            features=features,
            seed=seed,
        )
        return torch.from_numpy(out).to(q.dtype)

    with patch_sdpa(linear):
        yield


def calibrate_attention(
    module: Any, example_inputs: Sequence[Any], config: LinearAttentionConfig
) -> list[dict[str, Any]]:
    """One record per attention call of ``module``, in call order: ``name`` (the diffusers Attention module),
    ``kind`` (``cross`` when its keys come from another sequence), ``shape`` (batch*heads, N, M, d),
    ``scale``, ``error`` (largest over the calibration inputs; inf where the call has a mask, which the
    linear form cannot express)."""
    if module is None:
        raise InputError(
            "linear_attention: measuring the error needs the torch model (an ONNX model can only take "
            "fine_tuned=True)"
        )
    import torch

    from edgediff.precision.calibration import ModelHooks

    modules = dict(module.named_modules())
    records: list[dict[str, Any]] = []
    options = {"features": config.features, "seed": config.seed}

    class Hooks(ModelHooks):
        index = 0

        def attention(self, name: str, original: Any, q: Any, k: Any, v: Any, *a: Any, **kw: Any) -> Any:
            mask, causal, scale = _sdpa_args(q, a, kw)
            owner = modules.get(name.rsplit(".sdpa", 1)[0])
            cross = bool(getattr(owner, "is_cross_attention", False)) or k.shape[-2] != q.shape[-2]
            qn, kn, vn = (t.detach().double().numpy() for t in (q, k, v))
            heads = int(np.prod(qn.shape[:-2]))
            n, m, d = qn.shape[-2], kn.shape[-2], qn.shape[-1]
            if mask is not None or causal:
                error = math.inf
            else:
                rows = qn[..., :: max(1, n // ERROR_QUERY_ROWS), :]
                exact = softmax_reference(rows, kn, vn, scale)
                phi_k = feature_map(config.feature_map, kn, scale=scale, **options)
                phi_q = feature_map(config.feature_map, rows, scale=scale, **options)
                approx = linear_attention(phi_q, phi_k, vn, FEATURE_EPS[config.feature_map])
                error = relative_error(approx, exact)
            if self.index < len(records):
                records[self.index]["error"] = max(records[self.index]["error"], error)
            else:
                kind = "cross" if cross else "self"
                shape = [heads, n, m, d]
                records.append({"name": name, "kind": kind, "shape": shape, "scale": scale, "error": error})
            self.index += 1
            return original(q, k, v, *a, **kw)

    module.eval()
    with torch.no_grad():
        for inputs in _calibration_inputs(example_inputs, config.calibration_seeds):
            with Hooks(module) as hooks:
                hooks.index = 0
                module(*inputs)
    return records


def _calibration_inputs(example_inputs: Sequence[Any], seeds: Sequence[int]) -> list[tuple[Any, ...]]:
    """The example inputs, then per seed random normal floating inputs of the same shapes (integer inputs,
    scalars and timesteps keep the example's values)."""
    import torch

    sets = [tuple(example_inputs)]
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        sets.append(
            tuple(
                torch.randn(x.shape, generator=gen, dtype=x.dtype)
                if isinstance(x, torch.Tensor) and x.dtype.is_floating_point and x.ndim >= 2
                else x
                for x in example_inputs
            )
        )
    return sets
