"""The feature maps, and the numpy (float64) specification of linear and of softmax attention."""

from __future__ import annotations

import math

import numpy as np

from edgediff.errors import InputError

FEATURE_MAPS = ("relu", "elu+1", "taylor2", "favor+")


# added to the normaliser: ReLU features can all be 0 (SANA adds 1e-15 for the same reason); the other maps
# are positive, so nothing is added that would bias them
FEATURE_EPS = {"relu": 1e-15, "elu+1": 0.0, "taylor2": 0.0, "favor+": 0.0}


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
