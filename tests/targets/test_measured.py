"""Measured kernel throughput: the `measured` block, its sidecar file, the cost model and the planner."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from edgediff.errors import TargetSpecError
from edgediff.precision import PrecisionConfig
from edgediff.precision.planner import make_plan
from edgediff.targets import CostModel, TargetSpec, load_target
from edgediff.targets.spec import measured_sidecar
from edgediff.tools.calibrate_target import Calibration, write_measured
from tests.conftest import pinned_host
from tests.precision.models import fragile_model

BLOCK = {
    "date": "2026-12-03T15:49:33+00:00",
    "cpu": "Test CPU (x86_64: int8 (avx512_vnni))",
    "command": "python -m edgediff calibrate-target --target host",
    "threads": 1,
    "gflops": {"fp32": 50.0, "w8": 25.0},
}


def with_int8(spec: TargetSpec, measured: dict[str, Any] | None = None) -> TargetSpec:
    data = spec.to_dict()
    data["dtypes"] = ["float32", "float16", "int8"]
    data["compute"]["peak_gflops"]["int8"] = 300
    data["measured"] = measured
    return TargetSpec.from_dict(data)


def a78_file(tmp_path: Path, measured: dict[str, Any] | None = None) -> Path:
    data = load_target("arm-a78").to_dict()
    data["name"] = "board"
    if measured is None:
        del data["measured"]
    else:
        data["measured"] = measured
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_measured_block_round_trips_through_yaml(tmp_path: Path) -> None:
    spec = TargetSpec.from_dict(load_target(a78_file(tmp_path, BLOCK)).to_dict())
    assert spec.measured is not None and spec.measured.gflops == {"fp32": 50.0, "w8": 25.0}
    assert spec.measured.to_dict() == BLOCK
    assert spec != load_target("arm-a78") and spec.to_dict()["measured"] == BLOCK
    assert "measured GFLOP/s fp32 50, w8 25" in spec.describe()
    assert load_target("arm-a78").measured is None  # cross targets ship spec figures only


def test_sidecar_next_to_a_user_yaml_is_picked_up(tmp_path: Path) -> None:
    path = a78_file(tmp_path)
    assert load_target(path).measured is None
    sidecar = measured_sidecar(path)
    assert sidecar == tmp_path / "board.measured.yaml"
    sidecar.write_text(yaml.safe_dump(BLOCK))
    assert load_target(path).measured.gflops["w8"] == 25.0


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"gflops": {"fp32": -1}}, "measured.gflops.fp32"),
        ({"gflops": {"int9": 3.0}}, "measured.gflops.int9"),
        ({"threads": 0}, "measured.threads"),
        ({"date": ""}, "measured.date"),
        ({"speed": 1}, "measured.speed"),
    ],
)
def test_sidecar_errors_name_the_file_and_key(tmp_path: Path, change: dict[str, Any], key: str) -> None:
    path = a78_file(tmp_path)
    measured_sidecar(path).write_text(yaml.safe_dump({**BLOCK, **change}))
    with pytest.raises(TargetSpecError, match=rf"board\.measured\.yaml: key '{key}'"):
        load_target(path)


def test_missing_measured_key_is_named(tmp_path: Path) -> None:
    block = {k: v for k, v in BLOCK.items() if k != "command"}
    with pytest.raises(TargetSpecError, match=r"board\.yaml: key 'measured\.command': missing required key"):
        load_target(a78_file(tmp_path, block))


def test_cost_model_uses_measured_throughput_only_for_measured_formats() -> None:
    spec = with_int8(pinned_host(), BLOCK)
    cost = CostModel(spec)
    flops = 1e9
    assert cost.estimate_seconds(flops, 0, "float32", fmt="fp32") == pytest.approx(flops / 50e9)
    assert cost.estimate_seconds(flops, 0, "float32", fmt="w8") == pytest.approx(flops / 25e9)
    # w8a8 was not measured: the int8 peak of the spec
    assert cost.estimate_seconds(flops, 0, "int8", fmt="w8a8") == pytest.approx(flops / 300e9)
    assert cost.estimate_seconds(flops, 0, "float32") == pytest.approx(flops / 150e9)  # no format: peak
    # memory-bound work stays memory-bound
    assert cost.estimate_seconds(1.0, 25.6e9, "float32", fmt="fp32") == pytest.approx(1.0)
    assert [cost.figure_source(f) for f in ("fp32", "w8", "w8a8")] == ["measured", "measured", "spec"]
    note = cost.sources_note(["fp32", "w8", "w8a8"])
    assert "measured for fp32, w8 (Test CPU" in note and "spec peak_gflops roofline for w8a8" in note


def plan(spec: TargetSpec, mode: str):
    model, inputs, names = fragile_model()
    weights = {k: (tuple(v.shape), "float32") for k, v in model.state_dict().items()}
    config = PrecisionConfig(mode=mode, num_steps=2, keep=1, seeds=(0,))
    return make_plan(model, inputs, names, {}, spec, config, weights=weights)


def test_planner_uses_measured_figures_and_says_so(one_torch_thread) -> None:
    spec_plan = plan(with_int8(pinned_host()), "w8")
    measured_plan = plan(with_int8(pinned_host(), BLOCK), "w8")
    assert any("spec peak_gflops roofline for" in n and "w8" in n for n in spec_plan.notes)
    assert any("measured for" in n and "w8" in n for n in measured_plan.notes)
    # the fragile model is compute-bound on these figures: w8 layers at 25 GFLOP/s, not at the fp32 peak
    w8_layers = [layer for layer in measured_plan.layers if layer.format == "w8"]
    assert w8_layers
    for measured, spec in zip(measured_plan.layers, spec_plan.layers, strict=True):
        if measured.format == "w8":
            assert measured.latency_s > spec.latency_s
    assert measured_plan.totals["latency_s"] > spec_plan.totals["latency_s"]


def test_write_measured_sidecar_and_full_yaml(tmp_path: Path) -> None:
    path = a78_file(tmp_path)
    calibration = Calibration({"fp32": 12.5}, {"fp32": 0.01}, 1e8, "dev", 4, BLOCK["date"], "cmd")
    block = calibration.measured_block()
    spec = load_target(path)
    written = write_measured(spec, str(path), block, None)
    assert written == tmp_path / "board.measured.yaml"
    assert load_target(path).measured.gflops == {"fp32": 12.5}

    host = pinned_host()
    full = write_measured(host, "host", block, str(tmp_path / "out" / "host.yaml"))
    again = load_target(full)
    assert again.name == "host-pinned-measured" and again.measured.threads == 4
    assert again.dtypes == host.dtypes and again.compute == host.compute


def test_calibrate_target_cli_measures_and_writes_a_sidecar(tmp_path: Path, monkeypatch, capsys) -> None:
    from edgediff.cli import main as cli_main

    monkeypatch.setenv("TVM_NUM_THREADS", "1")  # what the CLI sets; restored after the test
    data = pinned_host().to_dict()
    data["name"] = "here"
    path = tmp_path / "here.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert cli_main(["calibrate-target", "--target", str(path), "--formats", "fp32", "--runs", "1"]) == 0
    assert f"wrote {tmp_path / 'here.measured.yaml'}" in capsys.readouterr().out
    spec = load_target(path)
    assert spec.measured is not None and list(spec.measured.gflops) == ["fp32"]
    assert spec.measured.gflops["fp32"] > 0 and spec.measured.threads == 1
    assert spec.measured.command == f"python -m edgediff calibrate-target --target {path} --formats fp32"
    assert CostModel(spec).figure_source("fp32") == "measured"


def test_calibrate_refuses_a_cross_target_without_a_device(tmp_path: Path) -> None:
    from edgediff.tools.calibrate_target import measure

    with pytest.raises(TargetSpecError, match="target 'arm-a78' does not run on this machine"):
        measure(load_target("arm-a78"))
    with pytest.raises(TargetSpecError, match="unknown format 'int9'"):
        measure(pinned_host(), ["int9"])
    with pytest.raises(Exception, match="does not support int8"):
        measure(pinned_host(), ["w8"])
