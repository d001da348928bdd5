"""Model-level tiling for an NPU with a software-managed SRAM: memory analysis, regions, tiles, program.

A UNet on a phone is bound by DRAM traffic: its high-resolution feature maps and attention scores are far
larger than the NPU's SRAM, so op-by-op execution sends every intermediate out to DRAM and back. The planner
(after EdgeFusion's model-level tiling) works in four steps on the op-level
:class:`~edgediff.npu.graph.Graph`:

1. partition: each op goes to the NPU (in the target's op list and dtypes) or the host CPU (BYOC-style);
   reshapes, permutes, slices and concats are DMA descriptors (views), never kernels;
2. regions: NPU ops are grouped into chains whose intermediates stay on chip: an anchor (conv, matmul,
   norm, attention) with its elementwise epilogue, GroupNorm -> SiLU -> conv and conv -> conv chains (each
   3x3 conv adds a halo row above and below), LayerNorm -> Linear;
3. tiles: each region's output is cut into tiles over batch/heads, rows (H of NCHW maps, tokens) and output
   channels, the largest whose whole working set (inputs with halo, weight tile, intermediates, outputs,
   accumulators) fits the SRAM, choosing among the feasible shapes the one the cost model says moves the
   fewest DRAM bytes (loop order included: a weight tile or an input band stays resident while the other
   streams). GroupNorm gets a statistics phase first (or its input's producer accumulates the statistics);
   attention is tiled over query and key blocks with online softmax;
4. program: DMA-in / compute / DMA-out instructions with SRAM offsets, which :mod:`edgediff.npu.simulator`
   executes (with numpy kernels, or counting only) and checks against the SRAM size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import product
from typing import TYPE_CHECKING, Any

from edgediff.errors import PassError
from edgediff.npu.graph import ALIAS_OPS, ATTENTION_OP, ELEMENTWISE_OPS, VIEW_OPS, Graph, Node, nbytes
from edgediff.npu.kernels import Box, box_shape

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

PROGRAM_VERSION = 1
ROWWISE_OPS = frozenset({"relax.nn.softmax", "relax.nn.layer_norm", "relax.mean", "relax.max", "relax.sum"})
ANCHORS = frozenset(
    {"relax.nn.conv2d", "relax.matmul", "relax.nn.group_norm", ATTENTION_OP, "relax.image.resize2d"}
)
_STATS_BYTES = 12  # count, mean, M2 per (batch, group) in float32


class SramTooSmallError(PassError):
    """The target's SRAM cannot hold even the smallest tile of one op (names the op and the bytes needed)."""


# --- partition ------------------------------------------------------------------------------------------


def npu_supports(node: Node, spec: TargetSpec) -> bool:
    """Whether the NPU runs ``node``: its op in the target's op list (casts always; attention when matmul and
    softmax are), its tensors in the target's dtypes or float32 (the accumulators' format)."""
    if node.op == ATTENTION_OP:
        op_ok = spec.supports_op("relax.matmul") and spec.supports_op("relax.nn.softmax")
    else:
        op_ok = node.op == "relax.astype" or spec.supports_op(node.op)
    return op_ok and node.dtype in (*spec.dtypes, "float32")


def _float32_operands(node: Node, graph: Graph, spec: TargetSpec) -> bool:
    """A conv2d / matmul computing on float32 operands, which a float16-only NPU cannot: the fp16 overflow
    guard keeps such layers in float32, so they run on the host CPU."""
    if "float32" in spec.dtypes or node.op not in ("relax.nn.conv2d", "relax.matmul"):
        return False
    return any(graph.dtype_of(a) == "float32" for a in node.var_args())


# --- regions --------------------------------------------------------------------------------------------


@dataclass
class Group:
    """A region: ops executed together, tile by tile, on one device."""

    id: int
    nodes: list[Node]
    device: str  # "npu" | "host"
    plan: dict[str, Any] = field(default_factory=dict)

    @property
    def last(self) -> Node:
        return self.nodes[-1]

    @property
    def names(self) -> set[str]:
        return {n.name for n in self.nodes}

    @property
    def block(self) -> str:
        return self.last.block

    def anchors(self) -> list[Node]:
        return [n for n in self.nodes if n.op in ANCHORS]


def _kind(node: Node) -> str:
    if node.op in ELEMENTWISE_OPS:
        return "elementwise"
    if node.op in ROWWISE_OPS:
        return "rowwise"
    return node.op


def _may_join(group: Group, node: Node, graph: Graph, chain: bool) -> bool:
    last = group.last
    kind = _kind(node)
    if kind == "elementwise":
        return node.shape == last.shape
    if not chain or node.var_args()[0] != last.name:
        return False
    kinds = {_kind(n) for n in group.nodes}
    if node.op == "relax.nn.conv2d" and len(node.shape or []) == 4:
        # GroupNorm -> SiLU -> conv and conv -> conv: row bands with a halo per 3x3 conv
        return (
            kinds <= {"elementwise", "relax.nn.group_norm", "relax.nn.conv2d"} and len(last.shape or []) == 4
        )
    if node.op == "relax.matmul" and graph.is_weight(node.var_args()[1]):
        # LayerNorm -> Linear over token rows
        return kinds <= {"elementwise", "rowwise"} and len(node.shape or []) == len(last.shape or [])
    return False


