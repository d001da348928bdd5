"""Lower SANA's ReLU linear attention to one O(N d^2) kernel (CPU targets)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from edgediff.kernels.linear_attention import (
    choose_linear_attention_tiles,
    linear_attention_kernel,
)
from edgediff.passes.fuse_attention import FUSABLE_DTYPES
from edgediff.passes.registry import register_pass
from edgediff.passes.relax_utils import dtype_of, scalar_value, static_shape
from edgediff.passes.report import PassReport, optional
from edgediff.targets import CostModel

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class LinearAttentionSite:
    """One SANA ReLU linear attention lowered to the kernel: its sizes (see ``_check_sana``) and tiles."""

    batch: int
    heads: int
    n: int  # queries
    m: int  # keys
    head_dim: int
    value_dim: int
    dtype: str
    eps: float  # the normaliser's epsilon
    tiles: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclass
class FuseLinearAttentionReport(PassReport):
    """The lowered sites; a skipped run (not a CPU target) has only its summary."""

    sites: list[LinearAttentionSite] | None = optional()


class LinearAttentionEmitter:
    """Adds one linear attention kernel per distinct shape to a module and calls it.

    Shared by ``fuse-linear-attention`` (SANA's native ReLU attention) and ``rewrite-linear-attention``
    (softmax attention replaced by a feature map): both reduce to ``phi(q)``, ``phi(k)``, ``v`` in the
    kernel's (batch, tokens, features) layout.
    """

    def __init__(self, mod: tvm.IRModule, cost: CostModel) -> None:
        self.cost = cost
        # the builder adds each kernel to (a copy of) the module and gives its GlobalVar the PrimFunc's type
        self.builder = relax.BlockBuilder(mod.clone())
        self.kernels: dict[tuple, tuple[tvm.ir.GlobalVar, Any]] = {}

    def call(
        self,
        q: Any,
        k: Any,
        v: Any,
        sizes: tuple[int, int, int, int, int],
        dtype: str,
        eps: float,
        taylor2: tuple[int, float, float, float] | None = None,
    ) -> tuple[Any, dict[str, int]]:
        """``call_tir`` of the kernel on ``q`` (batch, n, f), ``k`` (batch, m, f), ``v`` (batch, m, dv), with
        ``sizes`` = (batch, n, m, f, dv); with ``taylor2`` (see :func:`linear_attention_kernel`) q and k are
        (batch, tokens, d) and the kernel makes the f features. Returns the call and the kernel's tiles."""
        bh, n, m, f, dv = sizes
        key = (bh, n, m, f, dv, dtype, eps, taylor2)
        if key not in self.kernels:
            tiles = choose_linear_attention_tiles(self.cost, dtype, bh, n, m, f, dv)
            kernel = linear_attention_kernel(
                self.cost, batch=bh, n=n, m=m, f=f, dv=dv, dtype=dtype, eps=eps, taylor2=taylor2, tiles=tiles
            )
            gvar = self.builder.add_func(kernel, f"linear_attention_{bh}x{n}x{m}x{f}x{dv}")
            self.kernels[key] = (gvar, tiles)
        gvar, tiles = self.kernels[key]
        return relax.call_tir(gvar, [q, k, v], relax.TensorType((bh, n, dv), dtype)), dict(tiles.__dict__)

    def finish(self, mod: tvm.IRModule, updates: dict[Any, Any]) -> tvm.IRModule:
        """The module with the kernels added and ``updates`` (rewritten functions) applied."""
        if not self.kernels:
            return mod
        out = self.builder.get()
        for gvar, func in updates.items():
            out[gvar] = func
        return relax.transform.DeadCodeElimination()(out)


def _view(p: Any) -> Any:
    """``p`` under the optional astype / broadcast_to / reshape that torch.export puts around matmul operands
    (a 3-D matmul result back to 4-D, broadcast to itself, flattened to 3-D for the next matmul)."""
    p = is_op("relax.astype")(p) | p
    p = is_op("relax.reshape")(p, wildcard()) | p
    p = is_op("relax.broadcast_to")(p, wildcard()) | p
    p = is_op("relax.reshape")(p, wildcard()) | p
    return is_op("relax.astype")(p) | p


def _sana_pattern() -> tuple[Any, dict[str, Any], Any]:
    """diffusers' ``SanaLinearAttnProcessor2_0`` as torch.export + the Relax importer emit it.

    ``q`` (B, H, d, N) and ``k`` (B, H, M, d) go through ReLU; ``v`` (B, H, dv, M) is padded with a row of
    ones (the normaliser); ``s = v_pad @ relu(k)`` is (BH, dv + 1, d), ``o = s @ relu(q)`` is
    (BH, dv + 1, N); the output is ``o[:, :, :-1] / (o[:, :, -1:] + eps)`` in (B, H, dv, N).
    """
    q, k, v = wildcard(), wildcard(), wildcard()
    qr, kr = is_op("relax.nn.relu")(q), is_op("relax.nn.relu")(k)
    padded = is_op("relax.nn.pad")(v)
    s = is_op("relax.matmul")(_view(padded), _view(kr))
    o = _view(is_op("relax.matmul")(_view(s), _view(qr)))
    num = is_op("relax.strided_slice")(o, varg_default_wildcard=True)
    eps = is_const()
    den_row = is_op("relax.strided_slice")(o, varg_default_wildcard=True)
    den = is_op("relax.add")(den_row, eps)
    out = is_op("relax.divide")(num, den)
    return (
        out,
        {"q": q, "k": k, "v": v, "qr": qr, "kr": kr, "padded": padded, "num": num, "den_row": den_row},
        eps,
    )


def _ints(expr: Any) -> list[int] | None:
    """The integers of a constant tuple (strided_slice's axes, begin, end, strides: IntImm or PrimValue)."""
    fields = getattr(expr, "fields", None)
    if fields is None:
        return None
    values = []
    for field in fields:
        value = getattr(field, "value", None)
        value = getattr(value, "value", value)  # a PrimValue wraps an IntImm
        if not isinstance(value, int):
            return None
        values.append(value)
    return values


def _slice(call: Any) -> tuple[int, int, int] | None:
    """(axis, begin, end) of a one-axis, unit-stride strided_slice with constant bounds."""
    if len(call.args) < 4:
        return None
    axes, begin, end = (_ints(a) for a in call.args[1:4])
    strides = _ints(call.args[4]) if len(call.args) > 4 else [1]
    if axes is None or begin is None or end is None or strides is None or len(axes) != 1:
        return None
    if any(s != 1 for s in strides):
        return None
    return axes[0], begin[0], end[0]


@register_pass("fuse-linear-attention")
@tvm.transform.module_pass(opt_level=0, name="edgediff.FuseLinearAttention")
class FuseLinearAttention:
    """Lower ReLU linear attention (SANA) to one kernel computing ``K^T V`` first, then ``Q (K^T V)``.

    SANA's processor already orders the products linearly, but as Relax ops it pads ``v``, runs two batched
    matmuls, slices the normaliser row out and divides: five kernels and the (BH, dv + 1, N) intermediate
    in DRAM. The kernel (``kernels/linear_attention.py``) keeps ``K^T V`` and the normaliser in
    a float32 scratch and writes only the output; the normaliser is accumulated in float32 even in
    float16 builds (SANA's processor upcasts for the same reason). Exact up to summation order.
    CPU targets only, like ``fuse-attention``.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = FuseLinearAttentionReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        if self.spec.kind != "cpu":
            self.report = FuseLinearAttentionReport(
                f"skipped: the kernel is scheduled for CPUs, not {self.spec.kind}"
            )
            return mod
        pattern, parts, eps_pattern = _sana_pattern()
        emitter = LinearAttentionEmitter(mod, CostModel(self.spec))
        sites: list[dict[str, Any]] = []

        def rewrite(orig: Any, matched: dict[Any, Any]) -> Any:
            site = _check_sana(orig, matched, parts, eps_pattern)
            if site is None:
                return orig
            b, h, d, n, m, dv = (site[k] for k in ("batch", "heads", "head_dim", "n", "m", "value_dim"))
            bh = b * h
            rq, rk, v = (matched[parts[name]] for name in ("qr", "kr", "v"))
            # to the kernel's (batch*heads, tokens, features) layout: q and v are channel-first in SANA
            phi_q = relax.op.permute_dims(relax.op.reshape(rq, (bh, d, n)), [0, 2, 1])
            phi_k = relax.op.reshape(rk, (bh, m, d))
            vv = relax.op.permute_dims(relax.op.reshape(v, (bh, dv, m)), [0, 2, 1])
            call, site["tiles"] = emitter.call(
                phi_q, phi_k, vv, (bh, n, m, d, dv), site["dtype"], site["eps"]
            )
            sites.append(site)
            return relax.op.reshape(relax.op.permute_dims(call, [0, 2, 1]), (b, h, dv, n))

        updates = {
            gvar: rewrite_call(pattern, rewrite, func)
            for gvar, func in mod.functions_items()
            if isinstance(func, relax.Function)
        }
        mod = emitter.finish(mod, updates)
        self.report = FuseLinearAttentionReport(
            summary=f"{len(sites)} ReLU linear attention sites lowered to {len(emitter.kernels)} kernels",
            sites=[LinearAttentionSite(**site) for site in sites],
        )
        return mod


def _check_sana(orig: Any, matched: dict[Any, Any], parts: dict[str, Any], eps_pattern: Any) -> dict | None:
    """The site's sizes when the match is SANA's linear attention exactly, else None."""
    q, k, v, padded = (matched[parts[name]] for name in ("q", "k", "v", "padded"))
    shapes = [static_shape(x) for x in (q, k, v, orig)]
    if any(s is None or len(s) != 4 for s in shapes):
        return None
    (b, h, d, n), (b_k, h_k, m, d_k), (b_v, h_v, dv, m_v), out_shape = shapes
    if (b_k, h_k, d_k) != (b, h, d) or (b_v, h_v, m_v) != (b, h, m) or out_shape != (b, h, dv, n):
        return None
    dtype = dtype_of(v)
    if dtype not in FUSABLE_DTYPES or dtype_of(orig) != dtype:
        return None
    # v padded by one row of ones at the end of the value-channel axis, nothing else
    pad_width = [int(x) for x in padded.attrs.pad_width]
    if pad_width != [0, 0, 0, 0, 0, 1, 0, 0] or float(padded.attrs.pad_value) != 1.0:
        return None
    if str(padded.attrs.pad_mode) != "constant":
        return None
    # numerator = rows [0, dv), denominator = row dv, of the (B, H, dv + 1, N) product
    num = _slice(matched[parts["num"]])
    den = _slice(matched[parts["den_row"]])
    if num is None or den is None or num[0] % 4 != 2 or den[0] % 4 != 2:
        return None
    if num[1] != 0 or num[2] not in (-1, dv) or den[1] not in (-1, dv) or den[2] < dv + 1:
        return None
    eps = scalar_value(matched[eps_pattern])
    if eps is None:
        return None
    return {
        "batch": b,
        "heads": h,
        "n": n,
        "m": m,
        "head_dim": d,
        "value_dim": dv,
        "dtype": dtype,
        "eps": eps,
    }
