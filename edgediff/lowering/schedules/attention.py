"""Fused (flash-style) attention for CPUs: one kernel computing softmax(q k^T * scale) v a tile at a time.

The unfused graph writes the whole ``heads x N x M`` score matrix three times (scores, softmax, the
safe-softmax ``where``) and reads it back as often: 512 MB per SD1.5 self attention at a 64x64 latent.
This kernel keeps one ``block_q x block_k`` tile of scores in L1 and folds it into a running softmax
(FlashAttention's online softmax): for each key block, ``m`` is the running row maximum, ``l`` the running
sum of ``exp(s - m)`` and ``acc`` the running ``sum exp(s - m) v``; when a block raises the maximum the
old ``l`` and ``acc`` are rescaled by ``exp(m_old - m_new)``. The result ``acc / l`` equals softmax(s) v.

The kernel is emitted already scheduled (``tirx.is_scheduled``): it is parallel over (batch*head, query
block) and its two small GEMMs (``q k^T`` and ``p v``) are register-tiled and vectorized, with every size
taken from the target's :class:`~edgediff.targets.CostModel` (vector lanes, register file, L1), so the
same builder gives AVX-512 tiles on the host and NEON tiles on a Cortex-A78. Sums and maxima are kept in
float32 whatever the input dtype.

Rows whose scores are all ``-inf`` (fully masked) give zeros, as PyTorch's safe softmax decomposition
does: the running maximum then stays ``-inf``, which is replaced by 0 before subtracting, so every
``exp`` is 0 and ``l`` stays 0; the output is ``acc / l`` only where ``l > 0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from edgediff.lowering.schedules.common import choose_register_tile, largest_divisor, vector_width
from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS

# Below this argument float32 exp underflows to 0 (ln of the smallest normal float32).
EXP_UNDERFLOW = -87.3
# exp(x) = 2^n * e^r with r in [-ln2/2, ln2/2]; Cephes' expf polynomial for e^r (relative error ~1e-7)
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)


@dataclass(frozen=True)
class AttentionTiles:
    """The tile sizes of one fused attention kernel (what the cost model chose; reported per site)."""

    block_q: int  # queries per parallel task (they share each K/V block loaded into L1)
    block_k: int  # keys per step of the online softmax (a K and a V block fit in L1)
    padded_m: int  # keys rounded up to whole blocks (the kernel masks the padding to -inf)
    rows: int  # query rows of the q k^T register tile
    key_vectors: int  # vectors along the key block in the q k^T register tile
    key_width: int  # lanes of those vectors
    pv_rows: int  # query rows of the p v register tile
    dim_vectors: int  # vectors along the head dimension in the p v register tile
    dim_width: int  # lanes of those vectors


def choose_attention_tiles(cost: CostModel, dtype: str, n: int, m: int, d: int) -> AttentionTiles:
    """Tile sizes for ``n`` queries, ``m`` keys and head dim ``d`` on this target.

    A block of K^T and one of V (``2 * d * block_k`` elements) fill L1, so they stay near while every query
    of the task passes over them (measured: blocks of 64-256 keys beat 32, as each block costs a row
    maximum and a rescale); the score tile and the output accumulators of the task
    (``block_q * (block_k + d)`` floats) take a quarter of L1. Query blocks divide ``n``. Key blocks are whole
    vectors; when no such block divides ``m`` the keys are padded (and masked) up to whole blocks, the
    block chosen for the least padding: 77 text tokens become 5 blocks of 16 on AVX-512, where blocks of
    7 or 11 keys would leave the score tile scalar.
    """
    itemsize = DTYPE_BITS[dtype] // 8
    lanes = cost.vector_lanes("float32")
    limit = max(lanes, cost.cache_block(2 * d * itemsize, "l1", 1.0) // lanes * lanes)
    # least padding first, then the largest block (fewest online-softmax rescales)
    block_k = min(range(lanes, limit + 1, lanes), key=lambda b: (-(-m // b) * b, -b))
    padded_m = -(-m // block_k) * block_k
    tile = choose_register_tile(cost, "float32", n, block_k)
    block_q = _divisor_block(n, max(tile.rows, cost.cache_block((block_k + d) * 4, "l1", 0.25)), tile.rows)
    rows = largest_divisor(block_q, tile.rows)
    # p v: as many head-dim vectors per row as leave room for two rows, so each p broadcast feeds them all
    dim_width = vector_width(d, lanes)
    dim_vectors = largest_divisor(d // dim_width, max(1, cost.accumulator_vectors() // 2))
    pv_rows = largest_divisor(block_q, max(1, cost.accumulator_vectors() // dim_vectors))
    return AttentionTiles(
        block_q, block_k, padded_m, rows, tile.col_vectors, tile.width, pv_rows, dim_vectors, dim_width
    )


def _divisor_block(n: int, limit: int, multiple: int) -> int:
    """The largest divisor of ``n`` up to ``limit`` that is a multiple of ``multiple``, else the largest."""
    for b in range(min(n, max(1, limit)), 0, -1):
        if n % b == 0 and b % multiple == 0:
            return b
    return largest_divisor(n, limit)


def fast_exp(x: Any) -> Any:
    """exp(x) for float32 by range reduction, as plain arithmetic LLVM can vectorize (libm's expf is a
    scalar call per lane). Exact 0 below the float32 underflow, so masked (-inf) scores contribute 0."""
    from tvm import tirx

    f32 = "float32"
    xc = tirx.max(x, tirx.const(EXP_UNDERFLOW, f32))
    n = tirx.floor(xc * tirx.const(1.0 / math.log(2.0), f32) + tirx.const(0.5, f32))
    r = xc - n * tirx.const(math.log(2.0), f32)
    p = tirx.const(_EXP_POLY[0], f32)
    for c in _EXP_POLY[1:]:
        p = p * r + tirx.const(c, f32)
    p = p * r * r + r + tirx.const(1.0, f32)
    two_n = tirx.reinterpret(f32, tirx.shift_left(tirx.Cast("int32", n) + 127, 23))
    return tirx.Select(x < tirx.const(EXP_UNDERFLOW, f32), tirx.const(0.0, f32), p * two_n)


def fused_attention_kernel(
    cost: CostModel,
    *,
    batch: int,
    n: int,
    m: int,
    d: int,
    dtype: str,
    scale: float = 1.0,
    exp: str = "fast",
    tiles: AttentionTiles | None = None,
) -> Any:
    """The scheduled PrimFunc ``out[b, i, :] = softmax(scale * q[b, i, :] @ kt[b, :, :]) @ v[b, :, :]``.

    ``q`` is ``(batch, n, d)``, ``kt`` the transposed keys ``(batch, d, padded_m)`` (keys contiguous: the
    score tile is vectorized along them), ``v`` is ``(batch, padded_m, d)``; keys from ``m`` on are padding,
    masked out (their scores are -inf). ``exp`` is ``"fast"`` (:func:`fast_exp`)
    or ``"libm"`` (``tirx.exp``, kept for measuring the difference).
    """
    from tvm import tirx
    from tvm.script import tirx as T

    t = tiles or choose_attention_tiles(cost, dtype, n, m, d)
    bq, bk, rr, kv, kw = t.block_q, t.block_k, t.rows, t.key_vectors, t.key_width
    pr, dv, dw = t.pv_rows, t.dim_vectors, t.dim_width
    mp = t.padded_m
    tasks, steps = batch * (n // bq), mp // bk
    q_per_b = n // bq
    f32 = "float32"
    exp_fn = fast_exp if exp == "fast" else tirx.exp
    neg_inf = tirx.const(-math.inf, f32)

    def load(x: Any) -> Any:
        return x if dtype == f32 else T.Cast(f32, x)

    def mask(score: Any, key: Any) -> Any:
        # padded keys score -inf, so they get weight 0; without padding no test is emitted at all
        return score if mp == m else T.Select(key < m, score, neg_inf)

    @T.prim_func(private=True, check_well_formed=False)
    def fused_attention(
        q: T.Buffer((batch, n, d), dtype),
        kt: T.Buffer((batch, d, mp), dtype),
        v: T.Buffer((batch, mp, d), dtype),
        out: T.Buffer((batch, n, d), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        for task in T.parallel(tasks):
            s = T.decl_buffer((bq * bk,), f32, scope="global")
            acc = T.decl_buffer((bq * d,), f32, scope="global")
            row_max = T.decl_buffer((bq,), f32, scope="global")
            # lane-wise partial sums of each row: the horizontal sum is done once, at the end
            row_sum = T.decl_buffer((bq * kw,), f32, scope="global")
            alpha = T.decl_buffer((bq,), f32, scope="global")
            reg = T.decl_buffer((max(rr * kv * kw, pr * dv * dw),), f32, scope="local")
            lane = T.decl_buffer((kw,), f32, scope="local")
            red = T.decl_buffer((1,), f32, scope="local")
            b = task // q_per_b
            q0 = task % q_per_b * bq
            for i in range(bq):
                row_max[i] = neg_inf
            for x in T.vectorized(bq * kw):
                row_sum[x] = T.float32(0)
            for x in T.vectorized(bq * d):
                acc[x] = T.float32(0)
            for step in range(steps):
                k0 = step * bk
                # s = scale * q k^T, a (rr x kv vectors) register tile at a time
                for i0, jo in T.grid(bq // rr, bk // (kv * kw)):
                    for ii in T.unroll(rr):
                        for jv in T.unroll(kv):
                            for ji in T.vectorized(kw):
                                reg[(ii * kv + jv) * kw + ji] = T.float32(0)
                    for dd in range(d):
                        for ii in T.unroll(rr):
                            for jv in T.unroll(kv):
                                for ji in T.vectorized(kw):
                                    reg[(ii * kv + jv) * kw + ji] = reg[(ii * kv + jv) * kw + ji] + load(
                                        q[b, q0 + i0 * rr + ii, dd]
                                    ) * load(kt[b, dd, k0 + (jo * kv + jv) * kw + ji])
                    for ii in T.unroll(rr):
                        for jv in T.unroll(kv):
                            for ji in T.vectorized(kw):
                                s[(i0 * rr + ii) * bk + (jo * kv + jv) * kw + ji] = mask(
                                    reg[(ii * kv + jv) * kw + ji] * T.float32(scale),
                                    k0 + (jo * kv + jv) * kw + ji,
                                )
                # online softmax: new row maximum, rescale factor, p = exp(s - m), running sum
                for i in range(bq):
                    for ji in T.vectorized(kw):
                        lane[ji] = neg_inf
                    for jo in range(bk // kw):
                        for ji in T.vectorized(kw):
                            lane[ji] = T.max(lane[ji], s[i * bk + jo * kw + ji])
                    red[0] = row_max[i]
                    for ji in range(kw):
                        red[0] = T.max(red[0], lane[ji])
                    m_new = red[0]
                    # a row still all -inf keeps m = -inf; subtracting 0 instead makes every exp 0, not NaN
                    m_sub = T.Select(m_new == neg_inf, T.float32(0), m_new)
                    alpha[i] = exp_fn(row_max[i] - m_sub)
                    row_max[i] = m_new
                    for ji in T.vectorized(kw):
                        row_sum[i * kw + ji] = row_sum[i * kw + ji] * alpha[i]
                    for jo in range(bk // kw):
                        for ji in T.vectorized(kw):
                            s[i * bk + jo * kw + ji] = exp_fn(s[i * bk + jo * kw + ji] - m_sub)
                            row_sum[i * kw + ji] = row_sum[i * kw + ji] + s[i * bk + jo * kw + ji]
                # acc = acc * alpha + p v, a (pr x dv vectors) register tile at a time
                for i0, do in T.grid(bq // pr, d // (dv * dw)):
                    for ii in T.unroll(pr):
                        for dj in T.unroll(dv):
                            for di in T.vectorized(dw):
                                reg[(ii * dv + dj) * dw + di] = (
                                    acc[(i0 * pr + ii) * d + (do * dv + dj) * dw + di] * alpha[i0 * pr + ii]
                                )
                    for j in range(bk):
                        for ii in T.unroll(pr):
                            for dj in T.unroll(dv):
                                for di in T.vectorized(dw):
                                    reg[(ii * dv + dj) * dw + di] = reg[(ii * dv + dj) * dw + di] + s[
                                        (i0 * pr + ii) * bk + j
                                    ] * load(v[b, k0 + j, (do * dv + dj) * dw + di])
                    for ii in T.unroll(pr):
                        for dj in T.unroll(dv):
                            for di in T.vectorized(dw):
                                acc[(i0 * pr + ii) * d + (do * dv + dj) * dw + di] = reg[
                                    (ii * dv + dj) * dw + di
                                ]
            for i in range(bq):
                red[0] = T.float32(0)
                for ji in range(kw):
                    red[0] = red[0] + row_sum[i * kw + ji]
                alpha[i] = red[0]  # alpha now holds each row's softmax denominator
            for i, dd in T.grid(bq, d):
                out[b, q0 + i, dd] = T.Cast(
                    dtype,
                    T.Select(alpha[i] > T.float32(0), acc[i * d + dd] / alpha[i], T.float32(0)),
                )

    return fused_attention
