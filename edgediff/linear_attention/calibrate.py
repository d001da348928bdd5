"""Calibration: each softmax attention call of a torch model, its shape and kind, the linear form's error."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from edgediff.errors import InputError
from edgediff.linear_attention.config import LinearAttentionConfig
from edgediff.linear_attention.feature_maps import (
    FEATURE_EPS,
    feature_map,
    linear_attention,
    linear_reference,
    relative_error,
    softmax_reference,
)

# rows of a calibration call whose output error is measured (all keys; a strided subset of the queries)
ERROR_QUERY_ROWS = 1024


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
