"""The register-tiled GEMM shared by the int8 (``int8_matmul.py``) and bfloat16 (``bf16_matmul.py``) kernels.

Both kernels are one CPU dot-product instruction in a register tile: per 32-bit lane of an accumulator
vector, the instruction reduces ``step`` narrow values of A and of B (4 bytes for ``vpdpbusd`` / ``sdot``,
2 bfloat16 for ``vdpbf16ps``). What they share, and what this file builds once:

- the weight layout ``[N / P, K / step, P, step]``: column panels of ``P = col_vectors * lanes`` output
  columns, and inside a panel the ``step`` k-values of one column next to each other, exactly the
  ``[lanes, step]`` block the instruction multiplies, so that one register tile streams one contiguous
  panel (:func:`pack_panels` in numpy, :func:`emit_packed_weight` as Relax ops that
  ``lift-weight-transforms`` runs at compile time);
- the choice of the register tile (:func:`choose_register_tile`);
- the loop nest (:func:`register_tile_gemm`): a parallel loop over (panel, row block) tiles, the tile's
  ``rows x col_vectors`` accumulator vectors zeroed, a serial loop over the reduction in steps, the
  accumulator updates unrolled, then an epilogue per accumulator vector. The kernels give the instruction
  step and the epilogue as callbacks; the PrimFunc is written with TVM's TIR IRBuilder (what TVMScript's
  parser drives), since the kernels' signatures and buffer views differ;
- the Relax side of a Linear layer on such a kernel (:func:`emit_linear_gemm`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgediff.errors import PassError


@dataclass(frozen=True)
class RegisterTile:
    """Register tile: ``rows`` x ``col_vectors`` vectors of ``lanes`` 32-bit accumulators."""

    rows: int
    col_vectors: int
    lanes: int

    @property
    def panel(self) -> int:
        """Output columns per weight panel (= per register tile)."""
        return self.col_vectors * self.lanes


def choose_register_tile(lanes: int, rows: int, columns: int, registers: int, what: str) -> RegisterTile:
    """The register tile for an ``rows`` x ``columns`` output of ``lanes``-wide accumulator vectors.

    Accumulators take 3/4 of a 32-register file (the rest hold the broadcast A words and the weight
    vectors), half of a 16-register one; among the shapes that fit and divide the output, the one with the
    most accumulators wins (each loaded weight vector feeds the most rows, each broadcast the most vectors),
    then the squarest (fewest operand loads per accumulator), then more rows (measured on znver3,
    benchmarks/int8_matmul.py: 4 x 2 vectors ran 10-15% faster than 2 x 4). ``what`` names the kernel in
    errors.
    """
    if columns % lanes:
        raise PassError(f"{what}: {columns} output columns are not a multiple of {lanes} lanes")
    budget = max(1, registers * 3 // 4 if registers >= 32 else registers // 2)
    best: tuple[int, int, int, int] | None = None
    for col_vectors in (4, 3, 2, 1):
        if (columns // lanes) % col_vectors:
            continue
        limit = max(1, budget // col_vectors)
        tile_rows = max(d for d in range(1, min(rows, limit) + 1) if rows % d == 0)
        key = (tile_rows * col_vectors, -abs(tile_rows - col_vectors), tile_rows, col_vectors)
        if best is None or key > best:
            best = key
    assert best is not None  # col_vectors 1 always divides
    return RegisterTile(best[2], best[3], lanes)


def pack_panels(weight: np.ndarray, panel: int, step: int, what: str) -> np.ndarray:
    """``W[k, n]`` (``[K, N]``: ``out = a @ W``) -> ``[N / P, ceil(K / step), P, step]``, K zero-padded to a
    multiple of ``step``; ``what`` names the packing in errors."""
    depth, columns = weight.shape
    if columns % panel:
        raise PassError(f"{what}: {columns} columns are not a multiple of the panel {panel}")
    steps = -(-depth // step)
    padded = np.zeros((steps * step, columns), weight.dtype)
    padded[:depth] = weight
    # [K / step, step, N / P, P] -> [N / P, K / step, P, step]
    packed = padded.reshape(steps, step, columns // panel, panel).transpose(2, 0, 3, 1)
    return np.ascontiguousarray(packed)


def emit_packed_weight(bb: Any, weight: Any, panel: int, step: int) -> Any:
    """The ``[N / P, K / step, P, step]`` packing of a stored ``[N, K]`` Linear weight (``W^T`` of
    :func:`pack_panels`) as Relax ops on the weight only: ``lift-weight-transforms`` runs them once, at
    compile time, so weights.bin holds the packed weight (same bytes, same dtype)."""
    from tvm import relax

    columns, depth = (int(d) for d in weight.ty.shape)
    # [N, K] -> [N / P, P, K / step, step] -> [N / P, K / step, P, step]
    split = bb.emit(relax.op.reshape(weight, [columns // panel, panel, depth // step, step]))
    return bb.emit(relax.op.permute_dims(split, [0, 2, 1, 3]))


def emit_linear_gemm(
    bb: Any, gemm: Any, args: Sequence[Any], shape: Sequence[int], columns: int, out_dtype: str
) -> Any:
    """One ``call_tir`` of a GEMM kernel writing float32 ``[rows, columns]`` for a Linear whose input has
    ``shape`` (``rows`` its leading dimensions): the output back in those dimensions, cast to
    ``out_dtype``."""
    from tvm import relax

    rows = int(np.prod(shape[:-1]))
    out = bb.emit(relax.call_tir(gemm, list(args), relax.TensorType((rows, columns), "float32")))
    if len(shape) != 2:
        out = bb.emit(relax.op.reshape(out, [*shape[:-1], columns]))
    return out if out_dtype == "float32" else relax.op.astype(out, out_dtype)


@dataclass(frozen=True)
class TileContext:
    """What a step or epilogue callback of :func:`register_tile_gemm` works with: the kernel's buffers
    (parameters and views, by name) and the tile's accumulators."""

    buffers: dict[str, Any]
    acc: Any
    tile: RegisterTile

    def slot(self, r: Any, v: Any) -> Any:
        """The lanes of accumulator vector ``(r, v)`` in the flat accumulator buffer."""
        from tvm.script import tirx as T

        lanes = self.tile.lanes
        return T.ramp((r * self.tile.col_vectors + v) * lanes, 1, lanes)

    def value(self, r: Any, v: Any) -> Any:
        """Accumulator vector ``(r, v)``."""
        return self.acc[self.slot(r, v)]

    def update(self, r: Any, v: Any, value: Any) -> None:
        """Store ``value`` into accumulator vector ``(r, v)``."""
        from tvm.script import tirx as T

        T.buffer_store(self.acc, value, [self.slot(r, v)])


