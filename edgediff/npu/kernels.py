"""numpy reference kernels for the ops of an NPU program, on whole tensors or on tiles.

Both the untiled reference (every op on whole tensors) and the NPU simulator (every op on the SRAM tiles the
program names) run these, so a difference between the two is a tiling error, not a kernel difference.
Kernels compute in float32 (float16 and int8 tensors are widened) and round to the op's dtype, as the NPU's
fp32 accumulators do. numpy only: the simulator must not need TVM or torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

Box = list[list[int]]  # [[lo, hi], ...] per axis, absolute indices into the whole tensor


def full_box(shape: list[int]) -> Box:
    return [[0, int(d)] for d in shape]


def box_shape(box: Box) -> list[int]:
    return [hi - lo for lo, hi in box]


def _np_dtype(dtype: str) -> Any:
    return np.bool_ if dtype == "bool" else np.dtype(dtype)


def _f32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if x.dtype != np.float64 else x


def _erf(x: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf, otypes=[np.float64])(x.astype(np.float64)).astype(np.float32)


def _gelu(x: np.ndarray, approximate: str = "none") -> np.ndarray:
    x = _f32(x)
    if approximate == "tanh":
        return 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x**3)))
    return 0.5 * x * (1 + _erf(x / np.sqrt(2.0)))


def _softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = _f32(x)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


_UNARY: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "relax.sigmoid": lambda x: 1 / (1 + np.exp(-_f32(x))),
    "relax.nn.silu": lambda x: _f32(x) / (1 + np.exp(-_f32(x))),
    "relax.nn.relu": lambda x: np.maximum(x, 0),
    "relax.tanh": lambda x: np.tanh(_f32(x)),
    "relax.exp": lambda x: np.exp(_f32(x)),
    "relax.sqrt": lambda x: np.sqrt(_f32(x)),
    "relax.rsqrt": lambda x: 1 / np.sqrt(_f32(x)),
    "relax.negative": lambda x: -x,
    "relax.erf": _erf,
    "relax.sin": lambda x: np.sin(_f32(x)),
    "relax.cos": lambda x: np.cos(_f32(x)),
    "relax.logical_not": np.logical_not,
    "relax.nn.gelu": _gelu,
    "relax.nn.gelu_tanh": lambda x: _gelu(x, "tanh"),
}
_BINARY: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "relax.add": np.add,
    "relax.subtract": np.subtract,
    "relax.multiply": np.multiply,
    "relax.divide": lambda a, b: _f32(a) / _f32(b) if a.dtype.kind == "f" else np.floor_divide(a, b),
    "relax.power": lambda a, b: np.power(_f32(a), _f32(b)),
    "relax.maximum": np.maximum,
    "relax.minimum": np.minimum,
    "relax.equal": np.equal,
    "relax.not_equal": np.not_equal,
    "relax.less": np.less,
    "relax.less_equal": np.less_equal,
    "relax.greater": np.greater,
    "relax.greater_equal": np.greater_equal,
    "relax.logical_and": np.logical_and,
    "relax.logical_or": np.logical_or,
}


def _conv2d(x: np.ndarray, w: np.ndarray, attrs: dict[str, Any], pad: list[int]) -> np.ndarray:
    """NCHW x OIHW convolution; ``pad`` = [top, left, bottom, right] zero rows/columns added here."""
    sh, sw = attrs.get("strides", [1, 1])
    dh, dw = attrs.get("dilation", [1, 1])
    groups = attrs.get("groups", 1)
    x = np.pad(_f32(x), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    w = _f32(w)
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    ho = (h - dh * (kh - 1) - 1) // sh + 1
    wo = (wd - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo), np.float32)
    og = o // groups
    for g in range(groups):
        xg = x[:, g * cg : (g + 1) * cg]
        wg = w[g * og : (g + 1) * og]
        for i in range(kh):
            for j in range(kw):
                patch = xg[
                    :, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh, j * dw : j * dw + sw * (wo - 1) + 1 : sw
                ]
                out[:, g * og : (g + 1) * og] += np.einsum(
                    "nchw,oc->nohw", patch, wg[:, :, i, j], optimize=True
                )
    return out


def group_norm_stats(x: np.ndarray, groups: int, channels: range | None = None, total: int = 0) -> np.ndarray:
    """Per (batch, group): [count, mean, M2] of an N, C, ... tile (float64), to merge with
    :func:`merge_stats`; ``channels`` (absolute) and ``total`` when the tile holds some channels only."""
    n, c = x.shape[:2]
    if channels is None or (channels.start == 0 and len(channels) == total):
        v = x.astype(np.float64).reshape(n, groups, -1)
        mean = v.mean(axis=2)
        return np.stack(
            [np.full_like(mean, v.shape[2]), mean, ((v - mean[..., None]) ** 2).sum(axis=2)], axis=-1
        )
    per_group = total // groups
    out = np.zeros((n, groups, 3))
    for g in range(channels.start // per_group, (channels.stop - 1) // per_group + 1):
        lo, hi = max(g * per_group, channels.start), min((g + 1) * per_group, channels.stop)
        v = x[:, lo - channels.start : hi - channels.start].astype(np.float64).reshape(n, -1)
        mean = v.mean(axis=1)
        out[:, g] = np.stack(
            [np.full_like(mean, v.shape[1]), mean, ((v - mean[:, None]) ** 2).sum(axis=1)], -1
        )
    return out


def merge_stats(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Chan et al.'s parallel merge of two [count, mean, M2] sets: exact, unlike sum / sum-of-squares."""
    na, nb = a[..., 0], b[..., 0]
    n = na + nb
    delta = b[..., 1] - a[..., 1]
    mean = a[..., 1] + delta * nb / np.maximum(n, 1)
    m2 = a[..., 2] + b[..., 2] + delta**2 * na * nb / np.maximum(n, 1)
    return np.stack([n, mean, m2], axis=-1)


