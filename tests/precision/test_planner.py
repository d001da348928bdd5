"""make_plan against target specs and budgets, without compiling."""

from __future__ import annotations

import pytest

from edgediff.errors import PrecisionError
from edgediff.precision import PrecisionConfig
from edgediff.precision.plan import config_from_options, resolve_request
from edgediff.precision.planner import make_plan
from edgediff.targets import load_target
from tests.precision.models import FRAGILE


def weights_of(model) -> dict:
    return {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}


def plan_for(fragile, spec, **config):
    model, inputs, names = fragile
    return make_plan(model, inputs, names, {}, spec, PrecisionConfig(**config), weights=weights_of(model))


def test_latency_budget_is_met_by_the_cost_model_estimate(fragile, host_int8):
    float_plan = plan_for(fragile, host_int8, mode="fp32")
    budget_s = 0.9 * float_plan.totals["latency_s"]
    plan = plan_for(fragile, host_int8, budget={"latency_ms": budget_s * 1e3})
    assert plan.totals["latency_s"] <= budget_s
    assert sum(layer.latency_s for layer in plan.layers) == pytest.approx(plan.totals["latency_s"])
    assert plan.budget["latency_s"] == pytest.approx(budget_s)


def test_an_fp16_int8_npu_never_gets_float32(fragile):
    spec = load_target("ane-like")
    plan = plan_for(fragile, spec, budget={"sqnr_db": 35})
    assert {layer.format for layer in plan.layers} <= {"fp16", "w8", "w8a8", "w8a8-token", "w4", "a8"}
    assert plan.layer(FRAGILE).format == "fp16"  # the only format it survives in on this target
    assert all("fp32" not in layer.sqnr_db for layer in plan.layers)
    with pytest.raises(PrecisionError, match="target 'ane-like' does not support float32"):
        resolve_request("fp32", None, spec)


def test_requests_are_checked_before_anything_runs(host_int8):
    with pytest.raises(PrecisionError, match="precision budget needs precision='auto'"):
        resolve_request("w8", {"bytes": "1MB"}, host_int8)
    with pytest.raises(PrecisionError, match="unknown precision budget key"):
        resolve_request("auto", {"size": "1MB"}, host_int8)
    with pytest.raises(PrecisionError, match="precision_budget needs precision='auto'"):
        resolve_request(None, {"bytes": 10}, host_int8)
    assert resolve_request(None, None, host_int8) is None
    config = config_from_options(None, max_bytes="2MB", pins=["conv_*=fp16"])
    assert config.mode == "auto" and config.budget == {"bytes": "2MB"} and config.pins == {"conv_*": "fp16"}
    with pytest.raises(PrecisionError, match="--pin expects LAYER=FORMAT"):
        config_from_options("auto", pins=["conv_in"])


def test_pin_must_fit_the_layer_kind(fragile, host_int8):
    with pytest.raises(PrecisionError, match=r"pinned layer attn.sdpa \(attention\) cannot take format w8"):
        plan_for(fragile, host_int8, pins={"attn.sdpa": "w8"})


def test_models_that_are_not_denoisers_calibrate_on_random_inputs(fragile, host_int8):
    from edgediff.precision.report import render_plot, render_text

    model, inputs, _ = fragile
    plan = make_plan(
        model, inputs, ("latent", "t"), {}, host_int8, PrecisionConfig(mode="int8"), weights=weights_of(model)
    )
    assert plan.calibration["sampler"] is None and plan.timestep_split is None
    assert all(len(layer.scales) == 1 for layer in plan.layers if layer.scales)
    image = render_plot(plan)
    assert image.dtype == "uint8" and image.shape[2] == 3
    assert "w8a8" in render_text(plan)
