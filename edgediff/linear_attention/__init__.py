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

from edgediff.linear_attention.calibrate import (
    ERROR_QUERY_ROWS,
    calibrate_attention,
    linear_sdpa,
)
from edgediff.linear_attention.config import (
    KINDS,
    LinearAttentionConfig,
    format_layer_table,
    linear_attention_from_options,
    resolve_linear_attention,
)
from edgediff.linear_attention.feature_maps import (
    FEATURE_EPS,
    FEATURE_MAPS,
    favor_projection,
    feature_dim,
    feature_map,
    linear_attention,
    linear_reference,
    relative_error,
    softmax_reference,
    taylor2_terms,
)

__all__ = [
    "ERROR_QUERY_ROWS",
    "FEATURE_EPS",
    "FEATURE_MAPS",
    "KINDS",
    "LinearAttentionConfig",
    "calibrate_attention",
    "favor_projection",
    "feature_dim",
    "feature_map",
    "format_layer_table",
    "linear_attention",
    "linear_attention_from_options",
    "linear_reference",
    "linear_sdpa",
    "relative_error",
    "resolve_linear_attention",
    "softmax_reference",
    "taylor2_terms",
]
