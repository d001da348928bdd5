"""Winograd F(m x m, 3 x 3) convolution kernels: transform matrices, the three TE kernels, a numpy model.

The transform matrices come from the Cook-Toom construction over the interpolation points 0, +-1, +-2,
+-1/2 and infinity (Lavin & Gray 2016; the points ncnn uses for F(6x6,3x3)), computed exactly with
fractions; each row's Lagrange denominator moves from B^T into G so that B^T and A^T hold small numbers.
``passes/winograd_conv2d.py`` decides per layer which variant (if any) to use; the Winograd schedule rule
(``schedules/winograd.py``) schedules the transform kernels, found by their block annotation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from functools import cache
from typing import Any

import numpy as np

from edgediff.errors import PassError
from edgediff.schedules.winograd import ANNOTATION

KERNEL = 3
TILE_SIZES = (2, 4, 6)
# Interpolation points (infinity is implicit): small integers and their reciprocals keep both the
# transform entries and their products near 1, which is what bounds the rounding error.
POINTS: dict[int, tuple[Fraction, ...]] = {
    2: (Fraction(0), Fraction(1), Fraction(-1)),
    4: (Fraction(0), Fraction(1), Fraction(-1), Fraction(2), Fraction(-2)),
    6: tuple(Fraction(p) for p in (0, 1, -1, 2, -2, Fraction(1, 2), Fraction(-1, 2))),
}


# --- transform matrices -------------------------------------------------------------------------------------


def _evaluation_matrix(points: tuple[Fraction, ...], degree: int) -> list[list[Fraction]]:
    """Rows [1, p, p^2, ...] for each point and [0, ..., 0, 1] for the point at infinity."""
    rows = [[p**j for j in range(degree)] for p in points]
    rows.append([Fraction(0)] * (degree - 1) + [Fraction(1)])
    return rows


def _inverse(matrix: list[list[Fraction]]) -> list[list[Fraction]]:
    """Exact Gauss-Jordan inverse (the matrices are tiny and must not carry rounding)."""
    n = len(matrix)
    rows = [row[:] + [Fraction(int(i == j)) for j in range(n)] for i, row in enumerate(matrix)]
    for col in range(n):
        pivot = next(r for r in range(col, n) if rows[r][col] != 0)
        rows[col], rows[pivot] = rows[pivot], rows[col]
        rows[col] = [x / rows[col][col] for x in rows[col]]
        for r in range(n):
            if r != col and rows[r][col] != 0:
                factor = rows[r][col]
                rows[r] = [x - factor * y for x, y in zip(rows[r], rows[col], strict=True)]
    return [row[n:] for row in rows]


@dataclass(frozen=True)
class WinogradMatrices:
    """F(m x m, r x r): ``A`` (alpha x m), ``BT`` (alpha x alpha), ``G`` (alpha x r), exact in float64."""

    m: int
    r: int
    A: np.ndarray
    BT: np.ndarray
    G: np.ndarray

    @property
    def alpha(self) -> int:
        return self.m + self.r - 1


@cache
def winograd_matrices(m: int, r: int = KERNEL) -> WinogradMatrices:
    """Cook-Toom matrices with ``Y = A^T [(G g G^T) * (B^T d B)] A`` for a correlation (what conv2d is).

    The product of polynomials of degree m-1 and r-1 is c = L[(E_m x) * (E_r g)] with E the evaluation
    matrices at the points and L the inverse of the alpha x alpha one; a correlation is its transpose, so
    A = E_m, G = E_r and B^T = L^T. Row i of B^T is scaled by its Lagrange denominator prod_j (p_i - p_j)
    and row i of G divided by it, which leaves the product unchanged and B^T's entries small.
    """
    if m not in POINTS:
        raise PassError(
            f"no Winograd points for F({m}x{m},{r}x{r}); tile sizes: {', '.join(map(str, POINTS))}"
        )
    points = POINTS[m]
    alpha = m + r - 1
    a = _evaluation_matrix(points, m)
    g = _evaluation_matrix(points, r)
    bt = [list(col) for col in zip(*_inverse(_evaluation_matrix(points, alpha)), strict=True)]
    for i, p in enumerate(points):
        denominator = math.prod((p - q for j, q in enumerate(points) if j != i), start=Fraction(1))
        bt[i] = [x * denominator for x in bt[i]]
        g[i] = [x / denominator for x in g[i]]
    as_array = lambda rows: np.array([[float(x) for x in row] for row in rows])  # noqa: E731
    return WinogradMatrices(m, r, as_array(a), as_array(bt), as_array(g))


@dataclass(frozen=True)
class ConvShape:
    """A conv2d's static shape (NCHW data, OIHW weight) and dtypes."""

    n: int
    c: int
    h: int
    w: int
    k: int
    pad: tuple[int, int, int, int]  # top, left, bottom, right
    dtype: str  # data and transformed weight (what the GEMM reads)
    out_dtype: str
    # the stored weight's dtype when it differs from ``dtype``: an integer weight of a weight-only (``w8``)
    # layer, cast by the weight transform, which then runs on every call (its float result would store the
    # weight as float again, so ``lift-weight-transforms`` keeps it un-lifted)
    weight_dtype: str = ""

    @property
    def stored_weight_dtype(self) -> str:
        return self.weight_dtype or self.dtype

    @property
    def weight_at_run_time(self) -> bool:
        """Whether the weight transform runs on every call (an integer weight) instead of at compile time."""
        return self.stored_weight_dtype != self.dtype

    @property
    def out_h(self) -> int:
        return self.h + self.pad[0] + self.pad[2] - KERNEL + 1

    @property
    def out_w(self) -> int:
        return self.w + self.pad[1] + self.pad[3] - KERNEL + 1

    def tiles(self, m: int) -> tuple[int, int]:
        return -(-self.out_h // m), -(-self.out_w // m)

    def describe(self) -> str:
        weight = f" ({self.weight_dtype} weight)" if self.weight_at_run_time else ""
        return f"{self.c}->{self.k} {self.h}x{self.w} {self.dtype}{weight}"


def padded_tiles(shape: ConvShape, m: int, multiple: int) -> int:
    """Tiles of the whole batch, rounded up to ``multiple`` (whole register tiles along the GEMM columns)."""
    th, tw = shape.tiles(m)
    return -(-shape.n * th * tw // multiple) * multiple


# --- numerics: a numpy model of the kernels -----------------------------------------------------------------


def winograd_conv2d_numpy(
    x: np.ndarray, w: np.ndarray, m: int, pad: tuple[int, int, int, int], dtype: str, out_dtype: str
) -> np.ndarray:
    """What the Winograd kernels compute, in their storage dtypes: transforms accumulate in float32 and store
    U and V in ``dtype``; the GEMM accumulates in float32 and stores M in ``out_dtype``."""
    mats = winograd_matrices(m)
    a, bt, g = (mat.astype(np.float32) for mat in (mats.A, mats.BT, mats.G))
    n, c, h, wd = x.shape
    out_h, out_w = h + pad[0] + pad[2] - 2, wd + pad[1] + pad[3] - 2
    th, tw = -(-out_h // m), -(-out_w // m)
    xp = np.zeros((n, c, th * m + 2, tw * m + 2), np.float32)
    xp[:, :, pad[0] : pad[0] + h, pad[1] : pad[1] + wd] = x
    windows = np.lib.stride_tricks.sliding_window_view(xp, (mats.alpha, mats.alpha), axis=(2, 3))
    d = windows[:, :, ::m, ::m]  # (n, c, th, tw, alpha, alpha)
    v = (bt @ d @ bt.T).astype(dtype).astype(np.float32)
    u = (g @ w.astype(np.float32) @ g.T).astype(dtype).astype(np.float32)  # (k, c, alpha, alpha)
    k, alpha2 = w.shape[0], mats.alpha**2
    # the GEMM: alpha^2 products (k x c) @ (c x tiles), as the kernels batch them
    u_gemm = u.reshape(k, c, alpha2).transpose(2, 0, 1)
    v_gemm = v.reshape(n, c, th * tw, alpha2).transpose(3, 1, 0, 2).reshape(alpha2, c, n * th * tw)
    prod = (u_gemm @ v_gemm).astype(out_dtype).astype(np.float32)  # (alpha^2, k, tiles)
    prod = prod.reshape(mats.alpha, mats.alpha, k, n, th, tw).transpose(3, 2, 4, 5, 0, 1)
    y = a.T @ prod @ a  # (n, k, th, tw, m, m)
    y = y.transpose(0, 1, 2, 4, 3, 5).reshape(n, k, th * m, tw * m)[:, :, :out_h, :out_w]
    return y.astype(out_dtype)


def direct_conv2d_numpy(x: np.ndarray, w: np.ndarray, pad: tuple[int, int, int, int]) -> np.ndarray:
    """Reference 3x3 correlation in float64."""
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad[0], pad[2]), (pad[1], pad[3])))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (KERNEL, KERNEL), axis=(2, 3))
    n, c, h, w_out = windows.shape[:4]
    columns = windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w_out, c * KERNEL * KERNEL)
    y = columns @ w.astype(np.float64).reshape(w.shape[0], -1).T
    return y.reshape(n, h, w_out, -1).transpose(0, 3, 1, 2)


