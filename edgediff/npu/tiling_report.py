"""The tiling analysis for people: DRAM bytes per model block untiled vs tiled, as a table and a PNG.

Per block (down_blocks_0, mid_block, ...): DRAM bytes of op-by-op execution (every op reads its inputs from
and writes its output to DRAM), of fused regions executed untiled (what op fusion alone saves), of the tiled
NPU program (simulated), the weight-streaming floor (each weight read once), the SRAM peak and the
estimated time (roofline of compute and DMA). The PNG reuses the precision report's pixel font and the
runtime's PNG encoder (no plotting library).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgediff.npu.graph import Graph, nbytes
from edgediff.npu.simulator import SimulationResult
from edgediff.npu.tile_planner import Group, form_groups, fused_bytes, op_by_op_bytes, region_memory
from edgediff.precision.assignment import format_bytes
from edgediff.precision.report import _text
from edgediff.runtime.image import encode_png

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

PROGRAM_FILE = "npu_program.json"
REPORT_FILE = "tiling/report.txt"
PLOT_FILE = "tiling/plot.png"
COLUMNS = ("op_by_op", "fused", "tiled", "floor")
COLORS = {"op_by_op": (200, 70, 60), "fused": (240, 170, 60), "tiled": (60, 120, 220), "floor": (90, 90, 90)}


@dataclass
class BlockRow:
    block: str
    op_by_op: int = 0
    fused: int = 0
    tiled: int = 0
    floor: int = 0  # weights once + the block's model inputs/outputs
    sram_peak: int = 0
    seconds: float = 0.0
    tiles: int = 0
    overflowing_ops: int = 0  # regions whose untiled working set exceeds the SRAM


@dataclass
class TilingAnalysis:
    target: str
    sram_bytes: int
    rows: list[BlockRow]
    regions: list[dict[str, Any]] = field(default_factory=list)

    def total(self) -> BlockRow:
        total = BlockRow("total")
        for row in self.rows:
            for name in (*COLUMNS, "seconds", "tiles", "overflowing_ops"):
                setattr(total, name, getattr(total, name) + getattr(row, name))
            total.sram_peak = max(total.sram_peak, row.sram_peak)
        return total

    def summary(self) -> str:
        t = self.total()
        return (
            f"DRAM per step: op-by-op {format_bytes(t.op_by_op)}, fused untiled {format_bytes(t.fused)}, "
            f"tiled {format_bytes(t.tiled)} ({t.op_by_op / max(1, t.tiled):.2f}x less than op-by-op, "
            f"floor {format_bytes(t.floor)}); SRAM peak {format_bytes(t.sram_peak)} of "
            f"{format_bytes(self.sram_bytes)}; {t.tiles} tiles; est. {t.seconds * 1e3:.3g} ms"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "sram_bytes": self.sram_bytes,
            "summary": self.summary(),
            "blocks": [row.__dict__ for row in self.rows],
            "total": self.total().__dict__,
        }


def analyse(graph: Graph, groups: list[Group], spec: TargetSpec, result: SimulationResult, sram: int,
            unfused: Graph | None = None) -> TilingAnalysis:  # fmt: skip
    """Per-block rows from a planned graph and the simulation of its program.

    ``unfused``: the graph before attention fusion, for the op-by-op baseline (its scores are real tensors).
    """
    rows: dict[str, BlockRow] = {}

    def row(block: str) -> BlockRow:
        return rows.setdefault(block, BlockRow(block))

    for block, value in op_by_op_bytes(unfused or graph).items():
        row(block).op_by_op += value
    for block, value in fused_bytes(
        form_groups(unfused or graph, spec, chain=False), unfused or graph
    ).items():
        row(block).fused += value
    regions = []
    seen_weights: set[str] = set()
    for group in groups:
        stats = result.groups.get(group.id)
        r = row(group.block)
        if stats is not None:
            r.tiled += stats.dram_read + stats.dram_write
            r.seconds += stats.seconds
            r.tiles += stats.tiles
            r.sram_peak = max(r.sram_peak, stats.sram_peak)
        memory = region_memory(group, graph)
        for node in group.nodes:
            for arg in node.var_args():
                if graph.is_weight(arg) and arg not in seen_weights:
                    seen_weights.add(arg)
                    r.floor += nbytes(graph.shape_of(arg), graph.dtype_of(arg))
        if group.device == "npu" and memory["total"] > sram:
            r.overflowing_ops += 1
        regions.append(
            {
                "id": group.id,
                "block": group.block,
                "device": group.device,
                "ops": [n.op.removeprefix("relax.") for n in group.nodes],
                "layer": next((n.layer for n in group.nodes if n.layer), ""),
                "memory": memory,
                "overflows_sram": memory["total"] > sram,
                "tiles": (group.plan or {}).get("tiles", 0),
                "tile": {a["role"]: a["tile"] for a in (group.plan or {}).get("axes", [])},
                "working_set": (group.plan or {}).get("working_set", 0),
                "dram_bytes": 0 if stats is None else stats.dram_read + stats.dram_write,
            }
        )
    io = sum(nbytes(t.shape, t.dtype) for t in graph.inputs) + nbytes(
        graph.shape_of(graph.output), graph.dtype_of(graph.output)
    )
    ordered = list(rows.values())
    if ordered:
        ordered[0].floor += io  # the model's inputs and output cross DRAM once, whatever the tiling
    return TilingAnalysis(spec.name, sram, ordered, regions)


def render_text(analysis: TilingAnalysis) -> str:
    """The per-block table (bytes in MB = 1e6) and the largest regions that overflow the SRAM untiled."""
    width = max([len(r.block) for r in analysis.rows] + [8])
    header = (
        f"{'block':<{width}}  {'op-by-op MB':>11} {'fused MB':>9} {'tiled MB':>9} {'ratio':>6} "
        f"{'floor MB':>9} {'SRAM peak':>10} {'est. ms':>8} {'tiles':>6}"
    )
    lines = [f"model-level tiling for {analysis.target}, SRAM {format_bytes(analysis.sram_bytes)}",
             "  " + analysis.summary(), "", header, "-" * len(header)]  # fmt: skip
    for r in [*analysis.rows, analysis.total()]:
        if r.block == "total":
            lines.append("-" * len(header))
        lines.append(
            f"{r.block:<{width}}  {r.op_by_op / 1e6:>11.1f} {r.fused / 1e6:>9.1f} {r.tiled / 1e6:>9.1f} "
            f"{_ratio(r.op_by_op, r.tiled):>6} {r.floor / 1e6:>9.1f} {format_bytes(r.sram_peak):>10} "
            f"{r.seconds * 1e3:>8.3f} {r.tiles:>6}"
        )
    overflow = sorted(
        (x for x in analysis.regions if x["overflows_sram"]), key=lambda x: -x["memory"]["total"]
    )
    if overflow:
        lines += ["", f"regions whose untiled working set overflows the SRAM ({len(overflow)}; largest 15):"]
        for x in overflow[:15]:
            m = x["memory"]
            lines.append(
                f"  {x['layer'] or x['block']}: {'+'.join(x['ops'][:4])}: in {format_bytes(m['inputs'])}, "
                f"weights {format_bytes(m['weights'])}, out {format_bytes(m['outputs'])}, scratch "
                f"{format_bytes(m['scratch'])} -> {x['tiles']} tiles {x['tile']}, working set "
                f"{format_bytes(x['working_set'])}"
            )
    return "\n".join(lines) + "\n"


def _ratio(untiled: int, tiled: int) -> str:
    # a region spanning two blocks is counted in the block of its last op: no ratio for a block without one
    return f"{untiled / tiled:.1f}x" if tiled else "-"


def render_plot(analysis: TilingAnalysis) -> np.ndarray:
    """Grouped bars per block: op-by-op, fused, tiled DRAM bytes and the weight floor."""
    rows = analysis.rows
    margin, label_h, bars_h = 12, 60, 220
    bar = 6
    group_w = bar * len(COLUMNS) + 8
    width = max(margin * 2 + 60 + group_w * len(rows), 720)
    height = margin + 24 + bars_h + label_h + 40
    canvas = np.full((height, width, 3), 255, np.uint8)
    ink = (20, 20, 20)
    _text(canvas, margin, margin, f"dram bytes per block, {analysis.target} sram "
          f"{format_bytes(analysis.sram_bytes)}", ink)  # fmt: skip
    largest = max([max(getattr(r, c) for c in COLUMNS) for r in rows] + [1])
    y0 = margin + 24
    x0 = margin + 60
    _text(canvas, margin, y0, f"{largest / 1e6:.0f}mb", ink, scale=1)
    canvas[y0 + bars_h, x0 - 4 : width - margin] = ink
    for i, r in enumerate(rows):
        x = x0 + i * group_w
        for j, column in enumerate(COLUMNS):
            h = int(round(bars_h * getattr(r, column) / largest))
            if h:
                canvas[y0 + bars_h - h : y0 + bars_h, x + j * bar : x + (j + 1) * bar - 1] = COLORS[column]
        for k, line in enumerate(_abbreviate(r.block)):
            _text(canvas, x, y0 + bars_h + 4 + k * 8, line, ink, scale=1)
    y = y0 + bars_h + label_h
    x = margin
    for column in COLUMNS:
        canvas[y : y + 10, x : x + 10] = COLORS[column]
        x = _text(canvas, x + 14, y + 1, column.replace("_", "-"), ink) + 12
    return canvas


def _abbreviate(block: str) -> list[str]:
    parts = block.replace("down_blocks", "down").replace("up_blocks", "up").replace("mid_block", "mid")
    return [p[:6] for p in parts.split("_")][:3]


def write_report(directory: Path, analysis: TilingAnalysis, program: dict[str, Any]) -> dict[str, Any]:
    """Write npu_program.json, the table and the PNG into an artifact; return the manifest record."""
    (directory / REPORT_FILE).parent.mkdir(parents=True, exist_ok=True)
    (directory / PROGRAM_FILE).write_text(json.dumps(program, separators=(",", ":")))
    (directory / REPORT_FILE).write_text(render_text(analysis))
    (directory / PLOT_FILE).write_bytes(encode_png(render_plot(analysis)))
    return {
        "program": PROGRAM_FILE,
        "instructions": len(program["instructions"]),
        "report": REPORT_FILE,
        "plot": PLOT_FILE,
        **analysis.to_dict(),
    }
