"""Calibration along the sampler trajectory and per-layer sensitivity (torch only, no compile)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgediff import zoo
from edgediff.precision.assignment import candidate_formats
from edgediff.precision.calibration import calibrate
from edgediff.precision.sensitivity import FakeQuant, measure_assignment, measure_sensitivity, replay
from tests.precision.models import FRAGILE

DTYPES = ("float32", "float16", "int8")


@pytest.fixture(scope="module")
def fragile_calibration(fragile):
    model, inputs, names = fragile
    return calibrate(model, inputs, names, {}, num_steps=8, keep=4, seeds=(0, 1))


@pytest.fixture(scope="module")
def fragile_sensitivity(fragile, fragile_calibration):
    model, _, _ = fragile
    cal = fragile_calibration
    split = cal.timestep_split()
    scales = {i.name: cal.activation_scales(i.name, split) for i in cal.layers if i.kind != "attention"}
    candidates = {i.name: candidate_formats(i.kind, DTYPES) for i in cal.layers}
    return measure_sensitivity(model, cal, candidates, DTYPES, scales=scales, timestep_split=split)


def test_calibration_samples_the_whole_trajectory(fragile_calibration):
    cal = fragile_calibration
    # DDIM over 8 steps: 875 ... 0, kept evenly including both ends (Q-Diffusion-style)
    assert cal.timesteps.tolist() == [875.0, 625.0, 250.0, 0.0]
    assert cal.sampler == "ddim" and len(cal.steps) == 4
    assert all(step.inputs[0].shape[0] == 2 for step in cal.steps)  # one row per seed
    # every evaluation came from the sampler loop: later latents differ from the initial noise
    assert not torch.allclose(cal.steps[0].inputs[0], cal.steps[-1].inputs[0])
    kinds = {info.name: info.kind for info in cal.layers}
    assert kinds == {
        "time": "linear",
        "conv_in": "conv2d",
        "attn.to_q": "linear",
        "attn.to_k": "linear",
        "attn.to_v": "linear",
        "attn.sdpa": "attention",
        "attn.to_out": "linear",
        "mid": "conv2d",
        FRAGILE: "conv2d",
        "conv_out": "conv2d",
    }
    assert list(kinds)[:2] == ["time", "conv_in"]  # execution order
    conv = cal.layer("mid")
    assert conv.macs == 16 * 8 * 8 * 16 * 9 and conv.weight == "mid.weight"
    assert cal.layer("attn.sdpa").attention_shape == (2, 64, 64, 8)
    for ranges in cal.absmax.values():
        assert ranges.shape == (4,)
    assert all(cal.absmax[name].min() > 0 for name, kind in kinds.items() if kind != "attention")


def test_replay_without_quantization_reproduces_the_float_outputs(fragile, fragile_calibration):
    model, _, _ = fragile
    assert np.all(replay(model, fragile_calibration) < 1e-10)


def test_activation_ranges_drift_over_timesteps_and_scales_follow():
    zm = zoo.build("tiny-sd15-unet")
    cal = calibrate(zm.module, zm.example_inputs, zm.input_names, zm.meta, num_steps=8, keep=4, seeds=(0,))
    ranges = cal.absmax["unet.conv_in"]  # the latent itself: noise early, a clean latent late
    assert ranges[0] > 1.5 * ranges[-1]
    split = cal.timestep_split()
    early, late = cal.activation_scales("unet.conv_in", split)
    assert early > late
    assert cal.activation_scales("unet.conv_in", None) == [max(early, late)]
    assert sum(i.kind == "attention" for i in cal.layers) == 14  # attn1 + attn2 of 7 transformer blocks


def test_fragile_layer_is_ranked_most_sensitive(fragile_sensitivity):
    for fmt in ("w8", "w8a8", "w4"):
        ranking = fragile_sensitivity.ranking(fmt)
        assert ranking[0][0] == FRAGILE, (fmt, ranking[:3])
        assert ranking[0][1] < ranking[1][1] - 10  # by a wide margin, not by noise
    # float16 does not hurt it: its weights are exact in float16
    assert fragile_sensitivity.sqnr_db(FRAGILE, "fp16") > 60
    assert fragile_sensitivity.sqnr_db(FRAGILE, "fp32") == pytest.approx(200.0)


def test_coarser_formats_measure_worse(fragile_sensitivity):
    s = fragile_sensitivity
    for layer in ("mid", "conv_out", "attn.to_v"):
        assert s.sqnr_db(layer, "fp16") > s.sqnr_db(layer, "w8") > s.sqnr_db(layer, "w4")
    assert len(s.sqnr_per_step("mid", "w8")) == 4


def test_fake_quant_restores_the_model(fragile, fragile_calibration):
    model, inputs, _ = fragile
    before = model(*inputs)
    with FakeQuant(model, {FRAGILE: "w8", "attn.sdpa": "a8"}, DTYPES):
        during = model(*inputs)
    assert not torch.allclose(before, during)
    assert torch.equal(model(*inputs), before)


def test_layer_errors_add_up_when_quantized_together(fragile, fragile_calibration, fragile_sensitivity):
    model, _, _ = fragile
    assignment = {"mid": "w8", "conv_out": "w8", "conv_in": "w8"}
    predicted = sum(fragile_sensitivity.relative_mse(n, f) for n, f in assignment.items())
    measured = measure_assignment(model, fragile_calibration, assignment, DTYPES)[-1]
    assert measured == pytest.approx(-10 * np.log10(predicted), abs=3.0)
