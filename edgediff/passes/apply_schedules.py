"""Apply the target's TIR schedule rules to every fused kernel."""

from __future__ import annotations

from typing import Any

import tvm
from tvm.s_tir import dlight as dl

from edgediff.lowering.schedule import is_scheduled, schedule_rules
from edgediff.passes.registry import register_pass


@register_pass("schedule")
@tvm.transform.module_pass(opt_level=0, name="edgediff.ApplySchedules")
class ApplySchedules:
    """Schedule each TIR kernel with the first matching rule for the target (see ``lowering/schedule.py``).

    Unscheduled TIR is a naive loop nest: correct, but single-threaded and unvectorised on CPUs, and
    not even launchable on GPUs, which need thread bindings.
    """

    def __init__(self, spec: Any) -> None:
        self.spec = spec
        self.report: dict[str, Any] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rules = schedule_rules(self.spec)
        mod = dl.ApplyDefaultSchedule(*rules)(mod)
        kernels = [func for _, func in mod.functions.items() if isinstance(func, tvm.tirx.PrimFunc)]
        scheduled = sum(1 for func in kernels if is_scheduled(func))
        self.report = {
            "summary": f"{scheduled} of {len(kernels)} kernels scheduled by target rules",
            "rules": [type(rule).__name__ for rule in rules],
            "scheduled": scheduled,
            "kernels": len(kernels),
        }
        return mod
