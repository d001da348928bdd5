"""Sensitivity measured at a small latent and transferred by layer name; the replay progress report."""

from __future__ import annotations

import re

from edgediff.precision import PrecisionConfig
from edgediff.precision.planner import make_plan
from tests.precision.models import FRAGILE


def _plan(fragile, spec, latent, messages):
    model, inputs, names = fragile
    weights = {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}
    config = PrecisionConfig(budget={"sqnr_db": 35}, sensitivity_latent=latent, keep=2, seeds=(0,))
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


def test_cli_option_zero_means_exact_full_size_sensitivity():
    from edgediff.precision.plan import config_from_options

    assert config_from_options("auto").sensitivity_latent == 16
    assert config_from_options("auto", sensitivity_latent=0).sensitivity_latent is None
    assert PrecisionConfig().sensitivity_latent == 16