Step = Callable[[TileContext, Any, Any, Any, Any], None]  # (ctx, t, r, v, ko): the instruction step
Epilogue = Callable[[TileContext, Any, Any, Any], None]  # (ctx, t, r, v): writes accumulator (r, v) out


def register_tile_gemm(
    name: str,
    params: Sequence[tuple[str, tuple[int, ...], str]],
    tile: RegisterTile,
    *,
    tiles: int,
    depth_steps: int,
    acc_dtype: str,
    step: Step,
    epilogue: Epilogue,
    views: Sequence[tuple[str, tuple[int, ...], str, str]] = (),
    import_llvm: str | None = None,
    parallel: bool = True,
) -> Any:
    """The register-tiled GEMM as a scheduled TIR PrimFunc ``name``.

    ``params``: the buffers the kernel takes, ``(name, shape, dtype)`` in order. ``views``: flat views of
    them, ``(name, shape, dtype, param)`` (a strided vector load needs a one-dimensional buffer; the
    32-bit words of a bfloat16 buffer). ``tiles``: iterations of the outer loop (parallel unless
    ``parallel`` is False), ``depth_steps`` of the reduction loop; ``acc_dtype``: the accumulators' scalar
    type. Per tile ``t``, each accumulator vector is zeroed, ``step(ctx, t, r, v, ko)`` updates it for
    every reduction step ``ko`` (rows ``r`` and vectors ``v`` unrolled), and ``epilogue(ctx, t, r, v)``
    writes it out. ``import_llvm``: LLVM IR the module imports (``pragma_import_llvm``) around the loops.
    """
    from tvm.script import tirx as T
    from tvm.script.ir_builder.base import IRBuilder
    from tvm.tirx.script.builder import ir as tir_builder

    rows, vecs, lanes = tile.rows, tile.col_vectors, tile.lanes

    def enter(scopes: contextlib.ExitStack, label: str, frame: Any) -> Any:
        """Enter a loop frame for the rest of ``scopes``, its variable named as TVMScript's parser names it
        (the kernels read the same either way)."""
        var = scopes.enter_context(frame)
        IRBuilder.name(label, var)
        return var

    def tile_loops(body: Callable[..., None], *outer: tuple[str, Any]) -> None:
        """``body(*outer loop variables, r, v)`` inside the given loops and the unrolled rows x vectors."""
        with contextlib.ExitStack() as scopes:
            ivs = [enter(scopes, label, frame) for label, frame in outer]
            r = enter(scopes, "r", T.unroll(rows))
            v = enter(scopes, "v", T.unroll(vecs))
            body(*ivs, r, v)

    with IRBuilder() as builder:
        with tir_builder.prim_func():  # the frame TVMScript's @T.prim_func parser enters
            T.func_name(name)
            buffers = {p: T.arg(p, T.Buffer(shape, dtype)) for p, shape, dtype in params}
            T.func_attr({"global_symbol": name, "tirx.noalias": True, "tirx.is_scheduled": True})
            with contextlib.ExitStack() as scopes:
                for view, shape, dtype, of in views:
                    # a buffer declaration holds until the enclosing frame ends (no `with` of its own)
                    buffers[view] = IRBuilder.name(view, T.decl_buffer(shape, dtype, data=buffers[of].data))
                if import_llvm is not None:
                    scopes.enter_context(T.attr(T.int32(0), "pragma_import_llvm", import_llvm))
                t = enter(scopes, "t", (T.parallel if parallel else T.serial)(tiles))
                acc = IRBuilder.name("acc", T.decl_buffer((rows * vecs * lanes,), acc_dtype, scope="local"))
                ctx = TileContext(buffers, acc, tile)
                zero = T.broadcast(getattr(T, acc_dtype)(0), lanes)  # T.float32(0) or T.int32(0)
                tile_loops(lambda r, v: ctx.update(r, v, zero))
                tile_loops(lambda ko, r, v: step(ctx, t, r, v, ko), ("ko", T.serial(depth_steps)))
                tile_loops(lambda r, v: epilogue(ctx, t, r, v))
    return builder.get()
