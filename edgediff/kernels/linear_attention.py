"""Linear attention for CPUs: ``out = phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k)_j + eps)`` in O(N F dv).

Softmax attention costs ``N x M x d`` per head; with a feature map ``phi`` (ReLU for SANA, elu+1, a Taylor
or random-feature approximation of ``exp``) the product is reassociated: ``kv = phi(k)^T [v, 1]`` is an
``F x (dv + 1)`` matrix (its last column is the normaliser ``sum_j phi(k)_j``), and each query's output is
one row-vector product ``phi(q)_i kv`` divided by that row's normaliser entry. Cost and memory grow
linearly in the token count.

The kernel takes the feature-mapped ``phi(q)`` (batch, N, F), ``phi(k)`` (batch, M, F) and ``v``
(batch, M, dv) (ReLU, elu+1 and random features are ordinary Relax ops, fused by ``fuse-ops``), or, for
taylor2, q and k themselves: its ``1 + d + d(d+1)/2`` features (861 for SD1.5's head dim 40) are built in
the kernel, as materialising them in Relax (a gather per feature, and two 113 MB tensors at N = 4096)
cost more than the products. It runs in parallel phases, emitted already scheduled
(``tirx.is_scheduled``):

0. taylor2 only: each key's features into a float32 scratch, from contiguous slices of its row.

1. per (batch, feature block): ``kv^T`` for the block's features, vectorized along the features, key
   blocks streamed through L1 and a (value columns x feature vectors) register tile accumulated over each;
   the normaliser is one more accumulated row. Written to a float32 scratch ``kv`` (batch, F, dvp) whose
   column ``dv`` is the normaliser and whose columns above it are zero (``dvp`` rounds ``dv + 1`` up to
   whole vectors).
2. per (batch, query block): a register tile of (queries x all dvp columns) accumulates ``phi(q) kv``
   (taylor2: the tile's query features built in L1 first); the output divides each query's columns by
   its normaliser column plus ``eps``.

Every sum (``kv``, the normaliser, ``phi(q) kv``) is float32 whatever the input dtype, as SANA's processor
computes in float32 even in fp16 pipelines: a float16 normaliser over 4096 tokens loses digits and
overflows at 65504. Tile sizes come from the target's cost model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgediff.schedules.common import divisor_block, largest_divisor, vector_width
from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS


@dataclass(frozen=True)
class LinearAttentionTiles:
    """Tile sizes of one linear attention kernel (what the cost model chose; reported per site)."""

    feature_block: int  # features per phase-1 task
    key_block: int  # keys per phase-1 step (the block's phi(k) and v stay in L1)
    feature_width: int  # vector lanes along the features (phase 1)
    feature_vectors: int  # feature vectors of the phase-1 register tile
    column_rows: int  # value columns of the phase-1 register tile
    query_block: int  # queries per phase-2 task
    column_width: int  # vector lanes along the value columns (phase 2)
    padded_columns: int  # dv + 1 (the normaliser) rounded up to whole vectors
    query_rows: int  # queries of the phase-2 register tile


def choose_linear_attention_tiles(
    cost: CostModel, dtype: str, batch: int, n: int, m: int, f: int, dv: int
) -> LinearAttentionTiles:
    """Tile sizes for ``batch`` heads of ``n`` queries, ``m`` keys, ``f`` features, ``dv`` value columns.

    Phase 1's register tile uses the accumulator half of the register file (two feature vectors by as many
    value columns as remain); its key block keeps ``phi(k)`` and ``v`` rows of the block in half of L1.
    Feature blocks give at least as many tasks as cores over the batch when the features allow it.
    Phase 2 holds a query's whole ``dvp``-wide output row in registers, as many queries as fit.
    """
    itemsize = DTYPE_BITS[dtype] // 8
    lanes = cost.vector_lanes("float32")
    acc = cost.accumulator_vectors()
    fw = vector_width(f, lanes)
    fv = largest_divisor(f // fw, 2)
    rows = largest_divisor(dv, max(1, acc // fv))
    # enough tasks to spread over the cores (twice their number, for balance) but no smaller than a tile
    tasks = 2 * max(1, cost.spec.compute.cores)
    # a feature block small enough that a useful block of keys (64) fits in L1 with it
    fit = cost.cache_block(64 * 4, "l1", 0.5)
    fb = divisor_block(f, max(fv * fw, min(f * batch // tasks, fit)), fv * fw)
    # the block's float32 features and its v rows
    kb = divisor_block(m, cost.cache_block(fb * 4 + dv * itemsize, "l1", 0.5), 1)
    cw = lanes
    dvp = -(-(dv + 1) // cw) * cw
    qr = max(1, acc // (dvp // cw))
    qb = divisor_block(n, max(qr, n * batch // tasks), 1)
    return LinearAttentionTiles(fb, kb, fw, fv, rows, qb, cw, dvp, largest_divisor(qb, qr))


def linear_attention_kernel(
    cost: CostModel,
    *,
    batch: int,
    n: int,
    m: int,
    f: int,
    dv: int,
    dtype: str,
    eps: float = 0.0,
    taylor2: tuple[int, float, float, float] | None = None,
    tiles: LinearAttentionTiles | None = None,
) -> Any:
    """The scheduled PrimFunc ``out[b] = (phi(q[b]) phi(k[b])^T v[b]) / (phi(q[b]) phi(k[b])^T 1 + eps)``.

    ``v`` is (batch, m, dv) and ``out`` (batch, n, dv). Without ``taylor2``, ``q`` (batch, n, f) and ``k``
    (batch, m, f) are the features already (ReLU, elu+1 and random features are ordinary Relax ops).
    With ``taylor2 = (d, c_lin, c_diag, c_off)``, ``q`` and ``k`` are (batch, tokens, d) and the kernel
    computes taylor2's features itself, in :func:`edgediff.linear_attention.taylor2_terms`' order:
    ``1``, ``c_lin x``, then per row ``a`` of the upper triangle ``c_diag x_a^2, c_off x_a x_b (b > a)``,
    zeros up to ``f``; each query tile's into L1, the keys' once into a float32 scratch (a key's
    features are read by every feature block, so they are not recomputed per block). Built from contiguous
    row slices, these loops vectorize; a gather per feature would cost more than the products.
    """
    from tvm import tirx
    from tvm.script import tirx as T

    t = tiles or choose_linear_attention_tiles(cost, dtype, batch, n, m, f, dv)
    fb, kb, fw, fv, rc = t.feature_block, t.key_block, t.feature_width, t.feature_vectors, t.column_rows
    qb, cw, dvp, qr = t.query_block, t.column_width, t.padded_columns, t.query_rows
    f32 = "float32"
    tasks1, fblocks, steps = batch * (f // fb), f // fb, m // kb
    tasks2, qblocks, ncv = batch * (n // qb), n // qb, dvp // cw
    eps_c = tirx.const(eps, f32)
    quad = taylor2 is not None
    d, c_lin, c_diag, c_off = taylor2 if quad else (f, 1.0, 1.0, 1.0)
    full = 1 + d + d * (d + 1) // 2  # taylor2's own features (f rounds it up to whole vectors)
    k_rows = batch * m if quad else 1  # the keys' feature scratch (none without taylor2)
    chunks = largest_divisor(m, 2 * max(1, cost.spec.compute.cores))  # phase-0 tasks per batch entry

    def load(x: Any) -> Any:
        return x if dtype == f32 else T.Cast(f32, x)

    def row_base(a: Any) -> Any:
        """Where row ``a`` of the upper triangle (``d - a`` features) starts."""
        return 1 + d + a * d - a * (a - 1) // 2

    @T.prim_func(private=True, check_well_formed=False)
    def linear_attention(
        q: T.Buffer((batch, n, d), dtype),
        k: T.Buffer((batch, m, d), dtype),
        v: T.Buffer((batch, m, dv), dtype),
        out: T.Buffer((batch, n, dv), dtype),
    ):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True, "op_pattern": 8})
        kv = T.decl_buffer((batch * f * dvp,), f32, scope="global")
        phik = T.decl_buffer((k_rows * f,), f32, scope="global")
        if quad:
            # phase 0: the keys' taylor2 features, once
            for task in T.parallel(batch * chunks):
                x = T.decl_buffer((d,), f32, scope="local")
                for r in range(m // chunks):
                    row = task * (m // chunks) + r  # = b * m + key
                    for c in range(d):
                        x[c] = load(k[row // m, row % m, c])
                    phik[row * f] = T.float32(1)
                    for c in range(d):
                        phik[row * f + 1 + c] = T.float32(c_lin) * x[c]
                    for a in range(d):
                        for bb in range(d - a):
                            phik[row * f + row_base(a) + bb] = (
                                T.Select(bb == 0, T.float32(c_diag), T.float32(c_off)) * x[a] * x[a + bb]
                            )
                    for p in range(f - full):
                        phik[row * f + full + p] = T.float32(0)
        # phase 1: kv^T of one feature block (value columns x features), the normaliser as row dv
        for task in T.parallel(tasks1):
            acc = T.decl_buffer(((dv + 1) * fb,), f32, scope="global")
            reg = T.decl_buffer((rc * fv * fw,), f32, scope="local")
            b = task // fblocks
            f0 = task % fblocks * fb
            for c, g in T.grid(dv + 1, fb // fw):
                for x in T.vectorized(fw):
                    acc[(c * fb) + g * fw + x] = T.float32(0)
            for step in range(steps):
                k0 = step * kb
                for c0, g in T.grid(dv // rc, fb // (fv * fw)):
                    for cc in T.unroll(rc):
                        for u in T.unroll(fv):
                            for x in T.vectorized(fw):
                                reg[(cc * fv + u) * fw + x] = acc[(c0 * rc + cc) * fb + (g * fv + u) * fw + x]
                    for j in range(kb):
                        for cc in T.unroll(rc):
                            for u in T.unroll(fv):
                                for x in T.vectorized(fw):
                                    if quad:
                                        reg[(cc * fv + u) * fw + x] = (
                                            reg[(cc * fv + u) * fw + x]
                                            + load(v[b, k0 + j, c0 * rc + cc])
                                            * phik[(b * m + k0 + j) * f + f0 + (g * fv + u) * fw + x]
                                        )
                                    else:
                                        reg[(cc * fv + u) * fw + x] = reg[(cc * fv + u) * fw + x] + load(
                                            v[b, k0 + j, c0 * rc + cc]
                                        ) * load(k[b, k0 + j, f0 + (g * fv + u) * fw + x])
                    for cc in T.unroll(rc):
                        for u in T.unroll(fv):
                            for x in T.vectorized(fw):
                                acc[(c0 * rc + cc) * fb + (g * fv + u) * fw + x] = reg[(cc * fv + u) * fw + x]
                for j in range(kb):
                    for g in range(fb // fw):
                        for x in T.vectorized(fw):
                            if quad:
                                acc[dv * fb + g * fw + x] = (
                                    acc[dv * fb + g * fw + x] + phik[(b * m + k0 + j) * f + f0 + g * fw + x]
                                )
                            else:
                                acc[dv * fb + g * fw + x] = acc[dv * fb + g * fw + x] + load(
                                    k[b, k0 + j, f0 + g * fw + x]
                                )
            for ff, c in T.grid(fb, dvp):
                kv[(b * f + f0 + ff) * dvp + c] = T.Select(c <= dv, acc[T.min(c, dv) * fb + ff], T.float32(0))
        # phase 2: each query's features times kv, divided by its normaliser column
        for task in T.parallel(tasks2):
            phiq = T.decl_buffer((qr * f,), f32, scope="global")  # the query tile's features (taylor2)
            x = T.decl_buffer((d,), f32, scope="local")
            reg = T.decl_buffer((qr * dvp,), f32, scope="local")
            b = task // qblocks
            q0 = task % qblocks * qb
            for i0 in range(qb // qr):
                if quad:
                    for ii in range(qr):
                        for c in range(d):
                            x[c] = load(q[b, q0 + i0 * qr + ii, c])
                        phiq[ii * f] = T.float32(1)
                        for c in range(d):
                            phiq[ii * f + 1 + c] = T.float32(c_lin) * x[c]
                        for a in range(d):
                            for bb in range(d - a):
                                phiq[ii * f + row_base(a) + bb] = (
                                    T.Select(bb == 0, T.float32(c_diag), T.float32(c_off)) * x[a] * x[a + bb]
                                )
                        for p in range(f - full):
                            phiq[ii * f + full + p] = T.float32(0)
                for ii in T.unroll(qr):
                    for u in T.unroll(ncv):
                        for x in T.vectorized(cw):
                            reg[ii * dvp + u * cw + x] = T.float32(0)
                for ff in range(f):
                    for ii in T.unroll(qr):
                        for u in T.unroll(ncv):
                            for x in T.vectorized(cw):
                                if quad:
                                    reg[ii * dvp + u * cw + x] = (
                                        reg[ii * dvp + u * cw + x]
                                        + phiq[ii * f + ff] * kv[(b * f + ff) * dvp + u * cw + x]
                                    )
                                else:
                                    reg[ii * dvp + u * cw + x] = (
                                        reg[ii * dvp + u * cw + x]
                                        + load(q[b, q0 + i0 * qr + ii, ff])
                                        * kv[(b * f + ff) * dvp + u * cw + x]
                                    )
                for ii in T.unroll(qr):
                    for c in range(dv):
                        out[b, q0 + i0 * qr + ii, c] = T.Cast(
                            dtype, reg[ii * dvp + c] / (reg[ii * dvp + dv] + eps_c)
                        )

    return linear_attention
