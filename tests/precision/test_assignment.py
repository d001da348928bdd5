"""Assignment under a budget: the greedy walk against brute force, budgets, pins and unreachable budgets."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from edgediff.errors import PrecisionError
from edgediff.precision.assignment import Budget, Option, assign

# per format: (bytes per weight, typical relative error per unit of layer sensitivity)
FORMATS = {"fp32": (4.0, 0.0), "fp16": (2.0, 1e-7), "w8": (1.0, 1e-5), "w4": (0.5, 1e-3)}


def synthetic(layers: int, seed: int) -> dict[str, list[Option]]:
    rng = np.random.default_rng(seed)
    options = {}
    for i in range(layers):
        size = int(rng.integers(1, 50)) * 64
        sensitivity = float(10 ** rng.uniform(-1, 2))  # layers differ by three orders of magnitude
        options[f"layer{i}"] = [
            Option(fmt, int(size * per_byte), 1e-6 * size * per_byte, err * sensitivity)
            for fmt, (per_byte, err) in FORMATS.items()
        ]
    return options


def brute_force(options, feasible):
    """The smallest total error over every feasible combination of options."""
    return min(
        sum(o.error for o in combo) for combo in itertools.product(*options.values()) if feasible(combo)
    )


@pytest.mark.parametrize("seed", range(4))
def test_bytes_budget_holds_and_error_is_near_optimal(seed):
    options = synthetic(6, seed)
    largest = sum(max(o.bytes for o in opts) for opts in options.values())
    budget = int(0.4 * largest)
    result = assign(options, Budget(bytes=budget), fixed_bytes=0, target="t")
    assert result.bytes <= budget
    optimum = brute_force(options, lambda combo: sum(o.bytes for o in combo) <= budget)
    # greedy-by-ratio on convex hulls is optimal up to the error of the one move it overshoots with
    largest_move = max(max(o.error for o in opts) - min(o.error for o in opts) for opts in options.values())
    assert optimum <= result.error <= optimum + largest_move


def test_sqnr_budget_gives_the_smallest_model_that_meets_it():
    options = synthetic(6, 7)
    result = assign(options, Budget(sqnr_db=40.0), fixed_bytes=1000, target="t")
    assert result.sqnr_db >= 40.0
    sizes = [
        sum(o.bytes for o in combo) + 1000
        for combo in itertools.product(*options.values())
        if sum(o.error for o in combo) <= 1e-4  # 40 dB
    ]
    # no assignment meeting the bound is smaller by more than one layer's largest saving
    largest_saving = max(max(o.bytes for o in opts) - min(o.bytes for o in opts) for opts in options.values())
    assert min(sizes) <= result.bytes <= min(sizes) + largest_saving


def test_budget_uses_sensitivity_not_size_alone():
    # two layers of equal size: the sensitive one must keep the higher precision
    options = {
        "robust": [Option("fp32", 400, 0, 0.0), Option("w8", 100, 0, 1e-6)],
        "sensitive": [Option("fp32", 400, 0, 0.0), Option("w8", 100, 0, 1e-2)],
    }
    result = assign(options, Budget(bytes=500), fixed_bytes=0, target="t")
    assert result.formats == {"robust": "w8", "sensitive": "fp32"}


def test_pinned_layers_keep_their_format():
    options = synthetic(4, 3)
    options["layer0"] = [o for o in options["layer0"] if o.format == "fp32"]  # what a pin leaves
    result = assign(options, Budget(bytes=10**9), fixed_bytes=0, target="t")
    assert result.formats["layer0"] == "fp32"


def test_unreachable_budgets_say_what_is_reachable():
    options = synthetic(3, 5)
    smallest = sum(min(o.bytes for o in opts) for opts in options.values()) + 640
    with pytest.raises(PrecisionError, match=r"smallest reachable size is") as err:
        assign(options, Budget(bytes=smallest - 1), fixed_bytes=640, target="phone")
    assert "phone" in str(err.value)
    assign(options, Budget(bytes=smallest), fixed_bytes=640, target="phone")  # exactly reachable: fine
    fastest = sum(min(o.latency_s for o in opts) for opts in options.values())
    with pytest.raises(PrecisionError, match=r"lowest reachable estimated latency"):
        assign(options, Budget(latency_s=fastest / 2), fixed_bytes=0, target="phone")
    no_float32 = {k: [o for o in v if o.format != "fp32"] for k, v in options.items()}
    with pytest.raises(PrecisionError, match=r"highest reachable is \d+\.\d dB"):
        assign(no_float32, Budget(sqnr_db=150.0), fixed_bytes=0, target="phone")


def test_budget_parsing():
    budget = Budget.parse({"bytes": "1GB", "latency_ms": 250, "sqnr_db": 30})
    assert budget == Budget(bytes=10**9, latency_s=0.25, sqnr_db=30.0)
    with pytest.raises(PrecisionError, match="unknown precision budget key"):
        Budget.parse({"megabytes": 3})
