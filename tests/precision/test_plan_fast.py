"""Fast planning: sensitivity measured at a small latent and transferred by layer name, and the "transfer"
estimate (local errors carried to the prediction by probe passes) against the exhaustive replay."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from edgediff import zoo
from edgediff.errors import PrecisionError
from edgediff.precision import PrecisionConfig
from edgediff.precision.calibration import calibrate
from edgediff.precision.plan import config_from_options, resolve_request
from edgediff.precision.planner import make_plan
from edgediff.precision.sensitivity import measure_assignment, measure_sensitivity
from tests.precision.models import FRAGILE

DTYPES = ("float32", "float16", "int8")


def _plan(fragile, spec, latent, messages, method="replay", budget=None):
    model, inputs, names = fragile
    weights = {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}
    config = PrecisionConfig(
        budget=budget or {"sqnr_db": 35}, sensitivity_latent=latent, keep=2, seeds=(0,), sensitivity=method
    )
    return make_plan(model, inputs, names, {}, spec, config, weights=weights, progress=messages.append)


def test_small_latent_sensitivity_transfers_and_progress_counts_every_replay(fragile, host_int8):
    exact_messages, small_messages = [], []
    exact = _plan(fragile, host_int8, None, exact_messages)  # the example latent is 8x8: measured there
    small = _plan(fragile, host_int8, 4, small_messages)
    assert any("sensitivity measured at latent 4x4" in note for note in small.notes)
    assert not any("sensitivity measured at latent" in note for note in exact.notes)
    # the fragile layer is still found the most sensitive, by a wide margin, at the small latent
    for fmt in ("w8", "w4"):
        ranked = sorted(small.layers, key=lambda layer: layer.sqnr_db.get(fmt, 1e9))
        assert ranked[0].name == FRAGILE and ranked[0].sqnr_db[fmt] < ranked[1].sqnr_db[fmt] - 10
    # and the per-layer figures agree with the exhaustive ones within 6 dB (coarse formats)
    for layer in exact.layers:
        for fmt, db in layer.sqnr_db.items():
            if db < 100:
                assert abs(small.layer(layer.name).sqnr_db[fmt] - db) < 6, (layer.name, fmt)
    assert small.layer(FRAGILE).format == exact.layer(FRAGILE).format
    # one report per (layer, candidate format), the last one done/total with an ETA
    total = sum(len(layer.sqnr_db) for layer in exact.layers)
    counts = [m for m in small_messages if m.startswith("sensitivity ")]
    assert len(counts) == total
    assert re.fullmatch(rf"sensitivity {total}/{total} ETA 00:00", counts[-1])


@pytest.fixture(scope="module")
def tiny_unet_sensitivities():
    """tiny-sd15-unet calibrated on 4 rows (2 kept evaluations x 2 seeds); every third layer measured at
    the coarse formats both ways (the exhaustive replay of all 146 layers would take half a minute)."""
    zm = zoo.build("tiny-sd15-unet")
    cal = calibrate(zm.module, zm.example_inputs, zm.input_names, zm.meta, num_steps=8, keep=2, seeds=(0, 1))
    split = cal.timestep_split()
    scales = {i.name: cal.activation_scales(i.name, split) for i in cal.layers if i.kind != "attention"}
    candidates = {
        info.name: [f for f in ("w8", "w8a8", "w4", "a8") if info.kind in zoo_kinds(f)]
        for info in cal.layers[::3]
    }
    both = {
        method: measure_sensitivity(
            zm.module, cal, candidates, DTYPES, scales=scales, timestep_split=split, method=method
        )
        for method in ("replay", "transfer")
    }
    return both, candidates


def zoo_kinds(fmt: str) -> tuple[str, ...]:
    from edgediff.precision.quantizers import get_format

    return get_format(fmt).kinds


def test_transfer_estimate_agrees_with_the_replay_on_a_tiny_unet(tiny_unet_sensitivities):
    both, candidates = tiny_unet_sensitivities
    replay, transfer = both["replay"], both["transfer"]
    assert sum(info == ["a8"] for info in candidates.values()) >= 3  # attention calls are measured too
    gaps = {}
    for layer, formats in candidates.items():
        for fmt in formats:
            exact, estimate = replay.sqnr_db(layer, fmt), transfer.sqnr_db(layer, fmt)
            assert exact < 120  # a real error, not float32 round-off
            assert abs(estimate - exact) < 6, (layer, fmt, exact, estimate)
            gaps.setdefault(fmt, []).append(estimate - exact)
            # the per-evaluation profile has the same shape (one figure per kept evaluation)
            assert len(transfer.sqnr_per_step(layer, fmt)) == len(replay.sqnr_per_step(layer, fmt)) == 2
    for fmt in ("w8", "w8a8", "w4"):  # unbiased: the probes' spread averages out over the layers
        gap = gaps[fmt]
        assert len(gap) >= 10
        assert abs(np.mean(gap)) < 1.0 and np.mean(np.abs(gap)) < 2.0, (fmt, np.mean(gap))
    # the transfer ranks layers as the replay does: the most sensitive third is mostly the same layers
    for fmt in ("w8", "w4"):
        top = max(3, len(replay.ranking(fmt)) // 3)
        worst = {name for name, _ in replay.ranking(fmt)[:top]}
        assert len(worst & {name for name, _ in transfer.ranking(fmt)[:top]}) >= 0.7 * top
    # and costs no whole-model replay: 4 probes over the 4 rows, against one replay per pair
    pairs = sum(len(formats) for formats in candidates.values())
    assert replay.replays == pairs and replay.model_rows == 4 * pairs
    assert transfer.replays == 0 and transfer.model_rows == 4 * 4
    assert (transfer.method, replay.method) == ("transfer", "replay")


def test_transfer_plan_matches_the_exhaustive_plan(fragile, host_int8):
    budget = {"bytes": 12_000}  # about half the float weights: forces a mix of formats
    messages = {"replay": [], "transfer": []}
    plans = {m: _plan(fragile, host_int8, None, messages[m], m, budget) for m in messages}
    exact, fast = plans["replay"], plans["transfer"]
    same = sum(a.format == b.format for a, b in zip(exact.layers, fast.layers, strict=True))
    assert same >= 0.8 * len(exact.layers)
    assert fast.layer(FRAGILE).format == exact.layer(FRAGILE).format
    assert fast.layer(FRAGILE).format not in ("w8", "w8a8", "w4")  # the fragile layer is still protected
    assert fast.totals["bytes"] <= 12_000 and exact.totals["bytes"] <= 12_000
    assert abs(fast.totals["measured_sqnr_db"] - exact.totals["measured_sqnr_db"]) < 1.5
    # the plans say how they were measured and what it cost
    assert exact.calibration["sensitivity"]["method"] == "replay"
    assert fast.calibration["sensitivity"] == {
        "method": "transfer",
        "probes": 4,
        "replays": 0,
        "model_rows": 8,
    }
    pairs = sum(len(layer.sqnr_db) for layer in exact.layers)
    exact_pairs = sum(1 for layer in exact.layers if "fp32" in layer.sqnr_db)  # fp32 is exact: not run
    assert exact.calibration["sensitivity"]["replays"] == pairs - exact_pairs
    assert any(note.startswith("sensitivity: exhaustive replay") for note in exact.notes)
    assert any(note.startswith("sensitivity: transfer estimate") for note in fast.notes)
    # the transfer's progress: one report per (layer, format) of its single pass, the last with ETA 00:00
    counts = [m for m in messages["transfer"] if m.startswith("sensitivity ")]
    assert len(counts) == pairs
    assert re.fullmatch(rf"sensitivity {pairs}/{pairs} ETA 00:00", counts[-1])


def test_transfer_estimate_predicts_a_mixed_assignment(fragile):
    """The transfer figures add up to the error of several layers quantized at once, as the replay's do."""
    model, inputs, names = fragile
    cal = calibrate(model, inputs, names, {}, num_steps=8, keep=4, seeds=(0, 1))
    candidates = {"mid": ["w4"], "conv_out": ["w8"], "conv_in": ["w8a8"], "attn.sdpa": ["a8"]}
    split = cal.timestep_split()
    scales = {i.name: cal.activation_scales(i.name, split) for i in cal.layers if i.kind != "attention"}
    estimate = measure_sensitivity(
        model, cal, candidates, DTYPES, scales=scales, timestep_split=split, method="transfer", probes=8
    )
    predicted = sum(estimate.relative_mse(name, fmts[0]) for name, fmts in candidates.items())
    assignment = {name: fmts[0] for name, fmts in candidates.items()}
    measured = measure_assignment(model, cal, assignment, DTYPES, scales=scales, timestep_split=split)[-1]
    assert measured == pytest.approx(-10 * np.log10(predicted), abs=1.5)
    assert estimate.model_rows == 8 * 8  # 8 rows (4 evaluations x 2 seeds) x 8 probes, in 4 passes


