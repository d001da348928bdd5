"""Run the pass pipeline on a Relax module inside the target's context and collect each pass's report."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgediff.errors import BuildError, EdgediffError, first_line
from edgediff.passes.pipeline import instantiate


@dataclass
class PassResult:
    name: str
    report: dict[str, Any]
    seconds: float
    # what a pass hands to later compile stages besides the module (lift-weight-transforms: the weight
    # transform to run before writing the weights)
    outputs: dict[str, Any] = field(default_factory=dict)


def run_passes(
    mod: Any,
    spec: Any,
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
            results.append(
                PassResult(
                    name, dict(pass_.report), time.perf_counter() - start, dict(getattr(pass_, "outputs", {}))
                )
            )
    return mod, results


def weight_transform(results: list[PassResult]) -> Any | None:
    """The compile-time weight transform a ``lift-weight-transforms`` run left, if any."""
    return next((r.outputs["weight_transform"] for r in results if "weight_transform" in r.outputs), None)
