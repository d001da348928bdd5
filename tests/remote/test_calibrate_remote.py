"""calibrate-target on a device over RPC: the probe runs on the device, the figures land in the sidecar."""

from __future__ import annotations

from pathlib import Path

import yaml

from edgediff.cli import main as cli_main
from edgediff.targets import CostModel, load_target
from tests.conftest import pinned_host


def test_calibrate_target_times_the_probe_on_the_device(farm, tmp_path: Path, capsys) -> None:
    data = pinned_host().to_dict()
    data["name"] = "board"
    path = tmp_path / "board.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    argv = ["calibrate-target", "--target", str(path), "--formats", "fp32", "--runs", "2"]
    assert cli_main([*argv, "--rpc", farm.tracker, "--key", "x86"]) == 0
    out = capsys.readouterr().out
    assert "over RPC" in out and f"wrote {tmp_path / 'board.measured.yaml'}" in out
    spec = load_target(path)
    assert spec.measured is not None and spec.measured.gflops["fp32"] > 0
    assert "over RPC" in spec.measured.cpu and "--key x86" in spec.measured.command
    assert spec.measured.threads == spec.compute.cores  # the device's own thread pool
    assert CostModel(spec).figure_source("fp32") == "measured"