def test_cli_options_and_their_validation(host_int8):
    assert config_from_options("auto").sensitivity_latent == 16
    assert config_from_options("auto", sensitivity_latent=0).sensitivity_latent is None
    assert PrecisionConfig().sensitivity_latent == 16
    assert PrecisionConfig().sensitivity == "transfer"
    assert config_from_options("auto", sensitivity="replay").sensitivity == "replay"
    with pytest.raises(PrecisionError, match="sensitivity must be one of transfer, replay, got 'exact'"):
        resolve_request(PrecisionConfig(sensitivity="exact"), None, host_int8)
    with pytest.raises(PrecisionError, match="sensitivity_probes must be at least 1"):
        resolve_request(PrecisionConfig(sensitivity_probes=0), None, host_int8)


class _InPlaceDenoiser(torch.nn.Module):
    """Updates its timestep embedding in place: fine for inference, but the embedding layer's output is a
    leaf of the transfer's backward graph, which autograd refuses to see changed in place."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.time = torch.nn.Linear(2, 8)
        self.conv_in = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = torch.nn.Conv2d(8, 4, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        self.eval().requires_grad_(False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        angle = timestep.float()[:, None] / 1000.0
        embedding = self.time(torch.cat([angle.sin(), angle.cos()], dim=1))
        embedding.mul_(0.5)
        return self.conv_out(torch.nn.functional.silu(self.conv_in(sample) + embedding[:, :, None, None]))


def test_a_model_without_a_usable_backward_pass_is_measured_by_replay(host_int8):
    model = _InPlaceDenoiser()
    inputs = (torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([500.0]))
    weights = {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}
    config = PrecisionConfig(budget={"sqnr_db": 30}, keep=2, seeds=(0,))
    plan = make_plan(model, inputs, ("sample", "timestep"), {}, host_int8, config, weights=weights)
    assert any("sensitivity by replay: the model has no usable backward pass" in n for n in plan.notes)
    assert plan.calibration["sensitivity"]["method"] == "replay"
    assert plan.calibration["sensitivity"]["replays"] > 0
    assert all(layer.sqnr_db for layer in plan.layers)  # every layer measured all the same
