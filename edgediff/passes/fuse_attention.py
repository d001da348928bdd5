"""Replace softmax(q k^T) v subgraphs by one flash-style fused attention kernel (CPU targets)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from edgediff.kernels.attention import choose_attention_tiles, fused_attention_kernel
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import dtype_of, scalar_value, static_shape
from edgediff.passes.report import PassReport, optional
from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

FUSABLE_DTYPES = ("float32", "float16")


@dataclass
class FusedAttentionSite:
    """One fused ``softmax(q k^T * scale) v``: its shapes (see :func:`attention_site`) and kernel tiles."""

    batch_heads: int
    n: int  # queries
    m: int  # keys
    head_dim: int
    dtype: str
    scale: float
    safe_softmax: bool
    score_bytes: int  # the heads x N x M score matrix unfused
    tiles: dict[str, int] = field(default_factory=dict)
    # the scores are still used elsewhere (need_weights=True): the site is fused but avoids nothing
    scores_still_materialised: bool = False


@dataclass
class FuseAttentionReport(PassReport):
    """The fused sites; a skipped run (not a CPU target) has only its summary."""

    sites: list[FusedAttentionSite] | None = optional()
    score_bytes_avoided: int | None = optional()
    exp: str | None = optional()  # the kernel's exp: "fast" or "exact"


def attention_pattern() -> tuple[Any, dict[str, Any]]:
    """The dataflow pattern of attention as torch.export + run_decompositions + the Relax importer emit it.

    ``matmul(q, kt)`` (q and k already scaled), optionally times a constant scale, reshaped to
    ``(batch, heads, N, M)``, ``softmax(axis=-1)``, optionally PyTorch's "safe softmax" (``where`` a row
    has no finite score, zeros), broadcast/reshaped back to ``(batch*heads, N, M)``, ``matmul`` with v.
    """
    q, kt, v = wildcard(), wildcard(), wildcard()
    scores = is_op("relax.matmul")(q, kt)
    scale = is_const()
    scaled = is_op("relax.multiply")(scores, scale) | scores
    shaped = is_op("relax.reshape")(scaled, wildcard()) | scaled
    probs = is_op("relax.nn.softmax")(shaped)
    # safe softmax: rows where every score == -inf get 0 instead of NaN
    neg_inf = is_const()
    finite = is_op("relax.logical_not")(is_op("relax.equal")(shaped, neg_inf))
    row_any = is_op("relax.max")(is_op("relax.astype")(finite))
    any_finite = is_op("relax.astype")(row_any)
    zero = is_const()
    safe = is_op("relax.where")(
        is_op("relax.logical_not")(any_finite), is_op("relax.full_like")(probs, zero), probs
    )
    kept = safe | probs
    spread = is_op("relax.broadcast_to")(kept, wildcard()) | kept
    flat = is_op("relax.reshape")(spread, wildcard()) | spread
    out = is_op("relax.matmul")(flat, v)
    parts = {"q": q, "kt": kt, "v": v, "scores": scores, "scale": scale, "scaled": scaled}
    parts |= {"probs": probs, "neg_inf": neg_inf, "zero": zero, "safe": safe, "row_any": row_any}
    return out, parts


def _score_shaped_vars(mod: tvm.IRModule, shapes: set[tuple[int, int]]) -> set[tuple[int, int]]:
    """Which of the (N, M) ``shapes`` some Relax variable's last two dimensions still have."""
    found: set[tuple[int, int]] = set()

    def visit(expr: Any) -> None:
        if isinstance(expr, relax.Var):
            dims = static_shape(expr)
            if dims is not None and len(dims) >= 2 and dims[-2:] in shapes:
                found.add(dims[-2:])

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 2**10:.1f} KiB"