# --- the kernels (TE) ---------------------------------------------------------------------------------------


def _linear_combination(terms: list[tuple[float, Any]], dtype: str) -> Any:
    """sum(coef * value) over the non-zero coefficients, as one TIR expression (no multiply for +-1)."""
    from tvm import tirx

    expr = None
    for coef, value in terms:
        if coef == 0:
            continue
        term = value if coef == 1 else -value if coef == -1 else value * tirx.const(coef, dtype)
        expr = term if expr is None else expr + term
    return expr if expr is not None else tirx.const(0, dtype)


def _select(index: Any, cases: list[Any]) -> Any:
    """``cases[index]`` for a loop variable ``index``: a Select chain that folds to one case once the
    schedule unrolls that loop (the Winograd rule does), leaving straight-line code with constant
    coefficients."""
    from tvm import tirx

    expr = cases[-1]
    for i in range(len(cases) - 2, -1, -1):
        expr = tirx.Select(index == i, cases[i], expr)
    return expr


def weight_transform_te(weight: Any, m: int, dtype: str) -> Any:
    """U[xi * alpha + nu, k, c] = (G g_kc G^T)[xi, nu] of the OIHW 3x3 ``weight``, accumulated in float32,
    stored in ``dtype``."""
    k, c = weight.shape[0], weight.shape[1]
    return loaded_weight_transform_te(lambda *i: weight[i].astype("float32"), k, c, m, dtype)


