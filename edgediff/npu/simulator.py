"""Execute an NPU program (``npu_program.json``): SRAM checked, DRAM bytes and roofline time counted.

The simulator models the NPU the planner targets: a scratchpad of ``sram_bytes`` that every buffer must lie
in (at the offset the program gives, never overlapping a live buffer), and DMA between it and DRAM. It
refuses a program whose buffer leaves the SRAM or overlaps another, with the op and the bytes. With tensors
it also computes: each tile's ops run as numpy kernels on the tile's buffers, so the tiled result can be
compared with the untiled model. Without tensors it only counts (the full-size analysis of a UNet).

Time is a roofline per tile: max(compute at the target's peak, DMA bytes at its DMA bandwidth), as when
the DMA of the next tile overlaps the compute of this one; host ops cost their DRAM bytes at DRAM bandwidth.
numpy only: no TVM, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgediff.errors import EdgediffError
from edgediff.npu import kernels
from edgediff.npu.graph import ATTENTION_OP, VIEW_OPS, Graph, nbytes
from edgediff.npu.kernels import Box


class SramOverflowError(EdgediffError):
    """An NPU program put a buffer outside the SRAM or over a live buffer."""


@dataclass
class Buffer:
    offset: int
    bytes: int
    box: Box | None = None
    array: Any = None


@dataclass
class GroupStats:
    dram_read: int = 0
    dram_write: int = 0
    seconds: float = 0.0
    tiles: int = 0
    sram_peak: int = 0


@dataclass
class SimulationResult:
    output: Any
    dram_read: int
    dram_write: int
    sram_peak: int
    seconds: float
    tiles: int
    largest_tile_bytes: int
    groups: dict[int, GroupStats] = field(default_factory=dict)

    @property
    def dram_bytes(self) -> int:
        return self.dram_read + self.dram_write


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(lo, hi) for lo, hi in box)


def _relative(box: Box, within: Box) -> tuple[slice, ...]:
    return tuple(slice(lo - wlo, hi - wlo) for (lo, hi), (wlo, _) in zip(box, within, strict=True))


class Simulator:
    """Runs one program; ``weights`` (name -> array) and ``inputs`` are needed only to compute values."""

    def __init__(self, program: dict[str, Any], weights: dict[str, Any] | None = None) -> None:
        self.program = program
        self.graph = Graph.from_dict(program["graph"])
        self.weights = weights
        self.sram = int(program["sram_bytes"])
        self.peak = float(program["peak_flops"].get("float16") or max(program["peak_flops"].values()))
        self.dma_bw = float(program["dma_bytes_per_second"])
        self.dram_bw = float(program["dram_bytes_per_second"])
        self.groups = {g["id"]: g for g in program["groups"]}

    # --- DRAM ---------------------------------------------------------------------------------------------

    def _tensor(self, name: str) -> Any:
        if name in self.dram:
            return self.dram[name]
        node = self.graph.by_name.get(name)
        if node is None:
            raise SramOverflowError(f"program reads tensor '{name}' that is neither input nor weight")
        if not (node.weight or node.op in VIEW_OPS):
            raise SramOverflowError(f"program reads '{name}' before any instruction wrote it")
        value = self._evaluate_whole(node)
        self.dram[name] = value
        return value

    def _resolve(self, arg: dict[str, Any]) -> Any:
        if "var" in arg:
            return self._tensor(arg["var"])
        if "const" in arg:
            return np.asarray(arg["const"], dtype=arg["dtype"])
        if "shape" in arg:
            return list(arg["shape"])
        if "tuple" in arg:
            return [self._resolve(a) for a in arg["tuple"]]
        return arg.get("value")

    def _evaluate_whole(self, node: Any) -> Any:
        args = [self._resolve(a) for a in node.args]
        extra = None
        return kernels.evaluate(node.op, node.attrs, args, node.shape, node.dtype, extra=extra)

    # --- SRAM ---------------------------------------------------------------------------------------------

    def _place(self, inst: dict[str, Any], offset: int, size: int, what: str) -> None:
        end = offset + size
        if offset < 0 or end > self.sram:
            raise SramOverflowError(
                f"{what} of group {inst.get('group')} ({self._op(inst)}) needs SRAM bytes [{offset}, {end}), "
                f"beyond the {self.sram}-byte SRAM"
            )
        for buf_id, buf in self.live.items():
            if offset < buf.offset + buf.bytes and buf.offset < end:
                raise SramOverflowError(
                    f"{what} of group {inst.get('group')} ({self._op(inst)}) at SRAM [{offset}, {end}) "
                    "overlaps "
                    f"live buffer {buf_id} at [{buf.offset}, {buf.offset + buf.bytes})"
                )
        self.high_water = max(self.high_water, end)
        self.group_peak = max(self.group_peak, end)

    def _op(self, inst: dict[str, Any]) -> str:
        group = self.groups.get(inst.get("group"))
        if "node" in inst:
            node = self.graph.by_name[inst["node"]]
            return f"{node.op} '{node.name}'" + (f" in {node.layer}" if node.layer else "")
        return f"ops {', '.join(group['nodes'][:2])}" if group else "?"

    def _alloc(self, inst: dict[str, Any], size: int, box: Box | None, array: Any, what: str) -> None:
        self._place(inst, inst["offset"], size, what)
        self.live[inst["buf"]] = Buffer(inst["offset"], size, box, array)

    # --- run ----------------------------------------------------------------------------------------------

    def run(self, inputs: dict[str, Any] | None = None) -> SimulationResult:
        """Execute the program; with ``inputs`` (and weights) compute the output too."""
        compute = inputs is not None
        if compute and self.weights is None:
            raise ValueError("computing values needs the weights")
        self.compute = compute
        self.dram: dict[str, Any] = {}
        if compute:
            self.dram.update({k: np.asarray(v) for k, v in inputs.items()})
            self.dram.update(self.weights)
        self.live: dict[int, Buffer] = {}
        self.high_water = 0
        self.group_peak = 0
        stats: dict[int, GroupStats] = {}
        tile_flops, tile_dma = 0, 0
        largest = 0
        current = None
        for inst in self.program["instructions"]:
            kind = inst["i"]
            gid = inst.get("group")
            gs = stats.setdefault(gid, GroupStats())
            if gid != current:
                self.group_peak = 0
                current = gid
            if kind == "dma_in":
                dtype = self.graph.dtype_of(inst["tensor"])
                size = nbytes(kernels.box_shape(inst["box"]), dtype)
                array = self._tensor(inst["tensor"])[_slices(inst["box"])].copy() if compute else None
                self._alloc(inst, size, inst["box"], array, f"DMA of '{inst['tensor']}'")
                gs.dram_read += size
                tile_dma += size
            elif kind == "alloc":
                self._alloc(inst, inst["bytes"], None, None, inst.get("what", "buffer"))
            elif kind == "compute":
                node = self.graph.by_name[inst["node"]]
                size = nbytes(kernels.box_shape(inst["box"]), node.dtype)
                self._place(inst, inst["offset"], size, "output")
                array = self._compute(node, inst) if compute else None
                self.live[inst["buf"]] = Buffer(inst["offset"], size, inst["box"], array)
                tile_flops += inst.get("flops", 0)
            elif kind == "attn_block":
                so, ss = inst["scratch"]
                self._place(inst, so, ss, "attention scores")
                if compute:
                    node = self.graph.by_name[inst["node"]]
                    state = self.live[inst["state"]]
                    q, kt, v = (self.live[inst[k]].array for k in ("q", "kt", "v"))
                    state.array = kernels.attention_block(q, kt, v, state.array, node.attrs)
                tile_flops += inst.get("flops", 0)
            elif kind == "gn_stats":
                if compute:
                    node = self.graph.by_name[inst["node"]]
                    src = self.live[inst["src"]]
                    total = self.graph.shape_of(node.var_args()[0])[1]
                    part = kernels.group_norm_stats(
                        src.array, node.attrs["num_groups"], range(*src.box[1]), total
                    )
                    buf = self.live[inst["stats"]]
                    buf.array = part if buf.array is None else kernels.merge_stats(buf.array, part)
                tile_flops += inst.get("flops", 0)
            elif kind == "dma_out":
                buf = self.live[inst["buf"]]
                dtype = self.graph.dtype_of(inst["tensor"])
                size = nbytes(kernels.box_shape(inst["box"]), dtype)
                if compute:
                    if inst["tensor"] not in self.dram:
                        shape = self.graph.shape_of(inst["tensor"])
                        self.dram[inst["tensor"]] = np.zeros(shape, kernels._np_dtype(dtype))
                    self.dram[inst["tensor"]][_slices(inst["box"])] = buf.array[
                        _relative(inst["box"], buf.box)
                    ]
                gs.dram_write += size
                tile_dma += size
            elif kind == "free":
                self.live.pop(inst["buf"], None)
            elif kind == "tile_end":
                gs.seconds += max(tile_flops / self.peak, tile_dma / self.dma_bw)
                gs.tiles += 1
                largest = max(largest, sum(b.bytes for b in self.live.values()))
                tile_flops = tile_dma = 0
            elif kind == "host":
                node = self.graph.by_name[inst["node"]]
                read = sum(
                    nbytes(self.graph.shape_of(a), self.graph.dtype_of(a))
                    for a in node.var_args()
                    if self.graph.shape_of(a) is not None
                )
                written = nbytes(node.shape, node.dtype) if node.shape is not None else 0
                if compute:
                    self.dram[node.name] = self._evaluate_whole(node)
                gs.dram_read += read
                gs.dram_write += written
                gs.seconds += (read + written) / self.dram_bw
            else:
                raise SramOverflowError(f"unknown NPU instruction {kind!r}")
            gs.sram_peak = max(gs.sram_peak, self.group_peak)
        output = self._tensor(self.graph.output) if compute else None
        return SimulationResult(
            output=output,
            dram_read=sum(s.dram_read for s in stats.values()),
            dram_write=sum(s.dram_write for s in stats.values()),
            sram_peak=self.high_water,
            seconds=sum(s.seconds for s in stats.values()),
            tiles=sum(s.tiles for s in stats.values()),
            largest_tile_bytes=largest,
            groups=stats,
        )

    def _compute(self, node: Any, inst: dict[str, Any]) -> Any:
        from edgediff.npu.tile_planner import arg_boxes

        out_box = inst["box"]
        if node.op == ATTENTION_OP:
            return kernels.attention_finish(self.live[inst["state"]].array, node.dtype)
        if node.op in VIEW_OPS:  # a reshape inside a region re-labels the tile's axes
            arg = self.live[inst["args"][0]]
            need = arg_boxes(node, out_box, self.graph)[0]
            return arg.array[_relative(need, arg.box)].reshape(kernels.box_shape(out_box))
        needs = arg_boxes(node, out_box, self.graph)
        args, boxes = [], []
        for arg, need, buf_id in zip(node.args, needs, inst["args"], strict=True):
            if "var" not in arg:
                args.append(self._resolve(arg))
                boxes.append(None)
                continue
            buf = self.live[buf_id]
            args.append(buf.array[_relative(need, buf.box)])
            boxes.append(need)
        extra = None
        if node.op == "relax.nn.group_norm":
            stats = self.live[inst["stats"]].array
            # None: no statistics phase ran, the tile holds whole samples and its own statistics are exact
            extra = None if stats is None else stats[out_box[0][0] : out_box[0][1]]
        elif node.op == "relax.image.resize2d":
            extra = self.graph.shape_of(node.var_args()[0])[2:4]
        return kernels.evaluate(node.op, node.attrs, args, node.shape, node.dtype, out_box, boxes, extra)


def run_reference(graph: Graph, inputs: dict[str, Any], weights: dict[str, Any]) -> Any:
    """The untiled model: every op on whole tensors, with the same kernels."""
    values: dict[str, Any] = {k: np.asarray(v) for k, v in {**inputs, **weights}.items()}

    def resolve(arg: dict[str, Any]) -> Any:
        if "var" in arg:
            return values[arg["var"]]
        if "const" in arg:
            return np.asarray(arg["const"], dtype=arg["dtype"])
        if "shape" in arg:
            return list(arg["shape"])
        if "tuple" in arg:
            return [resolve(a) for a in arg["tuple"]]
        return arg.get("value")

    for node in graph.nodes:
        values[node.name] = kernels.evaluate(
            node.op, node.attrs, [resolve(a) for a in node.args], node.shape, node.dtype
        )
    return values[graph.output]
