"""Apply the target's TIR schedule rules to every fused kernel."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tvm

from edgediff.errors import first_line
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport
from edgediff.schedules.common import widened_in_kernel
from edgediff.schedules.rules import is_scheduled, schedule_rules

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class ApplySchedulesReport(PassReport):
    rules: list[str] = field(default_factory=list)  # the target's rules, in the order they are tried
    kernels_by_rule: dict[str, int] = field(default_factory=dict)  # most used first
    scheduled: int = 0
    kernels: int = 0
    rule_failures: list[str] = field(default_factory=list)  # "<rule> on <kernel>: <error>"
    # weight-only int8 kernels (kernels/dequantize.py) by rule: the integer weight widened inside the
    # register-tiled loop nest; and the kernels that widen their whole weight ahead of the reduction
    widened_in_kernel: dict[str, int] = field(default_factory=dict)
    widened_whole: list[str] = field(default_factory=list)


@register_pass("schedule")
@tvm.transform.module_pass(opt_level=0, name="edgediff.ApplySchedules")
class ApplySchedules:
    """Schedule each TIR kernel with the first matching rule for the target (see ``schedules/rules.py``).

    Unscheduled TIR is a naive loop nest: correct, but single-threaded and unvectorised on CPUs, and
    not even launchable on GPUs, which need thread bindings.

    This is dlight's ``ApplyDefaultSchedule`` loop, kept here so that the report can say which rule took
    each kernel, and so that a rule failing on an unusual kernel hands it to the next rule (the failure is
    reported) instead of failing the whole compile.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = ApplySchedulesReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        rules = schedule_rules(self.spec)
        target = tvm.target.Target.current(allow_none=False)
        by_rule: Counter[str] = Counter()
        widened: Counter[str] = Counter()
        whole: list[str] = []
        failures: list[str] = []
        updated = {}
        kernels = 0
        for gvar, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc):
                continue
            kernels += 1
            if is_scheduled(func):
                by_rule["(already scheduled)"] += 1
                continue
            for rule in rules:
                try:
                    sch = rule.apply(func, func.attrs.get("target", target) if func.attrs else target, False)
                except Exception as err:  # noqa: BLE001 - any rule error: try the next rule, report it
                    failures.append(f"{type(rule).__name__} on {gvar.name_hint}: {first_line(err)}")
                    continue
                if sch is None:
                    continue
                sch = sch[0] if isinstance(sch, list) else sch
                updated[gvar] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                by_rule[type(rule).__name__] += 1
                in_kernel = widened_in_kernel(updated[gvar])
                if in_kernel:
                    widened[type(rule).__name__] += 1
                elif in_kernel is False:
                    whole.append(f"{gvar.name_hint} ({type(rule).__name__})")
                break
        # a module pass must not change its input: callers (kernel tests, tuning) keep the unscheduled module
        mod = mod.clone()
        for gvar, func in updated.items():
            mod[gvar] = func
        scheduled = sum(by_rule.values())
        self.report = ApplySchedulesReport(
            summary=f"{scheduled} of {kernels} kernels scheduled by target rules",
            rules=[type(rule).__name__ for rule in rules],
            kernels_by_rule=dict(by_rule.most_common()),
            scheduled=scheduled,
            kernels=kernels,
            rule_failures=failures,
            widened_in_kernel=dict(widened.most_common()),
            widened_whole=whole,
        )
        return mod