def loaded_weight_transform_te(load: Callable[..., Any], k: Any, c: Any, m: int, dtype: str) -> Any:
    """The weight transform of a ``k x c x 3 x 3`` weight whose float32 element ``(ko, ci, a, b)`` is
    ``load(ko, ci, a, b)`` (a widened tensor element, or an int4 weight read from its packed nibbles).

    G is a small table computed in the kernel, so the weight block is nine multiply-adds per element with
    table loads: cheap to build and run unscheduled, which is how ``lift-weight-transforms`` runs it at
    compile time. Scheduled (lifting off), the table is inlined and the unrolled rows fold it to constants.
    """
    from tvm import te, tirx

    mats = winograd_matrices(m)
    alpha = mats.alpha

    def entry(row: Any, col: Any) -> Any:
        cases = [_select(col, [tirx.const(float(v), "float32") for v in mats.G[r]]) for r in range(alpha)]
        return _select(row, cases)

    table = te.compute((alpha, KERNEL), entry, name="winograd_g")

    def compute(e: Any, ko: Any, ci: Any) -> Any:
        xi, nu = e // alpha, e % alpha
        total = None
        for a in range(KERNEL):
            for b in range(KERNEL):
                term = table[xi, a] * table[nu, b] * load(ko, ci, a, b)
                total = term if total is None else total + term
        return total.astype(dtype)

    return te.compute((alpha * alpha, k, c), compute, name="winograd_weight", attrs={ANNOTATION: m})


