"""Opt-in: replace softmax attention layers by linear attention where it is accurate enough and pays."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import rewrite_call

from edgediff.errors import PassError
from edgediff.linear_attention import (
    FEATURE_EPS,
    LinearAttentionConfig,
    favor_projection,
    feature_dim,
)
from edgediff.passes.fuse_attention import attention_pattern, attention_site
from edgediff.passes.fuse_linear_attention import LinearAttentionEmitter
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import scalar_value
from edgediff.passes.report import PassReport, optional
from edgediff.targets import CostModel
from edgediff.targets.schema import DTYPE_BITS

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

# FLOPs of one fast exp (backend/fast_math.py: range reduction, a degree-6 polynomial, the exponent bits
# and two range selects) in the cost model's units
EXP_FLOPS = 16


def padded_features(name: str, d: int, features: int, lanes: int) -> int:
    """Features the kernel sees: taylor2's count rounded up to whole vectors (zero features add nothing),
    so phase 1 vectorizes along them (its 1 + d + d(d+1)/2 is odd for any d = 4k)."""
    f = feature_dim(name, d, features)
    return -(-f // lanes) * lanes if name == "taylor2" else f


def softmax_seconds(cost: CostModel, dtype: str, bh: int, n: int, m: int, d: int, dv: int) -> float:
    """Roofline time of the fused softmax attention kernel (``fuse-attention``): q k^T, exp, p v."""
    itemsize = DTYPE_BITS[dtype] // 8
    flops = bh * n * m * (2 * d + 2 * dv + EXP_FLOPS + 3)
    return cost.estimate_seconds(flops, bh * (n * d + m * d + m * dv + n * dv) * itemsize, "float32")


def linear_seconds(
    cost: CostModel, dtype: str, config: LinearAttentionConfig, bh: int, n: int, m: int, d: int, dv: int
) -> float:
    """Roofline time of the rewrite: the feature maps, then the kernel's ``phi(k)^T [v, 1]`` and
    ``phi(q) kv`` products (its output row padded to whole vectors)."""
    itemsize = DTYPE_BITS[dtype] // 8
    lanes = cost.vector_lanes("float32")
    f = padded_features(config.feature_map, d, config.features, lanes)
    per_row = {
        "relu": f,
        "elu+1": f * (EXP_FLOPS + 3),
        "taylor2": 3 * f,
        "favor+": 2 * d * f + f * (EXP_FLOPS + 3) + 2 * d,
    }[config.feature_map]
    dvp = -(-(dv + 1) // lanes) * lanes
    flops = bh * ((n + m) * per_row + 2 * m * f * (dv + 1) + 2 * n * f * dvp)
    # features through DRAM: the Relax maps write both and the kernel reads them; taylor2's kernel builds
    # them itself and only stores the keys' (float32) in its scratch for the feature blocks to read
    features = 2 * m * f * 4 if config.feature_map == "taylor2" else 2 * (n + m) * f * itemsize
    traffic = bh * ((n * d + m * d + m * dv + n * dv) * itemsize + features)
    return cost.estimate_seconds(flops, traffic, "float32")


def break_even_tokens(
    cost: CostModel, dtype: str, config: LinearAttentionConfig, kind: str, bh: int, m: int, d: int, dv: int
) -> int | None:
    """The smallest power-of-two query count from which the rewrite pays by the cost model (self attention:
    as many keys as queries; cross attention: this layer's keys); None when it never does up to 2^20."""
    for p in range(4, 21):
        tokens = 1 << p
        keys = tokens if kind == "self" else m
        if linear_seconds(cost, dtype, config, bh, tokens, keys, d, dv) < softmax_seconds(
            cost, dtype, bh, tokens, keys, d, dv
        ):
            return tokens
    return None


def _undo_prescale(x: Any, bindings: dict[Any, Any], dtype: str) -> Any:
    scale = _prescale(x, bindings)
    return x if scale == 1.0 else relax.op.multiply(x, relax.const(np.asarray(1.0 / scale, dtype), dtype))


def _feature_map(config: LinearAttentionConfig, x: Any, d: int, scale: float, dtype: str, query: bool) -> Any:
    """``phi(x)`` for x (batch, tokens, d) as Relax ops (the numpy reference is
    :func:`edgediff.linear_attention.feature_map`); taylor2's are computed inside the kernel instead."""
    op = relax.op
    name = config.feature_map

    def const(value: Any, dt: str = dtype) -> Any:
        return relax.const(np.asarray(value).astype(dt), dt)

    if name == "relu":
        return op.nn.relu(x)
    if name == "elu+1":
        return op.add(op.maximum(x, const(0.0)), op.exp(op.minimum(x, const(0.0))))
    xs = op.multiply(x, const(math.sqrt(scale))) if scale != 1.0 else x
    # favor+: exp(w^T x - |x|^2 / 2 - stabiliser); the stabiliser (per query row; per head for keys) and
    # 1/sqrt(m) are constant along each normalised sum, so they cancel, and keep exp below overflow
    w = favor_projection(d, config.features, config.seed)
    logits = op.subtract(
        op.matmul(xs, const(w)), op.multiply(op.sum(op.multiply(xs, xs), axis=-1, keepdims=True), const(0.5))
    )
    stab = op.max(logits, axis=[-1] if query else [1, 2], keepdims=True)
    return op.exp(op.subtract(logits, stab))


def _prescale(x: Any, bindings: dict[Any, Any]) -> float:
    """The positive scalar constant ``x`` was multiplied by, looking through the views (reshape,
    broadcast_to, permute_dims) between; 1.0 when there is none. torch's SDPA decomposition multiplies q and
    k by sqrt(scale) each before the score matmul."""
    views = ("relax.reshape", "relax.broadcast_to", "relax.permute_dims")

    def value_of(e: Any) -> Any:  # the pattern gives matched operands as expressions or bound variables
        return e if isinstance(e, relax.Call) else bindings.get(e)

    value = value_of(x)
    while isinstance(value, relax.Call) and getattr(value.op, "name", "") in views:
        value = value_of(value.args[0])
    if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != "relax.multiply":
        return 1.0
    for factor in value.args:
        scale = scalar_value(factor) if isinstance(factor, tvm.ir.expr.Constant) else None
        if scale is not None:
            return scale if scale > 0 else 1.0
    return 1.0


@dataclass
class LinearAttentionLayer:
    """One softmax attention site: the calibration's error, both cost estimates and the decision."""

    name: str
    kind: str  # "self" or "cross"
    batch_heads: int
    n: int  # queries
    m: int  # keys
    head_dim: int
    dtype: str
    scale: float
    error: float | None  # relative output error on calibration inputs (None: fine-tuned, not measured)
    softmax_ms: float
    linear_ms: float
    saving_ms: float
    break_even_tokens: int | None  # the smallest token count where the linear form pays (None: none found)
    rewritten: bool
    reason: str
    tiles: dict[str, int] | None = optional()  # the linear kernel's tiles, when rewritten


@dataclass
class RewriteLinearAttentionReport(PassReport):
    """Per attention layer, the decision; a skipped run (not a CPU target) has only its summary."""

    config: LinearAttentionConfig | None = optional()
    layers: list[LinearAttentionLayer] | None = optional()


@register_pass("rewrite-linear-attention")
@tvm.transform.module_pass(opt_level=0, name="edgediff.RewriteLinearAttention")
class RewriteLinearAttention:
    """Replace chosen softmax attention layers by linear attention with a feature map (opt-in).

    Off unless ``compile_model(linear_attention=...)`` (CLI ``--linear-attention``) asks for it, because it
    changes the model's numerics. A layer is rewritten when (1) its relative output error, measured on
    calibration inputs against exact softmax (``edgediff.linear_attention.calibrate_attention``), is under
    the bound for its kind (self or cross attention have separate bounds), and (2) the cost model expects
    the linear form (feature maps + the ``fuse-linear-attention`` kernel) to be faster than the fused
    softmax kernel at its token count. With ``fine_tuned`` (weights trained with the feature map) every
    layer is rewritten unmeasured: the linear form is then the model. Sites of the graph are paired with
    the calibration's attention calls in program order, checked by shape. The report lists, per layer, N,
    M, the error, both estimates, the saving and the break-even token count. CPU targets only.
    """

    def __init__(
        self,
        spec: TargetSpec,
        config: LinearAttentionConfig | None = None,
        calibration: list[dict[str, Any]] | None = None,
    ) -> None:
        self.spec = spec
        self.config = config
        self.calibration = calibration
        self.report = RewriteLinearAttentionReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        config = self.config
        if config is None:
            raise PassError("rewrite-linear-attention needs compile_model(linear_attention=...) options")
        if self.spec.kind != "cpu":
            self.report = RewriteLinearAttentionReport(
                f"skipped: the kernel is scheduled for CPUs, not {self.spec.kind}"
            )
            return mod
        if self.calibration is None and not config.fine_tuned:
            raise PassError("rewrite-linear-attention needs calibration records (or fine_tuned=True)")
        cost = CostModel(self.spec)
        lanes = cost.vector_lanes("float32")
        pattern, parts = attention_pattern()

        # first walk: the sites in program order, nothing changed
        found: list[dict[str, Any]] = []
        order: dict[tuple, int] = {}

        def key(matched: dict[Any, Any]) -> tuple:
            # rewrite_call revisits a function until nothing changes: sites are known by their operands
            return tuple(matched[parts[n]] for n in ("q", "kt", "v"))

        def collect(orig: Any, matched: dict[Any, Any]) -> Any:
            site = attention_site(orig, matched, parts)
            if site is not None and key(matched) not in order:
                order[key(matched)] = len(found)
                found.append(site)
            return orig

        functions = [(g, f) for g, f in mod.functions_items() if isinstance(f, relax.Function)]
        bindings: dict[Any, Any] = {}
        for _, func in functions:
            rewrite_call(pattern, collect, func)
            bindings.update(relax.analysis.get_var2val(func))
        layers = self._choose(found, cost)

        emitter = LinearAttentionEmitter(mod, cost)

        def rewrite(orig: Any, matched: dict[Any, Any]) -> Any:
            if attention_site(orig, matched, parts) is None or key(matched) not in order:
                return orig
            layer = layers[order[key(matched)]]
            if not layer.rewritten:
                return orig
            bh, n, m, d, dtype = layer.batch_heads, layer.n, layer.m, layer.head_dim, layer.dtype
            q, kt, v = (matched[parts[name]] for name in ("q", "kt", "v"))
            if config.feature_map in ("relu", "elu+1"):
                # these maps see q and k as the model computes them, before the softmax scale that
                # torch's decomposition multiplies into both (relu would not mind, elu+1 would)
                q, kt = (_undo_prescale(x, bindings, dtype) for x in (q, kt))
            k = relax.op.permute_dims(kt, [0, 2, 1])
            f = padded_features(config.feature_map, d, config.features, lanes)
            taylor2 = None
            if config.feature_map == "taylor2":
                # sqrt(scale) per factor of x in a feature: exp(scale q.k) ~ 1 + s + s^2 / 2
                root = math.sqrt(layer.scale)
                taylor2 = (d, root, root * root * math.sqrt(0.5), root * root)
            else:
                q = _feature_map(config, q, d, layer.scale, dtype, query=True)
                k = _feature_map(config, k, d, layer.scale, dtype, query=False)
            eps = FEATURE_EPS[config.feature_map]
            call, layer.tiles = emitter.call(q, k, v, (bh, n, m, f, d), dtype, eps, taylor2)
            return call

        updates = {gvar: rewrite_call(pattern, rewrite, func) for gvar, func in functions}
        mod = emitter.finish(mod, updates)
        chosen = [layer for layer in layers if layer.rewritten]
        saving = sum(layer.saving_ms for layer in chosen)
        self.report = RewriteLinearAttentionReport(
            summary=(
                f"{len(chosen)} of {len(layers)} attention layers rewritten to {config.feature_map} linear "
                f"attention; estimated saving {saving:.2f} ms per call"
            ),
            config=config,
            layers=layers,
        )
        return mod

    def _choose(self, found: list[dict[str, Any]], cost: CostModel) -> list[LinearAttentionLayer]:
        """Per site: the calibration's error and kind, the cost estimates, and the decision."""
        config = self.config
        records = self.calibration
        if records is not None and len(records) != len(found):
            raise PassError(
                f"rewrite-linear-attention: calibration saw {len(records)} attention calls, the graph has "
                f"{len(found)} attention sites"
            )
        layers = []
        for i, site in enumerate(found):
            bh, n, m, d, dtype = (site[k] for k in ("batch_heads", "n", "m", "head_dim", "dtype"))
            record = records[i] if records is not None else None
            if record is not None and list(record["shape"]) != [bh, n, m, d]:
                raise PassError(
                    f"rewrite-linear-attention: attention call {i} ({record['name']}) has shape "
                    f"{record['shape']} in torch but {[bh, n, m, d]} in the graph"
                )
            kind = record["kind"] if record is not None else ("self" if n == m else "cross")
            softmax_s = softmax_seconds(cost, dtype, bh, n, m, d, d)
            linear_s = linear_seconds(cost, dtype, config, bh, n, m, d, d)
            error = record["error"] if record is not None else None
            break_even = break_even_tokens(cost, dtype, config, kind, bh, m, d, d)
            if config.fine_tuned:
                rewritten, reason = True, "fine-tuned weights: the linear form is the model"
            elif kind not in config.max_error:
                rewritten, reason = False, f"no error bound for {kind} attention"
            elif not error <= config.max_error[kind]:
                rewritten, reason = False, f"error {error:.3g} over the bound {config.max_error[kind]:g}"
            elif linear_s >= softmax_s:
                rewritten, reason = False, f"does not pay at N={n} (cost model: from N={break_even})"
            else:
                rewritten, reason = True, "under the error bound and faster"
            layer = LinearAttentionLayer(
                name=record["name"] if record is not None else f"attention{i}",
                kind=kind,
                batch_heads=bh,
                n=n,
                m=m,
                head_dim=d,
                dtype=dtype,
                scale=site["scale"],
                error=error,
                softmax_ms=softmax_s * 1e3,
                linear_ms=linear_s * 1e3,
                saving_ms=(softmax_s - linear_s) * 1e3,
                break_even_tokens=break_even,
                rewritten=rewritten,
                reason=reason,
            )
            layers.append(layer)
        return layers
