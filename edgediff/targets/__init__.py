"""Target specs: which device to compile for and what it can do.

A target is a built-in name (see :func:`list_targets`) or a user YAML file validated against
:mod:`edgediff.targets.schema`; :func:`load_target` turns either into a :class:`TargetSpec`, and
:class:`CostModel` gives passes roofline estimates from it.
"""

from __future__ import annotations

from edgediff.targets.cost_model import CostModel
from edgediff.targets.schema import schema_reference, validate
from edgediff.targets.spec import (
    ComputeSpec,
    MemorySpec,
    NpuSpec,
    TargetSpec,
    list_targets,
    load_target,
    validate_target_file,
)

__all__ = [
    "ComputeSpec",
    "CostModel",
    "MemorySpec",
    "NpuSpec",
    "TargetSpec",
    "list_targets",
    "load_target",
    "schema_reference",
    "validate",
    "validate_target_file",
]
