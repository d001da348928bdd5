"""edgediff's schedule rules, dlight style: one small rule per op family, first match wins.

TVM 0.27's ``dlight.cpu`` has only GEMV and Reduction rules, so convolutions, matmuls and every fused
elementwise kernel would stay naive single-threaded loop nests. The CPU rules here give each family a
parallel, vectorized (and for conv/matmul register-tiled) schedule whose sizes come from the target
spec through :class:`~edgediff.targets.CostModel`; ``rules.py`` lists which rules each kind of target gets.
"""

from edgediff.schedules.conv2d import Conv2d
from edgediff.schedules.elementwise import Elementwise
from edgediff.schedules.matmul import GegluMatmul, Matmul
from edgediff.schedules.reduction import GeneralReduction
from edgediff.schedules.rules import cpu_rules, is_scheduled, schedule_rules
from edgediff.schedules.winograd import WinogradTransform

__all__ = [
    "Conv2d",
    "Elementwise",
    "GegluMatmul",
    "GeneralReduction",
    "Matmul",
    "WinogradTransform",
    "cpu_rules",
    "is_scheduled",
    "schedule_rules",
]
