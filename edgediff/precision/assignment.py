"""Assignment: pick each layer's format under a budget (model bytes, estimated latency, output SQNR).

This is seed notes Eq. 14, ``min ΔL(b) s.t. C(b) <= C_budget, M(b) <= M_budget``, solved as a
multiple-choice knapsack by the greedy-by-ratio walk: every layer starts at its most accurate format; its
formats are reduced to the lower convex hull of (cost, error), so each move to the next cheaper format
on the hull adds error at a rising price per byte (or second) saved; moves are taken cheapest price first
across all layers until the budget holds. Layer errors are relative MSEs of the prediction, taken as
additive (independent quantization noises add their energies); ``plan.py`` checks the sum with all layers
quantized at once.

Costs come from the target: weight bytes exactly as the artifact stores them (each tensor padded to the
64-byte alignment of weights.bin), and latency from the target's roofline cost model.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgediff.errors import InputError, PrecisionError
from edgediff.precision.quantizers import FORMATS, Format, compute_dtype, get_format, sqnr_db, stored_nbytes
from edgediff.runtime.artifact import WEIGHT_ALIGNMENT
from edgediff.runtime.memory import format_bytes
from edgediff.runtime.memory import parse_bytes as runtime_parse_bytes

if TYPE_CHECKING:
    from edgediff.precision.calibration import LayerInfo


def parse_bytes(value: int | float | str) -> int:
    """``1GB`` (10^9), ``512MiB`` (2^29), ``2e6`` or a plain number of bytes (the runtime's parser)."""
    try:
        return runtime_parse_bytes(value, "a size budget")
    except InputError as err:
        raise PrecisionError(str(err)) from err


@dataclass(frozen=True)
class Budget:
    """What the assignment must meet: at most ``bytes`` of weights, at most ``latency_s`` of estimated time
    in the quantizable layers, at least ``sqnr_db`` of prediction SQNR. With only an SQNR bound the
    smallest model meeting it is chosen."""

    bytes: int | None = None
    latency_s: float | None = None
    sqnr_db: float | None = None

    @classmethod
    def parse(cls, value: Budget | Mapping[str, Any] | None) -> Budget:
        """From a mapping with keys ``bytes`` (a number or ``"1GB"``), ``latency_ms`` / ``latency_s`` and
        ``sqnr_db``."""
        if value is None or isinstance(value, Budget):
            return value or cls()
        known = {"bytes", "latency_ms", "latency_s", "sqnr_db"}
        unknown = set(value) - known
        if unknown:
            raise PrecisionError(
                f"unknown precision budget key(s) {sorted(unknown)}; expected {', '.join(sorted(known))}"
            )
        latency = value.get("latency_s")
        if value.get("latency_ms") is not None:
            latency = float(value["latency_ms"]) / 1e3
        if latency is not None and float(latency) <= 0:
            raise PrecisionError(f"a latency budget must be positive, got {latency}")
        size = value.get("bytes")
        sqnr = value.get("sqnr_db")
        return cls(
            parse_bytes(size) if size is not None else None,
            float(latency) if latency is not None else None,
            float(sqnr) if sqnr is not None else None,
        )

    @property
    def empty(self) -> bool:
        return self.bytes is None and self.latency_s is None and self.sqnr_db is None

    def to_dict(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "latency_s": self.latency_s, "sqnr_db": self.sqnr_db}


@dataclass(frozen=True)
class Option:
    """One format a layer can take, with what it costs and how much prediction error it adds."""

    format: str
    bytes: int
    latency_s: float
    error: float  # relative MSE of the prediction with only this layer at this format


def aligned(nbytes: int) -> int:
    """Bytes a tensor takes in weights.bin: every tensor starts on a WEIGHT_ALIGNMENT boundary."""
    return -(-nbytes // WEIGHT_ALIGNMENT) * WEIGHT_ALIGNMENT


def weight_bytes(info: LayerInfo, fmt: Format, column_sums: bool = False) -> int:
    """Aligned bytes of a layer's stored weight arrays in ``fmt`` (0 for attention, which has none).
    ``column_sums``: the target's int8 kernel also stores an int32 sum per output channel for a layer with
    int8 activations (the uint8 ``vpdpbusd`` compensation, computed at compile time)."""
    if info.kind == "attention":
        return 0
    stored = sum(aligned(n) for n in stored_nbytes(info.weight_shape, fmt))
    if column_sums and fmt.activations:
        stored += aligned(4 * info.weight_shape[0])
    return stored


def estimate_latency(
    info: LayerInfo, fmt: Format, cost_model: Any, dtypes: Sequence[str], batch: int
) -> float:
    """Roofline time of one layer call at ``fmt``: its MACs at the format's measured throughput (else the
    compute dtype's peak; see :meth:`CostModel.estimate_seconds`) against the DRAM
    traffic of its weights, input and output (float outputs; int8 inputs are written by the producer's
    fused quantize step). w4 weights also pay for their dequantization kernel, which FuseOps leaves apart
    from the consumer (it writes the float weight, the layer reads it back)."""
    compute = compute_dtype(fmt, dtypes)
    float_bytes = 4 if "float32" in dtypes else 2
    act_bytes = {"int8": 1, "float16": 2, "bfloat16": 2}.get(compute, float_bytes)
    traffic = batch * (info.input_elems * act_bytes + info.output_elems * float_bytes)
    if info.kind == "attention":
        heads, queries, keys, _ = info.attention_shape or (0, 0, 0, 0)
        # scores are written, read by softmax, written and read again: always in float
        traffic += batch * heads * queries * keys * float_bytes * 4
        if fmt.activations:  # dynamic scales read the float operands twice more (max, then quantize)
            traffic += batch * info.input_elems * float_bytes * 2
    else:
        traffic += weight_bytes(info, fmt)
        if fmt.weight_bits == 4:
            traffic += 2 * int(np.prod(info.weight_shape)) * float_bytes
        if fmt.activations == "token":
            traffic += batch * info.input_elems * float_bytes
    return cost_model.estimate_seconds(2.0 * info.macs * batch, traffic, compute, fmt=fmt.name)


def candidate_formats(kind: str, dtypes: Sequence[str]) -> list[str]:
    """The formats a layer of ``kind`` can take on a target computing in ``dtypes``."""
    return [
        name
        for name, f in FORMATS.items()
        if f.auto and kind in f.kinds and all(d in dtypes for d in f.requires)
    ]


def require_supported(fmt: Format, dtypes: Sequence[str], target: str, what: str) -> None:
    """Raise if the target lacks a dtype ``fmt`` needs, naming the target, the dtype and ``what`` asked."""
    missing = [d for d in fmt.requires if d not in dtypes]
    if missing:
        raise PrecisionError(
            f"target '{target}' does not support {missing[0]} (needed by {what} '{fmt.name}'); "
            f"it computes in {', '.join(dtypes)}"
        )


def _hull(options: Sequence[Option], cost: Any) -> list[Option]:
    """The options worth considering, most accurate first: the lower convex hull of (cost, error), so that
    each move to the next option saves cost at a non-decreasing error price."""
    frontier: list[Option] = []
    for option in sorted(options, key=lambda o: (cost(o), o.error)):
        if not frontier or option.error < frontier[-1].error:
            frontier.append(option)
    hull: list[Option] = []
    for option in frontier:  # cost ascending, error descending
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (cost(b) - cost(a)) * (option.error - a.error) - (b.error - a.error) * (
                cost(option) - cost(a)
            )
            if cross > 0:
                break
            hull.pop()
        hull.append(option)
    return hull[::-1]


@dataclass
class Assignment:
    formats: dict[str, str]
    bytes: int  # weights.bin bytes (fixed + layers), an upper bound within the last tensor's padding
    latency_s: float  # estimated time of the quantizable layers
    error: float  # predicted relative MSE (sum over layers)

    @property
    def sqnr_db(self) -> float:
        return sqnr_db(self.error)


def assign(
    options: Mapping[str, Sequence[Option]],
    budget: Budget,
    *,
    fixed_bytes: int,
    target: str,
) -> Assignment:
    """Choose one option per layer so that ``budget`` holds, adding as little predicted error as possible.

    Raises :class:`PrecisionError` when no assignment meets the budget, saying what is reachable.
    """
    if not options:
        raise PrecisionError("nothing to assign: the model has no quantizable layers")
    layers = list(options)

    def total(pick: Mapping[str, Option]) -> Assignment:
        return Assignment(
            {name: o.format for name, o in pick.items()},
            fixed_bytes + sum(o.bytes for o in pick.values()),
            sum(o.latency_s for o in pick.values()),
            sum(o.error for o in pick.values()),
        )

    smallest = total({n: min(options[n], key=lambda o: (o.bytes, o.error)) for n in layers})
    fastest = total({n: min(options[n], key=lambda o: (o.latency_s, o.error)) for n in layers})
    best = total({n: min(options[n], key=lambda o: (o.error, o.bytes)) for n in layers})
    if budget.bytes is not None and smallest.bytes > budget.bytes:
        raise PrecisionError(
            f"no precision assignment fits {format_bytes(budget.bytes)} on target '{target}': the smallest "
            f"reachable size is {format_bytes(smallest.bytes)} ({format_bytes(fixed_bytes)} of it weights "
            "that are not quantized: norms, biases, embeddings)"
        )
    if budget.latency_s is not None and fastest.latency_s > budget.latency_s:
        raise PrecisionError(
            f"no precision assignment runs within {budget.latency_s * 1e3:.3g} ms on target '{target}': the "
            "lowest reachable estimated latency of the quantizable layers is "
            f"{fastest.latency_s * 1e3:.3g} ms"
        )
    if budget.sqnr_db is not None and best.sqnr_db < budget.sqnr_db:
        raise PrecisionError(
            f"no precision assignment reaches {budget.sqnr_db:g} dB SQNR on target '{target}': the highest "
            f"reachable is {best.sqnr_db:.1f} dB"
        )

    limits = [(budget.bytes, lambda o: o.bytes), (budget.latency_s, lambda o: o.latency_s)]
    limits = [(limit, key) for limit, key in limits if limit is not None]
    if limits:  # cost budgets: normalised so that bytes and seconds can be traded in one walk
        scale = [(limit, key, 1.0 / limit) for limit, key in limits]

        def cost(o: Option) -> float:
            return sum(key(o) * weight for _, key, weight in scale)
    else:  # an SQNR bound alone: the smallest model that meets it

        def cost(o: Option) -> float:
            return float(o.bytes)

    hulls = {n: _hull(options[n], cost) for n in layers}
    position = dict.fromkeys(layers, 0)
    pick = {n: hulls[n][0] for n in layers}
    error_limit = 10 ** (-budget.sqnr_db / 10) if budget.sqnr_db is not None else math.inf
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        i = position[name]
        if i + 1 < len(hulls[name]):
            a, b = hulls[name][i], hulls[name][i + 1]
            heapq.heappush(
                heap, ((b.error - a.error) / max(cost(a) - cost(b), 1e-30), layers.index(name), name)
            )

    def over_budget() -> bool:
        current = total(pick)
        return (budget.bytes is not None and current.bytes > budget.bytes) or (
            budget.latency_s is not None and current.latency_s > budget.latency_s
        )

    for name in layers:
        push(name)
    error = sum(o.error for o in pick.values())
    while heap and (over_budget() if limits else True):
        _, _, name = heapq.heappop(heap)
        nxt = hulls[name][position[name] + 1]
        added = nxt.error - pick[name].error
        if not limits and error + added > error_limit:
            continue  # this layer's later moves add even more error per byte: it stays here
        position[name] += 1
        pick[name] = nxt
        error += added
        push(name)
    result = total(pick)
    if limits and over_budget():  # unreachable: the walk ends at the cheapest hull points, checked above
        raise PrecisionError(f"no precision assignment meets the budget on target '{target}'")
    if budget.sqnr_db is not None and result.sqnr_db < budget.sqnr_db:
        raise PrecisionError(
            f"within the size/latency budget the highest SQNR the assignment reaches on target '{target}' "
            f"is {result.sqnr_db:.1f} dB, below the {budget.sqnr_db:g} dB asked"
        )
    return result


def layer_options(
    info: LayerInfo,
    formats: Sequence[str],
    errors: Mapping[str, float],
    cost_model: Any,
    dtypes: Sequence[str],
    batch: int,
    column_sums: bool = False,
) -> list[Option]:
    """The options of one layer: each candidate format with its bytes (``column_sums``: see
    :func:`weight_bytes`), estimated latency and error."""
    return [
        Option(
            fmt,
            weight_bytes(info, get_format(fmt), column_sums),
            estimate_latency(info, get_format(fmt), cost_model, dtypes, batch),
            float(errors.get(fmt, 0.0)),
        )
        for fmt in formats
    ]
