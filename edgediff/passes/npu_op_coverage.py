"""Report which ops the NPU can execute and which must fall back to the host CPU."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import tvm

from edgediff.passes.analysis import relax_op_histogram
from edgediff.passes.registry import register_pass
from edgediff.passes.report import PassReport

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


@dataclass
class NPUOpCoverageReport(PassReport):
    npu_ops: dict[str, int] = field(default_factory=dict)  # op -> calls the NPU runs
    host_ops: dict[str, int] = field(default_factory=dict)  # op -> calls that fall back to the host CPU


@register_pass("npu-op-coverage")
@tvm.transform.module_pass(opt_level=0, name="edgediff.NPUOpCoverage")
class NPUOpCoverage:
    """Split the graph's op calls into NPU-supported (per the target's op list) and host fallbacks.

    An NPU that cannot run one op of a block forces a round trip through DRAM and the CPU; the report
    shows where that happens before any partitioning is attempted. It does not change the module.
    """

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec
        self.report = NPUOpCoverageReport("not run")

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        ops = relax_op_histogram(mod)
        on_npu = {op: n for op, n in ops.items() if self.spec.supports_op(op)}
        on_host = {op: n for op, n in ops.items() if op not in on_npu}
        total = sum(ops.values()) or 1
        share = 100.0 * sum(on_npu.values()) / total
        self.report = NPUOpCoverageReport(
            summary=(
                f"{sum(on_npu.values())} of {sum(ops.values())} op calls ({share:.1f}%) supported by the NPU"
                + (f"; host fallback for {', '.join(sorted(on_host))}" if on_host else "")
            ),
            npu_ops=dict(sorted(on_npu.items())),
            host_ops=dict(sorted(on_host.items())),
        )
        return mod