def input_transform_te(data: Any, m: int, pad: tuple[int, int, int, int], tiles: int, dtype: str) -> Any:
    """V[xi * alpha + nu, c, p] = (B^T d_cp B)[xi, nu] for every alpha x alpha input tile p (tiles of the
    batch in (n, tile row, tile column) order; the padding tiles beyond the last repeat it).

    Four stages: the zero-padded input; the tile windows gathered tile-minor (so the arithmetic reads
    whole vectors of tiles); B^T d (rows); (B^T d) B (columns). Separable, the two products cost 2 alpha^3
    multiply-adds per tile instead of alpha^4.
    """
    from tvm import te, tirx, topi

    mats = winograd_matrices(m)
    alpha = mats.alpha
    n, c, h, w = (int(v) for v in data.shape)
    tiles_h, tiles_w = ConvShape(n, c, h, w, 1, pad, dtype, dtype).tiles(m)
    padded = topi.nn.pad(
        data,
        [0, 0, pad[0], pad[1]],
        [0, 0, tiles_h * m + 2 - h - pad[0], tiles_w * m + 2 - w - pad[1]],
        name="winograd_pad",
    )
    last = n * tiles_h * tiles_w - 1

    def window(ci: Any, a: Any, b: Any, p: Any) -> Any:
        q = tirx.min(p, last)
        y0 = (q // tiles_w) % tiles_h * m
        return padded[q // (tiles_h * tiles_w), ci, y0 + a, q % tiles_w * m + b]

    windows = te.compute((c, alpha, alpha, tiles), window, name="winograd_tiles")

    def rows(ci: Any, xi: Any, b: Any, p: Any) -> Any:
        values = [windows[ci, a, b, p].astype("float32") for a in range(alpha)]
        cases = [
            _linear_combination([(float(mats.BT[x, a]), values[a]) for a in range(alpha)], "float32")
            for x in range(alpha)
        ]
        return _select(xi, cases)

    partial = te.compute((c, alpha, alpha, tiles), rows, name="winograd_rows", attrs={ANNOTATION: m})

    def cols(e: Any, ci: Any, p: Any) -> Any:
        cases = []
        for xi in range(alpha):
            values = [partial[ci, xi, b, p] for b in range(alpha)]
            for nu in range(alpha):
                terms = [(float(mats.BT[nu, b]), values[b]) for b in range(alpha)]
                cases.append(_linear_combination(terms, "float32").astype(dtype))
        return _select(e, cases)

    return te.compute((alpha * alpha, c, tiles), cols, name="winograd_input", attrs={ANNOTATION: m})


def output_transform_te(prod: Any, m: int, shape: ConvShape) -> Any:
    """Y[n, k, y, x] from M[xi * alpha + nu, k, p]: A^T M A per tile, separably (A^T M, then (A^T M) A),
    tile-major and contiguous along the tiles; then each output pixel gathered from its tile, cropped to
    the conv's output."""
    from tvm import te

    mats = winograd_matrices(m)
    alpha = mats.alpha
    k, tiles = int(prod.shape[1]), int(prod.shape[2])
    out_dtype = shape.out_dtype
    tiles_h, tiles_w = shape.tiles(m)

    def rows(ko: Any, i: Any, nu: Any, p: Any) -> Any:
        values = [prod[xi * alpha + nu, ko, p].astype("float32") for xi in range(alpha)]
        cases = [
            _linear_combination([(float(mats.A[xi, r]), values[xi]) for xi in range(alpha)], "float32")
            for r in range(m)
        ]
        return _select(i, cases)

    partial = te.compute((k, m, alpha, tiles), rows, name="winograd_out_rows", attrs={ANNOTATION: m})

    def cols(ko: Any, i: Any, j: Any, p: Any) -> Any:
        values = [partial[ko, i, nu, p] for nu in range(alpha)]
        cases = [
            _linear_combination([(float(mats.A[nu, c]), values[nu]) for nu in range(alpha)], "float32")
            for c in range(m)
        ]
        return _select(j, cases).astype(out_dtype)

    out_tiles = te.compute((k, m, m, tiles), cols, name="winograd_output", attrs={ANNOTATION: m})

    def gather(b: Any, ko: Any, y: Any, x: Any) -> Any:
        return out_tiles[ko, y % m, x % m, (b * tiles_h + y // m) * tiles_w + x // m]

    return te.compute(
        (shape.n, k, shape.out_h, shape.out_w), gather, name="winograd_scatter", attrs={ANNOTATION: m}
    )