def _group_norm(
    x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, attrs: dict[str, Any], stats: Any, channels: range
) -> Any:
    """GroupNorm of the channels ``channels`` (absolute) of an N, C, ... tile: with ``stats`` (from the
    statistics phase) any channel range; without, ``x`` must hold whole samples (its own statistics)."""
    groups = attrs["num_groups"]
    total = len(channels) if stats is None else attrs["channels"]
    if stats is None:
        stats = group_norm_stats(x, groups)
    per_group = total // groups
    index = np.asarray(channels) // per_group
    mean = stats[:, index, 1]
    var = stats[:, index, 2] / stats[:, index, 0]
    shape = mean.shape + (1,) * (x.ndim - 2)
    y = (x.astype(np.float64) - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + attrs["epsilon"])
    bshape = (1, len(channels)) + (1,) * (x.ndim - 2)
    if attrs.get("scale", True):
        y = y * _f32(gamma).reshape(bshape)
    if attrs.get("center", True):
        y = y + _f32(beta).reshape(bshape)
    return y.astype(np.float32)


def _layer_norm(x: np.ndarray, gamma: np.ndarray, beta: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    axes = tuple(a % x.ndim for a in attrs["axes"])
    v = x.astype(np.float64)
    mean = v.mean(axis=axes, keepdims=True)
    var = v.var(axis=axes, keepdims=True)
    y = (v - mean) / np.sqrt(var + attrs["epsilon"])
    if attrs.get("scale", True):
        y = y * _f32(gamma)
    if attrs.get("center", True):
        y = y + _f32(beta)
    return y.astype(np.float32)


def _resize_nearest(
    x: np.ndarray, rows: list[int], cols: list[int], in_row0: int, in_col0: int
) -> np.ndarray:
    """Nearest upsampling by integer factors; output rows ``rows`` (absolute) from an input tile at row0."""
    return x[:, :, np.asarray(rows) - in_row0][:, :, :, np.asarray(cols) - in_col0]


def attention_block(
    q: np.ndarray, kt: np.ndarray, v: np.ndarray, state: list[np.ndarray] | None, attrs: dict[str, Any]
) -> list[np.ndarray]:
    """One key/value block of flash attention: update the running max, denominator and output (online
    softmax).

    ``q`` [B, Nq, d], ``kt`` [B, d, Nk], ``v`` [B, Nk, dv]; ``state`` = [m, l, acc] or None for the first
    block. Scores are rounded to ``score_dtype`` and probabilities to ``prob_dtype`` as the untiled graph
    rounds them.
    """
    s = np.matmul(_f32(q), _f32(kt))
    if attrs.get("score_dtype"):
        s = s.astype(attrs["score_dtype"]).astype(np.float32)
    s = s * np.float32(attrs["scale"])
    m_new = s.max(axis=-1, keepdims=True)
    if state is not None:
        m_new = np.maximum(m_new, state[0])
    p = np.exp(s - m_new)
    l_blk = p.sum(axis=-1, keepdims=True)
    pv = np.matmul(p.astype(attrs["prob_dtype"]).astype(np.float32), _f32(v))
    if state is None:
        return [m_new, l_blk, pv]
    alpha = np.exp(state[0] - m_new)
    return [m_new, state[1] * alpha + l_blk, state[2] * alpha + pv]


def attention_finish(state: list[np.ndarray], out_dtype: str) -> np.ndarray:
    return (state[2] / state[1]).astype(out_dtype)


def evaluate(
    op: str,
    attrs: dict[str, Any],
    args: list[Any],
    shape: list[int] | None,
    dtype: str,
    out_box: Box | None = None,
    arg_boxes: list[Box | None] | None = None,
    extra: Any = None,
) -> Any:
    """Run ``op`` on numpy ``args``; returns the output (of ``dtype``).

    On a tile, ``out_box`` is the part of the output wanted and ``arg_boxes`` where each array argument lies
    in its whole tensor; ops whose output rows are not their input rows (conv, resize) need them. ``extra``:
    GroupNorm statistics of the whole tensor.
    """
    out_box = out_box or (full_box(shape) if shape is not None else None)
    if op in _UNARY:
        out = _UNARY[op](args[0])
    elif op in _BINARY:
        out = _BINARY[op](args[0], args[1])
    elif op == "relax.astype":
        out = args[0]
    elif op == "relax.where":
        out = np.where(args[0], args[1], args[2])
    elif op == "relax.full_like":
        out = np.full(box_shape(out_box), args[1])
    elif op == "relax.clip":
        out = np.clip(args[0], args[1], args[2])
    elif op == "relax.matmul":
        out = np.matmul(_f32(args[0]), _f32(args[1]))
    elif op == "relax.nn.conv2d":
        out = _conv2d_tile(args[0], args[1], attrs, out_box, arg_boxes[0] if arg_boxes else None)
    elif op == "relax.nn.group_norm":
        channels = range(out_box[1][0], out_box[1][1])
        out = _group_norm(args[0], args[1], args[2], {**attrs, "channels": shape[1]}, extra, channels)
    elif op == "relax.nn.layer_norm":
        out = _layer_norm(args[0], args[1], args[2], attrs)
    elif op == "relax.nn.softmax":
        out = _softmax(args[0], attrs["axis"])
    elif op in ("relax.mean", "relax.max", "relax.sum", "relax.min"):
        fn = {"relax.mean": np.mean, "relax.max": np.max, "relax.sum": np.sum, "relax.min": np.min}[op]
        axes = attrs.get("axis")
        out = fn(args[0], axis=None if axes is None else tuple(axes), keepdims=attrs.get("keepdims", False))
    elif op == "relax.image.resize2d":
        in_box = arg_boxes[0] if arg_boxes else full_box(list(args[0].shape))
        size = args[1]
        whole_in = [in_box[2][1], in_box[3][1]] if arg_boxes is None else [extra[0], extra[1]]
        fh, fw = size[0] // whole_in[0], size[1] // whole_in[1]
        rows = [r // fh for r in range(*out_box[2])]
        cols = [c // fw for c in range(*out_box[3])]
        out = _resize_nearest(args[0], rows, cols, in_box[2][0], in_box[3][0])
    elif op == "edgediff.attention":
        out = attention_finish(attention_block(args[0], args[1], args[2], None, attrs), dtype)
    elif op in _VIEWS:
        out = _VIEWS[op](args, attrs, shape)
    elif op == "const":
        out = args[0]
    elif op == "relax.arange":
        out = np.arange(args[0], args[1], args[2])
    elif op == "relax.take":
        out = np.take(args[0], np.asarray(args[1]).astype(np.int64), axis=attrs.get("axis") or 0)
    else:
        raise NotImplementedError(f"no numpy kernel for {op}")
    if dtype == "tuple":
        return out
    return np.asarray(out).astype(_np_dtype(dtype), copy=False)


def _conv2d_tile(
    x: np.ndarray, w: np.ndarray, attrs: dict[str, Any], out_box: Box, in_box: Box | None
) -> Any:
    """The conv output rows ``out_box`` from an input tile at ``in_box``: padding rows that lie outside the
    whole input (the image border) are zeros, those inside are the halo the tile already holds."""
    top, left, bottom, right = attrs.get("padding", [0, 0, 0, 0])
    sh = attrs.get("strides", [1, 1])[0]
    dh = attrs.get("dilation", [1, 1])[0]
    kh = w.shape[2]
    if in_box is None:
        return _conv2d(x, w, attrs, [top, left, bottom, right])[:, out_box[1][0] - 0 : out_box[1][1]]
    lo, hi = out_box[2]
    need_lo, need_hi = lo * sh - top, (hi - 1) * sh - top + dh * (kh - 1) + 1
    have_lo, have_hi = in_box[2]
    x = x[:, :, max(need_lo, have_lo) - have_lo : min(need_hi, have_hi) - have_lo]
    pad = [max(0, have_lo - need_lo), left, max(0, need_hi - have_hi), right]
    return _conv2d(x, w, attrs, pad)


def _permute(args: list[Any], attrs: dict[str, Any], shape: Any) -> np.ndarray:
    axes = attrs.get("axes")
    return np.transpose(args[0], axes)


def _strided_slice(args: list[Any], attrs: dict[str, Any], shape: Any) -> np.ndarray:
    x = args[0]
    axes, begin, end = args[1], args[2], args[3]
    strides = args[4] if len(args) > 4 and args[4] is not None else [1] * len(axes)
    index = [slice(None)] * x.ndim
    for a, b, e, s in zip(axes, begin, end, strides, strict=False):
        index[a] = slice(b, min(e, x.shape[a]), s)
    return x[tuple(index)]


def _split(args: list[Any], attrs: dict[str, Any], shape: Any) -> list[np.ndarray]:
    sections = attrs["indices_or_sections"]
    return np.split(args[0], sections, axis=attrs["axis"])


_VIEWS: dict[str, Callable[[list[Any], dict[str, Any], Any], Any]] = {
    "relax.reshape": lambda a, at, s: np.reshape(a[0], s),
    "relax.expand_dims": lambda a, at, s: np.reshape(a[0], s),
    "relax.squeeze": lambda a, at, s: np.reshape(a[0], s),
    "relax.flatten": lambda a, at, s: np.reshape(a[0], s),
    "relax.broadcast_to": lambda a, at, s: np.broadcast_to(a[0], s),
    "relax.permute_dims": _permute,
    "relax.concat": lambda a, at, s: np.concatenate(a[0], axis=at.get("axis") or 0),
    "relax.split": _split,
    "relax.strided_slice": _strided_slice,
    "tuple_get": lambda a, at, s: a[0][at["index"]],
}
