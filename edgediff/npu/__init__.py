"""The NPU back end: op-level graph, model-level tiling to SRAM, the NPU program and its simulator.

:func:`plan_model` runs the whole analysis on a Relax module (before ``legalize``): it is what the
``npu-tiling`` pass and ``benchmarks/tiling.py`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec

MEMORY_LEVELS = ("sram", "l2")


@dataclass
class TilingPlan:
    graph: Any  # edgediff.npu.graph.Graph
    groups: list[Any]
    program: dict[str, Any]
    simulation: Any  # SimulationResult (counts only)
    analysis: Any  # TilingAnalysis


def memory_budget(spec: TargetSpec, level: str = "sram", sram_bytes: int | None = None) -> int:
    """The on-chip bytes tiles must fit: the NPU's SRAM, or a CPU's L2 cache used as one."""
    from edgediff.errors import PassError

    if sram_bytes is not None:
        return int(sram_bytes)
    if level not in MEMORY_LEVELS:
        raise PassError(f"npu-tiling: memory_level must be one of {', '.join(MEMORY_LEVELS)}, got {level!r}")
    size = spec.memory.sram_bytes if level == "sram" else spec.memory.l2_bytes
    if size <= 0:
        raise PassError(
            f"npu-tiling: target {spec.name} has no {level.upper()} (memory.{level}_bytes is 0); "
            "for a CPU use memory_level='l2'"
        )
    return int(size)


def plan_model(mod: Any, spec: TargetSpec, sram: int, *, chain: bool = True) -> TilingPlan:
    """Graph -> regions -> tiles -> program, then a counting simulation and the per-block analysis."""
    from edgediff.npu.graph import from_relax
    from edgediff.npu.simulator import Simulator
    from edgediff.npu.tile_planner import build_program, form_groups, plan_groups
    from edgediff.npu.tiling_report import analyse

    graph = from_relax(mod)
    groups = plan_groups(form_groups(graph, spec, chain=chain), graph, spec, sram)
    program = build_program(graph, groups, spec, sram)
    simulation = Simulator(program).run()
    analysis = analyse(graph, groups, spec, simulation, sram, unfused=from_relax(mod, fuse_attention=False))
    return TilingPlan(graph, groups, program, simulation, analysis)
