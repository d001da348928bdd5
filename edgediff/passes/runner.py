"""Run the pass pipeline on a Relax module inside the target's context and collect each pass's report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgediff.errors import BuildError, EdgediffError, first_line
from edgediff.passes.pipeline import instantiate
from edgediff.passes.report import PassReport, find_report

if TYPE_CHECKING:
    from edgediff.passes.lift_weight_transforms import WeightTransform
    from edgediff.targets import TargetSpec


@dataclass
class PassResult:
    """One pass's run: its typed report (``report.to_dict()`` is the manifest's record; hand-off fields such
    as lift-weight-transforms' weight transform are read by later compile stages) and its wall time."""

    name: str
    report: PassReport
    seconds: float


def run_passes(
    mod: Any,
    spec: TargetSpec,
    names: list[str],
    on_pass: Callable[[str], None] | None = None,
    options: dict[str, dict[str, Any]] | None = None,
) -> tuple[Any, list[PassResult]]:
    """Apply the named passes in order inside the target's context; return the module and each report.

    ``options[name]`` are keyword arguments for one pass's constructor (e.g. the mixed-precision plan)."""
    import time

    target = spec.build_target()
    results: list[PassResult] = []
    with target:
        for name, pass_ in instantiate(names, spec, options):
            if on_pass:
                on_pass(name)
            start = time.perf_counter()
            try:
                mod = pass_(mod)
            except EdgediffError:
                raise  # already names what is at fault (e.g. an SRAM too small for one op)
            except Exception as err:
                raise BuildError(f"pass '{name}' failed for target {spec.name}: {first_line(err)}") from err
            results.append(PassResult(name, pass_.report, time.perf_counter() - start))
    return mod, results


def weight_transform(results: list[PassResult]) -> WeightTransform | None:
    """The compile-time weight transform a ``lift-weight-transforms`` run left, if any."""
    from edgediff.passes.lift_weight_transforms import LiftWeightTransformsReport

    report = find_report(results, LiftWeightTransformsReport)
    return report.weight_transform if report is not None else None