def form_groups(graph: Graph, spec: TargetSpec, *, chain: bool = True) -> list[Group]:
    """Partition the graph's ops into host ops and NPU regions (see the module docstring)."""
    groups: list[Group] = []
    owner: dict[str, Group] = {}
    for node in graph.nodes:
        if node.weight or node.op in VIEW_OPS:
            continue
        if not npu_supports(node, spec) or _float32_operands(node, graph, spec):
            group = Group(len(groups), [node], "host")
        else:
            producers = [owner[a] for a in node.var_args() if a in owner and owner[a].device == "npu"]
            candidates = [g for g in producers if g.last.name in node.var_args() and g is groups[-1]]
            if candidates and _may_join(candidates[0], node, graph, chain):
                candidates[0].nodes.append(node)
                owner[node.name] = candidates[0]
                continue
            view = _unit_view_of_last(node, groups, owner, graph) if chain else None
            if view is not None:
                # an elementwise epilogue behind a reshape that only adds or drops unit axes ((N, C) ->
                # (1, N, C)): the reshape joins the region as a re-labelling of the tile, so the epilogue's
                # input never goes to DRAM
                groups[-1].nodes += [view, node]
                owner[view.name] = owner[node.name] = groups[-1]
                continue
            group = Group(len(groups), [node], "npu")
        groups.append(group)
        owner[node.name] = group
    # a value read outside its region must go to DRAM: the region ends there
    result: list[Group] = []
    for group in groups:
        result.extend(_split_escapes(group, graph))
    for index, group in enumerate(result):
        group.id = index
    return result


def unit_reshape(src: list[int] | None, dst: list[int] | None) -> bool:
    """Whether a reshape from ``src`` to ``dst`` only inserts or removes axes of size 1."""
    if src is None or dst is None:
        return False
    return [d for d in src if d != 1] == [d for d in dst if d != 1]


def _unit_view_of_last(node: Node, groups: list[Group], owner: dict[str, Group], graph: Graph) -> Node | None:
    if node.op not in ELEMENTWISE_OPS or not groups or groups[-1].device != "npu":
        return None
    group = groups[-1]
    if any(n.op in ROWWISE_OPS or n.op == "relax.nn.group_norm" or n.op in ALIAS_OPS for n in group.nodes):
        return None
    for arg in node.var_args():
        view = graph.by_name.get(arg)
        if (
            view is not None
            and view.op in ("relax.reshape", "relax.expand_dims", "relax.squeeze")
            and view.var_args()[0] == group.last.name
            and unit_reshape(group.last.shape, view.shape)
            and view.shape == node.shape
            and arg not in owner
        ):
            return view
    return None


def _split_escapes(group: Group, graph: Graph) -> list[Group]:
    names = group.names
    for i, node in enumerate(group.nodes[:-1]):
        outside = [c for c in graph.consumers.get(node.name, []) if c not in names]
        if outside or node.name == graph.output:
            head = Group(group.id, group.nodes[: i + 1], group.device)
            return [head, *_split_escapes(Group(group.id, group.nodes[i + 1 :], group.device), graph)]
    return [group]


def split_at_anchors(group: Group) -> list[Group]:
    """A chain cut before each anchor after the first (and before a re-labelling reshape): the fallback when
    the chain does not pay or fit."""
    parts: list[list[Node]] = [[]]
    for node in group.nodes:
        if parts[-1] and (
            node.op in ALIAS_OPS or node.op in ANCHORS and any(n.op in ANCHORS for n in parts[-1])
        ):
            parts.append([])
        parts[-1].append(node)
    return [Group(group.id, p, group.device) for p in parts]


# --- boxes: which part of each argument a part of an op's output needs ------------------------------------


def _clip(box: Box, shape: list[int]) -> Box:
    return [[max(lo, 0), min(hi, d)] for (lo, hi), d in zip(box, shape, strict=True)]


