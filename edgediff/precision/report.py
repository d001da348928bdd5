"""A precision plan for people: a text table and a PNG of sensitivity and chosen format per layer.

The PNG is drawn with numpy and written by the runtime's own PNG encoder (no plotting library): a heatmap
of the measured SQNR of every layer (columns, in execution order) at every candidate format (rows), the
chosen format of each layer as a coloured strip, and each layer's weight bytes at the chosen format
against the float ones. Labels use a 3x5 pixel font drawn below.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgediff.precision.assignment import format_bytes
from edgediff.precision.overflow import OverflowGuard
from edgediff.precision.plan import PrecisionPlan
from edgediff.precision.quantizers import FORMATS, MAX_SQNR_DB
from edgediff.runtime.image import encode_png

REPORT_FILE = "precision/report.txt"
PLOT_FILE = "precision/plot.png"

FORMAT_COLORS = {
    "fp32": (90, 90, 110),
    "fp16": (60, 120, 220),
    "fp16-acc16": (30, 80, 170),
    "bf16": (80, 190, 220),
    "w8": (40, 170, 90),
    "w8a8": (240, 150, 40),
    "w8a8-token": (230, 210, 60),
    "w4": (210, 60, 60),
    "a8": (150, 80, 200),
}
SQNR_RANGE = (10.0, 80.0)  # heatmap colour scale: dark red at or below 10 dB, green at or above 80 dB

# 3x5 glyphs, rows top to bottom ('#' = ink); lower case is drawn as upper case.
_FONT = {
    "A": ".#.#.#####.##.#", "B": "##.#.###.#.###.", "C": ".###..#..#...##", "D": "##.#.##.##.###.",
    "E": "####..##.#..###", "F": "####..##.#..#..", "G": ".###..#.##.#.##", "H": "#.##.#####.##.#",
    "I": "###.#..#..#.###", "J": "..#..#..##.#.#.", "K": "#.##.###.#.##.#", "L": "#..#..#..#..###",
    "M": "#.########.##.#", "N": "##.#.##.##.##.#", "O": "####.##.##.####", "P": "##.#.###.#..#..",
    "Q": "####.##.####..#", "R": "##.#.###.#.##.#", "S": ".###...#...###.", "T": "###.#..#..#..#.",
    "U": "#.##.##.##.####", "V": "#.##.##.##.#.#.", "W": "#.##.########.#", "X": "#.##.#.#.#.##.#",
    "Y": "#.##.#.#..#..#.", "Z": "###..#.#.#..###", "0": "####.##.##.####", "1": ".#.##..#..#.###",
    "2": "##...#.#.#..###", "3": "##...#.#...###.", "4": "#.##.####..#..#", "5": "####..##...###.",
    "6": ".###..####.####", "7": "###..#.#..#..#.", "8": "####.#####.####", "9": "####.####..###.",
    " ": "...............", ".": ".............#.", "-": "......###......", ":": "....#.....#....",
    "/": "..#..#.#.#..#..", "(": ".#.#..#..#...#.", ")": ".#...#..#..#.#.", "=": "...###...###...",
    "%": "#.#..#.#.#..#.#", ",": "..........#.#..", "_": "............###", ">": "#...#...#.#.#..",
    "<": "..#.#.#...#...#", "+": "....#.###.#....",
}  # fmt: skip
_GLYPHS = {k: np.array([c == "#" for c in v], bool).reshape(5, 3) for k, v in _FONT.items()}


def _text(canvas: np.ndarray, x: int, y: int, text: str, color: tuple[int, int, int], scale: int = 2) -> int:
    """Draw ``text`` with its top-left corner at (x, y); returns the x after the last character."""
    for char in text.upper():
        glyph = _GLYPHS.get(char, _GLYPHS[" "])
        block = np.kron(glyph, np.ones((scale, scale), bool))
        h, w = block.shape
        if y + h <= canvas.shape[0] and x + w <= canvas.shape[1]:
            canvas[y : y + h, x : x + w][block] = color
        x += 4 * scale
    return x


def _sqnr_color(value: float) -> np.ndarray:
    t = float(np.clip((value - SQNR_RANGE[0]) / (SQNR_RANGE[1] - SQNR_RANGE[0]), 0.0, 1.0))
    low, mid, high = np.array([150, 20, 30]), np.array([240, 210, 60]), np.array([40, 160, 70])
    return (low + (mid - low) * t * 2) if t < 0.5 else (mid + (high - mid) * (t - 0.5) * 2)


def render_plot(plan: PrecisionPlan) -> np.ndarray:
    """The plan as an HWC uint8 image."""
    layers = plan.layers
    formats = [f for f in FORMATS if any(f in layer.sqnr_db or f == layer.format for layer in layers)]
    timesteps = plan.calibration.get("kept_timesteps") or []
    steps = (
        len(timesteps)
        if timesteps and all(len(layer.sqnr_per_step) == len(timesteps) for layer in layers)
        else 0
    )
    cell = max(2, min(12, 1400 // max(1, len(layers))))
    row_h, label_w, margin, gap, bars_h = 14, 110, 10, 12, 90
    width = max(label_w + cell * len(layers) + 2 * margin, 760)
    height = margin + 24 + row_h * (len(formats) + 1 + steps) + 3 * gap + bars_h + 2 * 20 + margin
    canvas = np.full((height, width, 3), 255, np.uint8)
    ink = (20, 20, 20)
    t = plan.totals
    title = f"precision plan ({plan.mode}) for {plan.target}: {format_bytes(t.get('bytes', 0))} of weights"
    if t.get("measured_sqnr_db") is not None:
        title += f", prediction sqnr {t['measured_sqnr_db']:.1f} db"
    _text(canvas, margin, margin, title, ink)
    x0 = margin + label_w

    def row(y: int, label: str, colors: list[Any]) -> None:
        _text(canvas, margin, y + 2, label, ink)
        for c, color in enumerate(colors):
            canvas[y : y + row_h - 1, x0 + c * cell : x0 + (c + 1) * cell] = color

    # heatmap: measured SQNR per (format, layer); the chosen cell gets a dark frame
    y = margin + 24
    for fmt in formats:
        blank = (240, 240, 240)
        row(y, fmt, [_sqnr_color(lp.sqnr_db[fmt]) if fmt in lp.sqnr_db else blank for lp in layers])
        for c, layer in enumerate(layers):
            if fmt == layer.format and cell >= 3:
                x = x0 + c * cell
                canvas[y : y + row_h - 1, x] = canvas[y : y + row_h - 1, x + cell - 1] = ink
                canvas[y, x : x + cell] = canvas[y + row_h - 2, x : x + cell] = ink
        y += row_h
    y += gap
    row(y, "chosen", [FORMAT_COLORS.get(layer.format, ink) for layer in layers])
    y += row_h + gap
    # the chosen format's SQNR at each kept timestep: how sensitivity moves along the trajectory (random
    # inputs for models that are not denoisers)
    for i in range(steps):
        label = f"t={timesteps[i]:g}" if timesteps[i] is not None else f"input {i + 1}"
        row(y, label, [_sqnr_color(layer.sqnr_per_step[i]) for layer in layers])
        y += row_h
    y += gap
    # weight bytes per layer: float (grey) behind chosen (format colour)
    _text(canvas, margin, y, "bytes", ink)
    largest = max([layer.float_bytes for layer in layers] + [1])
    for c, layer in enumerate(layers):
        x = x0 + c * cell
        for value, color in (
            (layer.float_bytes, (210, 210, 210)),
            (layer.bytes, FORMAT_COLORS.get(layer.format)),
        ):
            h = int(round(bars_h * value / largest))
            if h:
                canvas[y + bars_h - h : y + bars_h, x : x + max(1, cell - 1)] = color
    y += bars_h + gap
    x = margin
    for fmt in formats:
        canvas[y : y + 10, x : x + 10] = FORMAT_COLORS.get(fmt, ink)
        x = _text(canvas, x + 14, y + 1, fmt, ink) + 12
    _text(
        canvas,
        margin,
        y + 20,
        f"sqnr colours: {SQNR_RANGE[0]:g} db (red) to {SQNR_RANGE[1]:g} db (green)",
        ink,
    )
    return canvas


def render_text(plan: PrecisionPlan) -> str:
    """The plan as a readable table: totals, then one line per layer in execution order."""
    t = plan.totals
    lines = [
        f"precision plan: {plan.mode} for target {plan.target} (dtypes {', '.join(plan.dtypes)})",
        f"  weights       {t.get('bytes', 0):,} B (float: {t.get('float_bytes', 0):,} B, "
        f"{t.get('bytes', 0) / max(1, t.get('float_bytes', 1)):.1%})",
        f"  est. latency  {t.get('latency_s', 0) * 1e3:.4g} ms in the quantized layers "
        f"(float: {t.get('float_latency_s', 0) * 1e3:.4g} ms, target cost model)",
    ]
    if t.get("predicted_sqnr_db") is not None:
        lines.append(f"  SQNR          predicted {t['predicted_sqnr_db']:.1f} dB (sum of layer errors)")
    if t.get("measured_sqnr_db") is not None:
        lines.append(
            f"                measured  {t['measured_sqnr_db']:.1f} dB (all layers quantized at once)"
        )
    steps = plan.calibration.get("kept_timesteps") or []
    per_step = t.get("measured_sqnr_per_step") or []
    if steps and per_step and steps[0] is not None:
        profile = ", ".join(f"t={s:g}: {q:.1f}" for s, q in zip(steps, per_step, strict=False))
        lines.append(f"  per timestep  {profile} dB")
    budget = {k: v for k, v in plan.budget.items() if v is not None}
    if budget:
        lines.append("  budget        " + ", ".join(f"{k}={v}" for k, v in budget.items()))
    if plan.timestep_split is not None:
        lines.append(
            f"  int8 input scales per timestep range: early t >= {plan.timestep_split:g}, late t < "
            f"{plan.timestep_split:g}"
        )
    cal = plan.calibration
    if cal.get("sampler"):
        lines.append(
            f"  calibration   {cal['sampler']} x {cal['num_steps']} steps, seeds {cal['seeds']}, "
            f"kept timesteps {cal['kept_timesteps']}"
        )
    lines += [f"  note          {note}" for note in plan.notes]
    if plan.fp16_guard:
        guard = OverflowGuard.from_dict(plan.fp16_guard)
        lines.append(f"  fp16 guard    {guard.summary()}")
        lines += [f"                {line}" for line in guard.lines()]
    formats = [f for f in FORMATS if any(f in layer.sqnr_db for layer in plan.layers)]
    width = max([len(layer.name) for layer in plan.layers] + [5])
    header = f"{'layer':<{width}}  {'kind':<9} {'chosen':<10} {'bytes':>10} {'float':>10}"
    if formats:
        header += "  SQNR dB: " + " ".join(f"{f:>10}" for f in formats)
    lines += ["", header, "-" * len(header)]
    for layer in plan.layers:
        mark = "*" if layer.pinned else "!" if layer.overflow else " "
        row = f"{layer.name:<{width}}  {layer.kind:<9} {layer.format + mark:<10} "
        row += f"{layer.bytes:>10,} {layer.float_bytes:>10,}"
        if formats:
            row += "           " + " ".join(_sqnr_cell(layer.sqnr_db.get(f)) for f in formats)
        lines.append(row)
    if any(layer.pinned for layer in plan.layers):
        lines.append("(* pinned by the user)")
    if any(layer.overflow for layer in plan.layers):
        lines.append("(! kept in fp32 by the fp16 overflow guard: its activations exceed the float16 range)")
    return "\n".join(lines) + "\n"


def _sqnr_cell(value: float | None) -> str:
    if value is None:
        return f"{'':>10}"
    return f"{'exact':>10}" if value >= MAX_SQNR_DB else f"{value:>10.1f}"


def write_report(directory: Path, plan: PrecisionPlan) -> dict[str, Any]:
    """Write the text report and the PNG into an artifact directory; return their manifest record."""
    for relative in (REPORT_FILE, PLOT_FILE):
        (directory / relative).parent.mkdir(parents=True, exist_ok=True)
    (directory / REPORT_FILE).write_text(render_text(plan))
    (directory / PLOT_FILE).write_bytes(encode_png(render_plot(plan)))
    return {"report": REPORT_FILE, "plot": PLOT_FILE, "summary": plan.summary()}
