"""Target-aware TIR scheduling: which schedule rules apply to which kind of target.

Rules follow TVM's dlight layout (one small rule per op family); each target kind gets an ordered list and
the first rule that matches a kernel schedules it. CPU rules are edgediff's own (``schedules/``:
register-tiled conv2d and matmul, parallel reductions and elementwise kernels, sized from the target spec)
around TVM's ``dlight.cpu`` GEMV and Reduction rules; GPU targets need every kernel bound to threads, so
their list ends in the generic fallback rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgediff.errors import PassError
from edgediff.schedules.conv2d import Conv2d
from edgediff.schedules.elementwise import Elementwise
from edgediff.schedules.matmul import GegluMatmul, Matmul
from edgediff.schedules.reduction import GeneralReduction
from edgediff.schedules.winograd import WinogradTransform
from edgediff.targets import CostModel

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


def schedule_rules(spec: TargetSpec) -> list[Any]:
    """The ordered dlight rules for ``spec``'s kind of target."""
    from tvm.s_tir import dlight as dl

    if spec.kind in ("cpu", "npu"):
        # The NPU's kernels are simulated on its host CPU until the NPU program exists, so they are
        # scheduled as CPU kernels.
        return cpu_rules(spec)
    if spec.kind == "gpu":
        rules: list[Any] = []
        if _is_adreno(spec):
            rules += [dl.adreno.Conv2d(), dl.adreno.LayoutTransform(), dl.adreno.Pool2D()]
        return rules + [dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]
    raise PassError(f"no schedule rules for target kind '{spec.kind}' (target {spec.name})")


def _is_adreno(spec: TargetSpec) -> bool:
    target = spec.build_target()
    return "adreno" in list(target.keys)


def is_scheduled(func: Any) -> bool:
    """Whether dlight marked a TIR function as scheduled."""
    attrs = func.attrs
    return bool(attrs is not None and "tirx.is_scheduled" in attrs and attrs["tirx.is_scheduled"])


def cpu_rules(spec: TargetSpec) -> list[Any]:
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