def arg_boxes(node: Node, out_box: Box, graph: Graph) -> list[Box | None]:
    """For each tensor argument of ``node``, the box of it that computing ``out_box`` reads (clipped)."""
    args = [a["var"] if "var" in a else None for a in node.args]
    shapes = [graph.shape_of(a) if a else None for a in args]
    op = node.op
    result: list[Box | None] = []
    for index, (arg, shape) in enumerate(zip(args, shapes, strict=True)):
        if arg is None:
            result.append(None)
            continue
        full = [[0, d] for d in shape]
        if op in ELEMENTWISE_OPS:
            box = [list(r) for r in full]
            offset = len(out_box) - len(shape)
            for axis, d in enumerate(shape):
                if d != 1 and axis + offset >= 0:
                    box[axis] = list(out_box[axis + offset])
        elif op == "relax.nn.conv2d":
            if index == 0:
                top = node.attrs.get("padding", [0, 0, 0, 0])[0]
                sh = node.attrs.get("strides", [1, 1])[0]
                dh = node.attrs.get("dilation", [1, 1])[0]
                kh = graph.shape_of(args[1])[2]
                lo, hi = out_box[2]
                rows = [lo * sh - top, (hi - 1) * sh - top + dh * (kh - 1) + 1]
                box = [list(out_box[0]), [0, shape[1]], rows, [0, shape[3]]]
            else:
                box = [list(out_box[1])] + full[1:] if len(shape) == 4 else [list(out_box[1])]
        elif op == "relax.matmul":
            box = [list(r) for r in full]
            offset = len(out_box) - len(shape)
            for axis in range(len(shape) - 2):
                if shape[axis] != 1 and axis + offset >= 0:
                    box[axis] = list(out_box[axis + offset])
            if index == 0:
                box[-2] = list(out_box[-2]) if len(shape) >= 2 else box[-2]
            else:
                box[-1] = list(out_box[-1])
        elif op == "relax.nn.group_norm":
            box = [list(r) for r in full]
            if index == 0:
                box = [list(r) for r in out_box]
            else:
                box = [list(out_box[1])]
        elif op in ROWWISE_OPS:
            box = [list(r) for r in full]
            if index == 0 and len(out_box) == len(shape):
                reduced = _reduced_axes(node)
                for axis in range(len(shape)):
                    if axis not in reduced:
                        box[axis] = list(out_box[axis])
        elif op == "relax.image.resize2d":
            fh = node.shape[2] // shape[2]
            fw = node.shape[3] // shape[3]
            box = [list(out_box[0]), list(out_box[1]), [out_box[2][0] // fh, -(-out_box[2][1] // fh)],
                   [out_box[3][0] // fw, -(-out_box[3][1] // fw)]]  # fmt: skip
        elif op in ALIAS_OPS and unit_reshape(shape, node.shape):
            kept = iter([r for r, d in zip(out_box, node.shape, strict=True) if d != 1])
            box = [list(next(kept)) if d != 1 else [0, 1] for d in shape]
        elif op == ATTENTION_OP:
            box = [list(out_box[0])] + [list(r) for r in full[1:]]
            if index == 0:
                box[1] = list(out_box[1])
        else:
            box = [list(r) for r in full]
        result.append(_clip(box, shape))
    return result


def _reduced_axes(node: Node) -> set[int]:
    rank = len(node.shape or [])
    if node.op == "relax.nn.softmax":
        return {node.attrs.get("axis", -1) % rank}
    if node.op == "relax.nn.layer_norm":
        return {a % rank for a in node.attrs["axes"]}
    if node.op == "relax.nn.group_norm":
        return {1}  # channels (statistics come from the statistics phase)
    axes = node.attrs.get("axis")
    return set(range(rank)) if axes is None else {a % rank for a in axes}


def conv_halo_rows(node: Node, graph: Graph) -> int:
    """Extra input rows a conv tile reads beyond its own: (k-1) * dilation (half above, half below)."""
    kh = graph.shape_of(node.var_args()[1])[2]
    return (kh - 1) * node.attrs.get("dilation", [1, 1])[0]


# --- tile planning ----------------------------------------------------------------------------------------


@dataclass
class TileAxis:
    axis: int
    size: int
    tile: int
    role: str  # "batch" | "rows" | "cols"

    @property
    def count(self) -> int:
        return -(-self.size // self.tile)


def _tile_axes(group: Group, graph: Graph) -> list[tuple[int, str]]:
    """The output axes a region may be cut along (batch, rows, cols), per the ops it contains."""
    out = group.last.shape or []
    rank = len(out)
    if rank == 0 or any(n.op not in ANCHORS | ELEMENTWISE_OPS | ROWWISE_OPS | ALIAS_OPS for n in group.nodes):
        return []
    if any(len(n.shape or []) != rank and not unit_reshape(n.shape, out) for n in group.nodes):
        return []
    # NCHW maps (and GroupNorm's N, C, H*W view): rows are H, columns are channels
    spatial = rank in (3, 4) and any(
        n.op in ("relax.nn.conv2d", "relax.nn.group_norm", "relax.image.resize2d") for n in group.nodes
    )
    reduced: set[int] = set()
    reduced_after: set[int] = set()  # axes reduced by the weighted op's epilogue
    weighted = [n for n in group.nodes if n.op in ("relax.nn.conv2d", "relax.matmul")]
    for position, n in enumerate(group.nodes):
        if n.op in ROWWISE_OPS:
            if not n.attrs.get("keepdims", True) and n.op in ("relax.mean", "relax.max", "relax.sum"):
                return []
            reduced |= _reduced_axes(n)
            if weighted and position > group.nodes.index(weighted[0]):
                reduced_after |= _reduced_axes(n)
    axes: list[tuple[int, str]] = []
    if rank >= 3 and out[0] > 1:
        axes.append((0, "batch"))
    row = 2 if spatial else rank - 2
    if rank >= 2 and row not in reduced:
        axes.append((row, "rows"))
    col = 1 if spatial else rank - 1
    # output channels / columns: the weight is cut into column tiles (one weighted op, no GroupNorm)
    elementwise = all(n.op in ELEMENTWISE_OPS | ALIAS_OPS for n in group.nodes)
    # GroupNorm normalises each channel with its group's statistics (from the statistics phase) and
    # upsampling copies each channel: channel tiles are exact when no conv follows in the region
    norm_only = all(
        n.op in ELEMENTWISE_OPS | ALIAS_OPS or n.op in ("relax.nn.group_norm", "relax.image.resize2d")
        for n in group.nodes
    )
    if col != row and (
        elementwise
        or (norm_only and spatial)
        or (
            # a prologue before the weighted op (GroupNorm -> SiLU) reads whole channels: it is recomputed
            # for each column tile from the input band, which stays resident
            len(weighted) == 1
            and col not in reduced_after
            and not any(
                n.op == "relax.nn.group_norm" for n in group.nodes[group.nodes.index(weighted[0]) + 1 :]
            )
        )
    ):
        axes.append((col, "cols"))
    return axes


def _candidates(size: int, granularity: int) -> list[int]:
    """Tile sizes to try along an axis: the whole axis, then halvings rounded up to the granularity."""
    sizes, t = [], size
    while True:
        t_aligned = min(size, max(granularity, -(-t // granularity) * granularity))
        if not sizes or t_aligned < sizes[-1]:
            sizes.append(t_aligned)
        if t_aligned <= granularity or t <= 1:
            break
        t = -(-t // 2)
    return sizes


def _tile_box(out_shape: list[int], axes: list[TileAxis], index: tuple[int, ...]) -> Box:
    box = [[0, d] for d in out_shape]
    for ax, i in zip(axes, index, strict=True):
        box[ax.axis] = [i * ax.tile, min(ax.size, (i + 1) * ax.tile)]
    return box


@dataclass
class TileBoxes:
    """Every buffer one tile of a region holds: the region's nodes' output boxes and its inputs' boxes."""

    nodes: dict[str, Box]
    inputs: dict[str, Box]


def region_boxes(group: Group, graph: Graph, out_box: Box) -> TileBoxes:
    """Boxes of every node and external input one output tile needs, walking the region backwards."""
    names = group.names
    needed: dict[str, Box] = {group.last.name: out_box}
    inputs: dict[str, Box] = {}
    for node in reversed(group.nodes):
        box = needed.get(node.name)
        if box is None:  # only possible for a node whose sole consumer is outside (split earlier)
            box = [[0, d] for d in node.shape or []]
            needed[node.name] = box
        for arg, abox in zip([a.get("var") for a in node.args], arg_boxes(node, box, graph), strict=True):
            if arg is None or abox is None:
                continue
            target = needed if arg in names else inputs
            if arg in target:
                target[arg] = [
                    [min(a[0], b[0]), max(a[1], b[1])] for a, b in zip(target[arg], abox, strict=True)
                ]
            else:
                target[arg] = abox
    return TileBoxes(needed, inputs)


def _box_bytes(box: Box, dtype: str) -> int:
    return nbytes(box_shape(box), dtype)


def _slot_sizes(group: Group, graph: Graph, axes: list[TileAxis], kv: int | None) -> dict[str, int]:
    """Bytes of each SRAM slot: the larger of the first and an interior tile (halos are clipped at the
    border, and the last tile may be short), so that every tile's buffer fits its slot."""
    out_shape = group.last.shape or []
    samples = [tuple(min(i, ax.count - 1) for ax in axes) for i in (0, 1)]
    kv_names = _kv_inputs(group)
    slots: dict[str, list[int]] = {}
    dtypes: dict[str, str] = {}
    for index in samples:
        boxes = region_boxes(group, graph, _tile_box(out_shape, axes, index))
        for name, box in {**boxes.nodes, **boxes.inputs}.items():
            if kv is not None and name in kv_names:
                axis = 2 if name == kv_names[0] else 1
                box = [list(r) for r in box]
                box[axis] = [0, min(kv, box[axis][1] - box[axis][0])]
            lengths = box_shape(box)
            slots[name] = [max(a, b) for a, b in zip(slots.get(name, lengths), lengths, strict=True)]
            dtypes[name] = graph.dtype_of(name)
    sizes = {name: nbytes(lengths, dtypes[name]) for name, lengths in slots.items()}
    if any(n.op == "relax.nn.group_norm" for n in group.nodes):
        gn = next(n for n in group.nodes if n.op == "relax.nn.group_norm")
        sizes["@stats"] = (gn.shape or [1])[0] * gn.attrs["num_groups"] * _STATS_BYTES
    if group.last.op == ATTENTION_OP or any(n.op == ATTENTION_OP for n in group.nodes):
        attn = next(n for n in group.nodes if n.op == ATTENTION_OP)
        q_box = slots[attn.var_args()[0]]
        dv = attn.shape[-1]
        rows = q_box[0] * q_box[1]
        nk = graph.shape_of(attn.var_args()[1])[-1]
        sizes["@state"] = rows * (2 + dv) * 4  # running max, denominator, fp32 output accumulator
        sizes["@scores"] = rows * min(kv or nk, nk) * 4
    return sizes


def _last_uses(group: Group) -> dict[str, int]:
    """Each region node's position of its last consumer inside the region (the end for the last node)."""
    position = {n.name: i for i, n in enumerate(group.nodes)}
    last = {n.name: i for i, n in enumerate(group.nodes)}
    for i, node in enumerate(group.nodes):
        for arg in node.var_args():
            if arg in position:
                last[arg] = max(last[arg], i)
    last[group.last.name] = len(group.nodes)  # held until its DMA out
    return last


def _layout(group: Group, slots: dict[str, int], kv_streamed: bool = True) -> tuple[dict[str, int], int]:
    """SRAM offsets for a tile's buffers, first fit by lifetime: an intermediate's space is reused once its
    last consumer in the region has run; inputs, statistics and resident tiles live through the region.
    Returns the offsets and the bytes spanned (the working set)."""
    n = len(group.nodes)
    last = _last_uses(group)
    attention = next((i for i, node in enumerate(group.nodes) if node.op == ATTENTION_OP), None)
    # keys and values streamed in blocks live during the attention step only; whole, they stay resident
    streamed = set(_kv_inputs(group)) if kv_streamed else set()
    spans: list[tuple[str, int, int]] = []
    for name in slots:
        if name in last:
            i = next(k for k, node in enumerate(group.nodes) if node.name == name)
            spans.append((name, i, last[name]))
        elif name in ("@state", "@scores") or (name in streamed and attention is not None):
            spans.append(
                (name, attention if attention is not None else 0, attention if attention is not None else 0)
            )
        else:  # region inputs and statistics: the whole region
            spans.append((name, -1, n))
    # statistics first (the statistics phase streams bands above them), then by start, larger first
    spans.sort(key=lambda s: (s[0] != "@stats", s[1], -slots[s[0]]))
    placed: list[tuple[int, int, int, int]] = []  # offset, end, start step, end step
    offsets: dict[str, int] = {}
    for name, start, end in spans:
        size = slots[name]
        offset = 0
        for o, e, s0, s1 in sorted(placed):
            if s0 <= end and start <= s1 and o < offset + size and offset < e:
                offset = e
        # a later placed buffer may now overlap: retry until stable
        moved = True
        while moved:
            moved = False
            for o, e, s0, s1 in placed:
                if s0 <= end and start <= s1 and o < offset + size and offset < e:
                    offset, moved = e, True
        offsets[name] = offset
        placed.append((offset, offset + size, start, end))
    return offsets, max((e for _, e, _, _ in placed), default=0)


def _streams(group: Group, graph: Graph, kv: int | None) -> bool:
    """Whether a region's attention streams keys and values in blocks (shorter than the key length)."""
    names = _kv_inputs(group)
    return bool(names) and kv is not None and kv < graph.shape_of(names[0])[-1]


def _kv_inputs(group: Group) -> list[str]:
    attn = next((n for n in group.nodes if n.op == ATTENTION_OP), None)
    return [] if attn is None else attn.var_args()[1:3]


def _reuse_axes(group: Group, graph: Graph, axes: list[TileAxis]) -> dict[str, set[int]]:
    """For each external input, the tile axes along which its box changes (it is reloaded when they do)."""
    base = [0] * len(axes)
    boxes0 = region_boxes(group, graph, _tile_box(group.last.shape or [], axes, tuple(base))).inputs
    deps: dict[str, set[int]] = {name: set() for name in boxes0}
    for i, ax in enumerate(axes):
        if ax.count < 2:
            continue
        index = list(base)
        index[i] = 1
        boxes1 = region_boxes(group, graph, _tile_box(group.last.shape or [], axes, tuple(index))).inputs
        for name in deps:
            if boxes1.get(name) != boxes0.get(name):
                deps[name].add(i)
    return deps


def _loads(order: tuple[int, ...], axes: list[TileAxis], dep: set[int]) -> int:
    """How often an input whose box depends on tile axes ``dep`` is loaded with loops nested as ``order``."""
    if not dep:
        return 1
    innermost = max(order.index(d) for d in dep)
    return math.prod(axes[order[i]].count for i in range(innermost + 1))


def plan_region(group: Group, graph: Graph, spec: TargetSpec, sram: int) -> dict[str, Any] | None:
    """The tile shape (and loop order) of ``group`` moving the fewest DRAM bytes whose working set fits
    ``sram``; None when not even the smallest tile fits."""
    out_shape = group.last.shape or []
    axes_spec = _tile_axes(group, graph)
    engine = spec.npu.tensor_engine if spec.npu is not None else (16, 16)
    spatial_rows = len(out_shape) == 4
    options: list[list[int]] = []
    for axis, role in axes_spec:
        size = out_shape[axis]
        if role == "batch":
            options.append(sorted({d for d in range(1, size + 1) if size % d == 0}, reverse=True))
        elif role == "rows":
            options.append(_candidates(size, 1 if spatial_rows else min(engine[0], size)))
        else:
            options.append(_candidates(size, min(engine[1], size)))
    attn = any(n.op == ATTENTION_OP for n in group.nodes)
    kv_options: list[int | None] = [None]
    if attn:
        nk = graph.shape_of(next(n for n in group.nodes if n.op == ATTENTION_OP).var_args()[1])[-1]
        kv_options = list(_candidates(nk, min(engine[0], nk)))
    row_index = next((i for i, (_, role) in enumerate(axes_spec) if role == "rows"), None)
    best: tuple[Any, ...] | None = None
    outer = [opts if i != row_index else [None] for i, opts in enumerate(options)]
    for combo in product(*outer, kv_options):
        fixed, kv = list(combo[:-1]), combo[-1]
        rows_opts = options[row_index] if row_index is not None else [None]

        def evaluate(rows: int | None, fixed: list[Any] = fixed, kv: int | None = kv) -> Any:
            tiles = [rows if i == row_index else t for i, t in enumerate(fixed)]
            axes = [TileAxis(a, out_shape[a], t, r) for (a, r), t in zip(axes_spec, tiles, strict=True)]
            slots = _slot_sizes(group, graph, axes, kv)
            return axes, slots, _layout(group, slots, _streams(group, graph, kv))[1]

        # the largest row tile that fits (working sets shrink with the tile)
        lo, hi, found = 0, len(rows_opts) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            axes, slots, total = evaluate(rows_opts[mid])
            if total <= sram:
                found, hi = (axes, slots, total), mid - 1
            else:
                lo = mid + 1
        if found is None:
            continue
        axes, slots, total = found
        cost, order = _traffic(group, graph, axes, slots, kv)
        tiles = math.prod(a.count for a in axes)
        key = (cost, tiles)
        if best is None or key < best[0]:
            best = (key, axes, slots, total, order, kv)
    if best is None:
        return None
    (cost, tiles), axes, slots, total, order, kv = best
    offsets, _ = _layout(group, slots, _streams(group, graph, kv))
    return {
        "axes": [ax.__dict__ for ax in axes],
        "order": list(order),
        "kv_block": kv,
        "tiles": tiles,
        "working_set": total,
        "slots": {name: [offsets[name], size] for name, size in slots.items()},
        "estimated_dram_bytes": cost,
        "stats_phase": _needs_stats_phase(group, axes),
    }


def _needs_stats_phase(group: Group, axes: list[TileAxis]) -> bool:
    return any(n.op == "relax.nn.group_norm" for n in group.nodes) and any(
        a.count > 1 and a.role != "batch" for a in axes
    )


def _traffic(
    group: Group, graph: Graph, axes: list[TileAxis], slots: dict[str, int], kv: int | None
) -> tuple[int, tuple[int, ...]]:
    """Estimated DRAM bytes of a tiling under its best loop order (inputs reloaded when their box changes)."""
    deps = _reuse_axes(group, graph, axes)
    out_bytes = nbytes(group.last.shape or [], group.last.dtype)
    stats = 0
    gn = next((n for n in group.nodes if n.op == "relax.nn.group_norm"), None)
    if gn is not None and _needs_stats_phase(group, axes):
        stats = nbytes(graph.shape_of(gn.var_args()[0]), graph.dtype_of(gn.var_args()[0]))
    kv_names = set(_kv_inputs(group))
    nk_blocks = 1
    if kv_names and kv:
        nk_blocks = -(-graph.shape_of(_kv_inputs(group)[0])[-1] // kv)
    best: tuple[int, tuple[int, ...]] | None = None
    for order in _orders(len(axes)):
        total = out_bytes + stats
        for name, dep in deps.items():
            per_tile = slots.get(name, 0)
            if name in kv_names and nk_blocks > 1:
                # streamed in key blocks for every query tile
                total += per_tile * nk_blocks * math.prod(a.count for a in axes)
                continue
            total += per_tile * _loads(order, axes, dep)
        if best is None or total < best[0]:
            best = (total, order)
    assert best is not None
    return best


def _orders(n: int) -> list[tuple[int, ...]]:
    from itertools import permutations

    return list(permutations(range(n))) or [()]


def _stats_handoffs(
    groups: list[Group], graph: Graph, sram: int
) -> tuple[dict[str, tuple[str, int, int]], int]:
    """GroupNorms whose input is an NPU region's output: that region can accumulate the statistics while its
    output tiles are on chip, instead of a statistics phase reading the input again. Each such hand-off
    keeps a small buffer alive from the producer to the GroupNorm, at the top of the SRAM (lanes assigned
    by lifetime). Returns {GroupNorm name: (producer's output, offset, bytes)} and the bytes reserved."""
    position = {n.name: i for i, n in enumerate(graph.nodes)}
    producers = {g.last.name for g in groups if g.device == "npu"}
    spans = []
    for group in groups:
        for node in group.nodes:
            data = node.var_args()[0] if node.op == "relax.nn.group_norm" else None
            if data in producers and len(graph.shape_of(data)) == 4 and group.device == "npu":
                size = graph.shape_of(data)[0] * node.attrs["num_groups"] * _STATS_BYTES
                # busy until the GroupNorm's region ends (it frees the buffer then)
                spans.append((position[data], position[group.last.name], node.name, data, size))
    if not spans:
        return {}, 0
    width = max(s[4] for s in spans)
    lanes: list[int] = []  # end position of the hand-off occupying each lane
    handoffs: dict[str, tuple[str, int, int]] = {}
    for start, end, name, data, size in sorted(spans):
        lane = next((i for i, busy in enumerate(lanes) if busy < start), None)
        if lane is None:
            lane = len(lanes)
            lanes.append(end)
        lanes[lane] = end
        handoffs[name] = (data, lane, size)
    reserve = len(lanes) * width
    return {k: (d, sram - reserve + lane * width, size) for k, (d, lane, size) in handoffs.items()}, reserve


def plan_groups(groups: list[Group], graph: Graph, spec: TargetSpec, sram: int) -> list[Group]:
    """Plan every NPU region; a chain that does not fit (or moves more bytes than its parts) is cut at its
    anchors. Raises :class:`SramTooSmallError` naming the op when one op alone cannot be tiled into SRAM."""
    handoffs, reserve = _stats_handoffs(groups, graph, sram)
    planned = _plan_groups(groups, graph, spec, sram - reserve, reserve)
    by_last = {g.last.name: g for g in planned if g.device == "npu"}
    for group in planned:
        first = group.nodes[0]
        if group.device != "npu" or first.name not in handoffs or not group.plan.get("stats_phase"):
            continue
        data, offset, size = handoffs[first.name]
        producer = by_last.get(data)
        if producer is None or producer.id >= group.id:
            continue
        # the producer accumulates the statistics; the GroupNorm's own statistics phase is dropped
        producer.plan.setdefault("stats_out", []).append({"gn": first.name, "offset": offset, "bytes": size})
        group.plan["stats_in"] = {"offset": offset, "bytes": size}
        group.plan["stats_phase"] = False
    return planned


def _plan_groups(
    groups: list[Group], graph: Graph, spec: TargetSpec, sram: int, reserved: int = 0
) -> list[Group]:
    result: list[Group] = []
    for group in groups:
        if group.device == "host":
            result.append(group)
            continue
        plan = plan_region(group, graph, spec, sram)
        parts = split_at_anchors(group)
        if len(parts) > 1:
            part_plans = [plan_region(p, graph, spec, sram) for p in parts]
            if all(p is not None for p in part_plans):
                split_cost = sum(p["estimated_dram_bytes"] for p in part_plans)  # type: ignore[index]
                if plan is None or split_cost < plan["estimated_dram_bytes"]:
                    for part, part_plan in zip(parts, part_plans, strict=True):
                        part.plan = part_plan  # type: ignore[assignment]
                        result.append(part)
                    continue
            elif plan is None:
                # plan the parts separately, each failing part reporting itself
                for part in parts:
                    result.extend(_plan_groups([part], graph, spec, sram, reserved))
                continue
        if plan is None:
            raise _too_small(group, graph, spec, sram, reserved)
        group.plan = plan
        result.append(group)
    for index, group in enumerate(result):
        group.id = index
    return result


def _too_small(
    group: Group, graph: Graph, spec: TargetSpec, sram: int, reserved: int = 0
) -> SramTooSmallError:
    axes_spec = _tile_axes(group, graph)
    out_shape = group.last.shape or []
    engine = spec.npu.tensor_engine if spec.npu is not None else (16, 16)
    axes = []
    for axis, role in axes_spec:
        smallest = (
            1
            if role in ("batch",) or len(out_shape) == 4 and role == "rows"
            else engine[0 if role == "rows" else 1]
        )
        axes.append(TileAxis(axis, out_shape[axis], min(smallest, out_shape[axis]), role))
    kv = min(engine[0], 16) if any(n.op == ATTENTION_OP for n in group.nodes) else None
    slots = _slot_sizes(group, graph, axes, kv)
    need = _layout(group, slots, _streams(group, graph, kv))[1]
    anchor = (group.anchors() or group.nodes)[0]
    weights = [a for a in anchor.var_args() if graph.is_weight(a)]
    weight_part = f", of which a {slots.get(weights[0], 0)}-byte weight tile" if weights else ""
    layer = f" (layer {anchor.layer})" if anchor.layer else ""
    return SramTooSmallError(
        f"SRAM of {sram + reserved} bytes on target {spec.name} is too small for op {anchor.op} "
        f"'{anchor.name}'"
        f"{layer}: its smallest tile needs {need} bytes{weight_part}"
        + (f" ({reserved} bytes of the SRAM hold GroupNorm statistics between regions)" if reserved else "")
    )


# --- program emission ------------------------------------------------------------


def _flops(node: Node, out_box: Box, graph: Graph, kv: int | None = None) -> int:
    elements = math.prod(box_shape(out_box)) if out_box else 1
    if node.op == "relax.nn.conv2d":
        w = graph.shape_of(node.var_args()[1])
        return 2 * elements * w[1] * w[2] * w[3]
    if node.op == "relax.matmul":
        return 2 * elements * graph.shape_of(node.var_args()[0])[-1]
    if node.op == ATTENTION_OP:
        d = graph.shape_of(node.var_args()[0])[-1]
        nk = kv or graph.shape_of(node.var_args()[1])[-1]
        return 2 * elements // max(1, node.shape[-1]) * nk * (d + node.shape[-1])
    if node.op in ("relax.nn.group_norm", "relax.nn.layer_norm", "relax.nn.softmax"):
        return 5 * elements
    return elements


class _Emitter:
    def __init__(self, graph: Graph, sram: int) -> None:
        self.graph = graph
        self.sram = sram
        self.instructions: list[dict[str, Any]] = []
        self.next_buf = 0
        self.handoff: dict[str, int] = {}  # GroupNorm -> statistics buffer its input's producer filled

    def emit(self, **fields: Any) -> None:
        self.instructions.append(fields)

    def buf(self) -> int:
        self.next_buf += 1
        return self.next_buf

    def host(self, group: Group) -> None:
        for node in group.nodes:
            self.emit(i="host", group=group.id, node=node.name)

    def region(self, group: Group) -> None:
        graph, plan = self.graph, group.plan
        gid = group.id
        axes = [TileAxis(**a) for a in plan["axes"]]
        slots = plan["slots"]
        out_shape = group.last.shape or []
        kv = plan.get("kv_block")
        resident: dict[str, tuple[int, Box]] = {}  # input name -> (buffer, box) held across tiles
        kv_inputs = _kv_inputs(group)
        nk = graph.shape_of(kv_inputs[0])[-1] if kv_inputs else 0
        kv_streamed = set(kv_inputs) if kv and kv < nk else set()
        stats_buf = None
        gn = next((n for n in group.nodes if n.op == "relax.nn.group_norm"), None)
        if gn is not None and "stats_in" in plan:
            stats_buf = self.handoff.pop(gn.name)  # accumulated by the region that produced the input
        elif gn is not None:
            stats_buf = self.buf()
            offset, size = slots["@stats"]
            self.emit(i="alloc", group=gid, buf=stats_buf, offset=offset, bytes=size, what="stats")
            if plan["stats_phase"]:
                self._stats_phase(group, gn, stats_buf, slots)
        stats_out = []
        for out in plan.get("stats_out", []):
            b = self.buf()
            self.emit(i="alloc", group=gid, buf=b, offset=out["offset"], bytes=out["bytes"],
                      what=f"statistics for GroupNorm '{out['gn']}'")  # fmt: skip
            self.handoff[out["gn"]] = b
            stats_out.append((out["gn"], b))
        order = plan["order"]
        counts = [ax.count for ax in axes]
        for ordered in product(*[range(counts[o]) for o in order]):
            index = [0] * len(axes)
            for position, o in enumerate(order):
                index[o] = ordered[position]
            out_box = _tile_box(out_shape, axes, tuple(index))
            boxes = region_boxes(group, graph, out_box)
            bufs: dict[str, int] = {}
            for name, box in boxes.inputs.items():
                if name in kv_streamed:
                    continue  # streamed in key blocks below
                held = resident.get(name)
                if held is not None and held[1] == box:
                    bufs[name] = held[0]
                    continue
                if held is not None:
                    self.emit(i="free", group=gid, buf=held[0])
                b = self.buf()
                offset, size = slots[name]
                self.emit(i="dma_in", group=gid, tensor=name, box=box, buf=b, offset=offset,
                          bytes=_box_bytes(box, graph.dtype_of(name)))  # fmt: skip
                resident[name] = (b, box)
                bufs[name] = b
            last_use = _last_uses(group)
            for position, node in enumerate(group.nodes):
                box = boxes.nodes[node.name]
                b = self.buf()
                offset, size = slots[node.name]
                if node.op == ATTENTION_OP:
                    self._attention(group, node, box, boxes, bufs, slots, kv)
                args = [bufs.get(a["var"]) if "var" in a else None for a in node.args]
                extra = {"stats": stats_buf} if node.op == "relax.nn.group_norm" else {}
                if node.op == ATTENTION_OP:
                    extra = {"state": self._state_buf}
                self.emit(i="compute", group=gid, node=node.name, box=box, buf=b, offset=offset,
                          bytes=_box_bytes(box, node.dtype), args=args, flops=0 if node.op == ATTENTION_OP
                          else _flops(node, box, graph), **extra)  # fmt: skip
                if node.op == ATTENTION_OP:
                    self.emit(i="free", group=gid, buf=self._state_buf)
                bufs[node.name] = b
                for arg in set(node.var_args()):
                    if arg in last_use and last_use[arg] == position and arg != group.last.name:
                        self.emit(i="free", group=gid, buf=bufs[arg])
            self.emit(i="dma_out", group=gid, buf=bufs[group.last.name], tensor=group.last.name,
                      box=boxes.nodes[group.last.name], bytes=_box_bytes(boxes.nodes[group.last.name],
                                                                         group.last.dtype))  # fmt: skip
            for gn_name, b in stats_out:  # statistics of the output tile while it is on chip
                self.emit(i="gn_stats", group=gid, node=gn_name, src=bufs[group.last.name], stats=b,
                          flops=3 * math.prod(box_shape(boxes.nodes[group.last.name])))  # fmt: skip
            self.emit(i="free", group=gid, buf=bufs[group.last.name])
            self.emit(i="tile_end", group=gid)
        for b, _ in resident.values():
            self.emit(i="free", group=gid, buf=b)
        if stats_buf is not None:
            self.emit(i="free", group=gid, buf=stats_buf)

    def _stats_phase(self, group: Group, gn: Node, stats_buf: int, slots: dict[str, list[int]]) -> None:
        """GroupNorm statistics over row bands of its input, merged into the stats buffer."""
        graph = self.graph
        src = gn.var_args()[0]
        shape = graph.shape_of(src)
        dtype = graph.dtype_of(src)
        # the phase runs alone: the whole SRAM but the stats buffer is free for the band
        budget = self.sram - slots["@stats"][0] - slots["@stats"][1]
        row_bytes = nbytes([shape[0], shape[1], 1, *shape[3:]], dtype)
        rows = max(1, min(shape[2], budget // max(1, row_bytes)))
        offset = slots["@stats"][0] + slots["@stats"][1]
        for lo in range(0, shape[2], rows):
            box = [[0, shape[0]], [0, shape[1]], [lo, min(shape[2], lo + rows)], *[[0, d] for d in shape[3:]]]
            b = self.buf()
            self.emit(i="dma_in", group=group.id, tensor=src, box=box, buf=b, offset=offset,
                      bytes=_box_bytes(box, dtype))  # fmt: skip
            self.emit(i="gn_stats", group=group.id, node=gn.name, src=b, stats=stats_buf,
                      flops=3 * math.prod(box_shape(box)))  # fmt: skip
            self.emit(i="free", group=group.id, buf=b)
            self.emit(i="tile_end", group=group.id)

    def _attention(self, group: Group, node: Node, out_box: Box, boxes: TileBoxes, bufs: dict[str, int],
                   slots: dict[str, list[int]], kv: int | None) -> None:  # fmt: skip
        """Flash attention for one query tile: stream key/value blocks, keep the online-softmax state."""
        graph = self.graph
        q, kt, v = node.var_args()
        nk = graph.shape_of(kt)[-1]
        state = self.buf()
        offset, size = slots["@state"]
        self.emit(i="alloc", group=group.id, buf=state, offset=offset, bytes=size, what="attention state")
        self._state_buf = state
        kv = kv or nk
        for lo in range(0, nk, kv):
            hi = min(nk, lo + kv)
            held = []
            for name, axis in ((kt, 2), (v, 1)):
                box = [list(r) for r in boxes.inputs[name]]
                box[axis] = [lo, hi]
                if kv == nk and name in bufs:
                    held.append(bufs[name])
                    continue
                b = self.buf()
                offset, _ = slots[name]
                self.emit(i="dma_in", group=group.id, tensor=name, box=box, buf=b, offset=offset,
                          bytes=_box_bytes(box, graph.dtype_of(name)))  # fmt: skip
                held.append(b)
            so, ss = slots["@scores"]
            self.emit(i="attn_block", group=group.id, node=node.name, q=bufs[q], kt=held[0], v=held[1],
                      state=state, scratch=[so, ss],
                      flops=_flops(node, out_box, graph, hi - lo))  # fmt: skip
            if not (kv == nk and kt in bufs):
                for b in held:
                    self.emit(i="free", group=group.id, buf=b)


def build_program(graph: Graph, groups: list[Group], spec: TargetSpec, sram: int) -> dict[str, Any]:
    """The NPU program: the graph (ops, shapes), the regions and their plans, and the instruction list."""
    emitter = _Emitter(graph, sram)
    for group in groups:
        if group.device == "host":
            emitter.host(group)
        else:
            emitter.region(group)
    return {
        "version": PROGRAM_VERSION,
        "target": spec.name,
        "sram_bytes": sram,
        "peak_flops": {k: v * 1e9 for k, v in spec.compute.peak_gflops.items()},
        "dram_bytes_per_second": spec.memory.dram_bandwidth_gbps * 1e9,
        "dma_bytes_per_second": (spec.npu.dma_bandwidth_gbps if spec.npu else spec.memory.dram_bandwidth_gbps)
        * 1e9,
        "graph": graph.to_dict(),
        "groups": [
            {
                "id": g.id,
                "device": g.device,
                "block": g.block,
                "nodes": [n.name for n in g.nodes],
                "plan": g.plan,
            }  # fmt: skip
            for g in groups
        ],
        "instructions": emitter.instructions,
    }


# --- untiled baselines and the memory analysis ----------------------------------------


def op_by_op_bytes(graph: Graph) -> dict[str, int]:
    """DRAM bytes per block when every op reads its inputs from and writes its output to DRAM (aliases are
    free)."""
    per_block: dict[str, int] = {}
    for node in graph.nodes:
        if node.weight or node.op in ALIAS_OPS:
            continue
        total = 0
        for arg in node.var_args():
            total += (
                nbytes(graph.shape_of(arg), graph.dtype_of(arg)) if graph.shape_of(arg) is not None else 0
            )
        if node.shape is not None:
            total += nbytes(node.shape, node.dtype)
        else:  # split: its outputs are its input's bytes
            total += nbytes(graph.shape_of(node.var_args()[0]), graph.dtype_of(node.var_args()[0]))
        per_block[node.block] = per_block.get(node.block, 0) + total
    return per_block


def region_memory(group: Group, graph: Graph) -> dict[str, Any]:
    """Bytes of a region's inputs, weights, outputs and on-chip scratch (whole tensors, at their dtypes)."""
    names = group.names
    inputs = weights = 0
    seen: set[str] = set()
    for node in group.nodes:
        for arg in node.var_args():
            if arg in names or arg in seen:
                continue
            seen.add(arg)
            size = nbytes(graph.shape_of(arg), graph.dtype_of(arg))
            if graph.is_weight(arg):
                weights += size
            else:
                inputs += size
    outputs = nbytes(group.last.shape or [], group.last.dtype)
    scratch = sum(nbytes(n.shape or [], n.dtype) for n in group.nodes[:-1])
    for node in group.nodes:
        if node.op == ATTENTION_OP:  # the scores an untiled attention would hold
            q = graph.shape_of(node.var_args()[0])
            scratch += q[0] * q[1] * graph.shape_of(node.var_args()[1])[-1] * 4
    return {"inputs": inputs, "weights": weights, "outputs": outputs, "scratch": scratch,
            "total": inputs + weights + outputs + scratch}  # fmt: skip


def fused_bytes(groups: list[Group], graph: Graph) -> dict[str, int]:
    """DRAM bytes per block of untiled execution of fused regions (each reads its inputs and writes its output
    once, whole): what op fusion alone saves, without tiling."""
    per_block: dict[str, int] = {}
    for group in groups:
        memory = region_memory(group, graph)
        total = memory["inputs"] + memory["weights"] + memory["outputs"]
        per_block[group.block] = per_block.get(group.block, 0) + total
    return per_block