@register_pass("fuse-attention")
@tvm.transform.module_pass(opt_level=0, name="edgediff.FuseAttention")
class FuseAttention:
    """Fuse each ``softmax(q k^T * scale) v`` into one flash-style kernel that never writes the N x M scores.

    Unfused, every attention writes its ``heads x N x M`` score matrix to DRAM three times (scores,
    softmax, the safe-softmax ``where``) and reads it back as often: 512 MB per SD1.5 self attention at a
    64x64 latent (N = M = 4096), far beyond any cache, so the UNet's attention is bound by DRAM traffic
    and its peak memory by the scores. The fused kernel (``kernels/attention.py``) streams key
    blocks through L1 with an online softmax, tiles sized by the target's cost model.

    Semantics kept: the safe-softmax ``where`` (a row whose scores are all -inf gives zeros) is what the
    kernel computes, so it is dropped only together with the softmax it guards. A plain softmax is fused
    too; it differs only on such all -inf rows (NaN unfused, zeros fused), which cannot occur here: the
    pattern admits no mask between the score matmul and the softmax, so scores are finite for finite q, k.
    CPU targets only: the kernel is emitted with a CPU schedule (parallel loops, no thread bindings).
    """

    def __init__(self, spec: TargetSpec, exp: str = "fast") -> None:
        self.spec = spec
        self.exp = exp
        self.report = FuseAttentionReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.spec.kind != "cpu":
            self.report = FuseAttentionReport(
                f"skipped: the fused kernel is scheduled for CPUs, not {self.spec.kind}"
            )
            return mod
        cost = CostModel(self.spec)
        pattern, parts = attention_pattern()
        sites: list[dict[str, Any]] = []
        kernels: dict[tuple, tuple[tvm.ir.GlobalVar, Any]] = {}  # site shape -> (kernel, its tiles)
        # the builder adds each kernel to (a copy of) the module and gives its GlobalVar the PrimFunc's type,
        # which call_tir checks
        builder = relax.BlockBuilder(mod.clone())

        def rewrite(orig: Any, matched: dict[Any, Any]) -> Any:
            site = attention_site(orig, matched, parts)
            if site is None:
                return orig
            bh, n, m, d, dtype = (site[k] for k in ("batch_heads", "n", "m", "head_dim", "dtype"))
            key = (bh, n, m, d, dtype, site["scale"])
            if key not in kernels:
                tiles = choose_attention_tiles(cost, dtype, n, m, d)
                kernel = fused_attention_kernel(
                    cost, batch=bh, n=n, m=m, d=d, dtype=dtype, scale=site["scale"], exp=self.exp, tiles=tiles
                )
                kernels[key] = (builder.add_func(kernel, f"fused_attention_{bh}x{n}x{m}x{d}"), tiles)
            gvar, tiles = kernels[key]
            site["tiles"] = dict(tiles.__dict__)
            sites.append(site)
            q, kt, v = (matched[parts[name]] for name in ("q", "kt", "v"))
            # the kernel reads K blocks as rows (keys, dim): K^T back to K, a transpose of M x D elements
            args = [q, relax.op.permute_dims(kt, [0, 2, 1]), v]
            return relax.call_tir(gvar, args, relax.TensorType((bh, n, d), dtype))

        updates = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                updates[gvar] = rewrite_call(pattern, rewrite, func)
        if sites:
            mod = builder.get()
            for gvar, func in updates.items():
                mod[gvar] = func
            mod = relax.transform.DeadCodeElimination()(mod)
        # scores someone else still uses (e.g. MultiheadAttention's need_weights=True) stay in the graph:
        # such a site is still fused, but it avoids nothing, and the report must not claim otherwise
        left = _score_shaped_vars(mod, {(s["n"], s["m"]) for s in sites})
        fused = [
            FusedAttentionSite(**site, scores_still_materialised=(site["n"], site["m"]) in left)
            for site in sites
        ]
        avoided = sum(site.score_bytes for site in fused if not site.scores_still_materialised)
        self.report = FuseAttentionReport(
            summary=(
                f"{len(fused)} attention sites fused into {len(kernels)} kernels; "
                f"{_mib(avoided)} of score matrices no longer materialised"
            ),
            sites=fused,
            score_bytes_avoided=avoided,
            exp=self.exp,
        )
        return mod


def attention_site(orig: Any, matched: dict[Any, Any], parts: dict[str, Any]) -> dict[str, Any] | None:
    """The site's shapes when the match is one this kernel computes exactly, else None."""
    q, kt, v = (matched[parts[name]] for name in ("q", "kt", "v"))
    shapes = [static_shape(x) for x in (q, kt, v, orig)]
    if any(s is None or len(s) != 3 for s in shapes):
        return None
    (bh, n, d), (bh_k, d_k, m), (bh_v, m_v, d_v), out_shape = shapes
    if bh_k != bh or bh_v != bh or d_k != d or m_v != m or d_v != d or out_shape != (bh, n, d):
        return None
    dtype = dtype_of(q)
    if dtype not in FUSABLE_DTYPES or any(dtype_of(x) != dtype for x in (kt, v, orig)):
        return None
    probs = matched[parts["probs"]]
    scores_shape = static_shape(probs)
    if scores_shape is None or scores_shape[-2:] != (n, m) or math.prod(scores_shape) != bh * n * m:
        return None
    if int(probs.attrs.axis) not in (-1, len(scores_shape) - 1):
        return None
    scale = 1.0
    if parts["scale"] in matched and not matched[parts["scaled"]].same_as(matched[parts["scores"]]):
        scale = scalar_value(matched[parts["scale"]])
        if scale is None:
            return None
    if parts["safe"] in matched:
        neg_inf, zero = (scalar_value(matched[parts[name]]) for name in ("neg_inf", "zero"))
        if neg_inf != -math.inf or zero != 0.0:
            return None
        # the "any finite score" reduction must run along the softmax rows, not some other axis
        row_any = matched[parts["row_any"]]
        axes = [int(a) % len(scores_shape) for a in (row_any.attrs.axis or [])]
        if axes != [len(scores_shape) - 1] or not row_any.attrs.keepdims:
            return None
    return {
        "batch_heads": bh,
        "n": n,
        "m": m,
        "head_dim": d,
        "dtype": dtype,
        "scale": scale,
        "safe_softmax": parts["safe"] in matched,
        "score_bytes": bh * n * m * DTYPE_BITS[dtype] // 8,
    }
