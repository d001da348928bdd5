"""Mixed precision: measure a diffusion model along its sampling trajectory and choose each layer's format.

The measurement side (torch, on the float model): :mod:`calibration` (activation ranges per timestep along
a real sampler loop), :mod:`sensitivity` (each layer alone at each format, replayed on the calibration
evaluations), :mod:`assignment` (formats under a bytes / latency / SQNR budget), :mod:`planner` (all of it)
and :mod:`report` (text and PNG). The formats and quantizer formulas are in :mod:`quantizers`; the plan
(:mod:`plan`) is realised by the ``mixed-precision`` pass (``edgediff/passes/mixed_precision.py``).

Only torch-free modules are imported here; ``make_plan`` loads torch when first used.
"""

from __future__ import annotations

from typing import Any

from edgediff.precision.assignment import Budget, parse_bytes
from edgediff.precision.plan import LayerPlan, PrecisionConfig, PrecisionPlan
from edgediff.precision.quantizers import ALIASES, FORMATS, Format, get_format

__all__ = [
    "ALIASES",
    "FORMATS",
    "Budget",
    "Format",
    "LayerPlan",
    "PrecisionConfig",
    "PrecisionPlan",
    "get_format",
    "make_plan",
    "parse_bytes",
]


def make_plan(*args: Any, **kwargs: Any) -> PrecisionPlan:
    """See :func:`edgediff.precision.planner.make_plan`."""
    from edgediff.precision.planner import make_plan as make

    return make(*args, **kwargs)
