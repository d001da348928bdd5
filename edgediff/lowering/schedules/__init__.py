"""edgediff's CPU schedule rules, dlight style: one small rule per op family, first match wins.

TVM 0.27's ``dlight.cpu`` has only GEMV and Reduction rules, so convolutions, matmuls and every fused
elementwise kernel would stay naive single-threaded loop nests. These rules give each family a
parallel, vectorized (and for conv/matmul register-tiled) schedule whose sizes come from the target
spec through :class:`~edgediff.targets.CostModel`.
"""

from __future__ import annotations

from typing import Any

from edgediff.lowering.schedules.conv2d import Conv2d
from edgediff.lowering.schedules.elementwise import Elementwise
from edgediff.lowering.schedules.matmul import GegluMatmul, Matmul
from edgediff.lowering.schedules.reduction import GeneralReduction
from edgediff.lowering.schedules.winograd import WinogradTransform
from edgediff.targets import CostModel

__all__ = [
    "Conv2d",
    "Elementwise",
    "GegluMatmul",
    "GeneralReduction",
    "Matmul",
    "WinogradTransform",
    "cpu_rules",
]


def cpu_rules(spec: Any) -> list[Any]:
    """The ordered rules for a CPU target: specialised rules first, generic fallbacks last."""
    from tvm.s_tir import dlight as dl

    cost = CostModel(spec)
    return [
        WinogradTransform(cost),  # before Elementwise, which would take its all-spatial kernels
        Conv2d(cost),
        Matmul(cost),
        GegluMatmul(cost),
        dl.cpu.GEMV(),
        GeneralReduction(cost),
        Elementwise(cost),
    ]
