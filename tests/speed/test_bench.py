"""`edgediff bench` runs end to end on a tiny model and prints its table (no speed assertions here)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_prints_the_table_with_ratios_and_error():
    result = subprocess.run(
        [sys.executable, "-m", "edgediff", "bench", "--models", "tiny-dit", "--runs", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny-dit |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    eager, ort, edgediff_s, vs_ort, vs_eager = (float(c) for c in cells[2:7])
    assert min(eager, ort, edgediff_s) > 0
    assert abs(vs_ort - edgediff_s / ort) <= 0.01 * vs_ort + 0.01
    assert abs(vs_eager - edgediff_s / eager) <= 0.01 * vs_eager + 0.01
    error = re.search(r"max \|err\| vs eager ([0-9.e+-]+)", result.stdout)
    assert error and float(error.group(1)) < 1e-4


def test_time_alternating_gives_every_engine_one_call_per_round():
    from edgediff.tools.bench.measure import time_alternating

    order: list[str] = []
    calls = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    times = time_alternating(calls, runs=3, warmup=1)
    assert order == ["a", "b", "c"] * 4
    assert {name: len(seconds) for name, seconds in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_engine_table_has_peers_precision_builds_and_latent_psnr():
    result = subprocess.run(
        [
            sys.executable, "-m", "edgediff", "bench", "--models", "tiny-dit", "--runs", "1", "--warmup", "0",
            "--peers", "onnxruntime", "openvino-fp32", "--precisions", "w8", "--psnr-steps", "3",
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {}
    for line in result.stdout.splitlines():
        if line.startswith("| tiny-dit |"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[2]] = cells
    assert set(rows) == {"eager", "edgediff", "edgediff w8", "onnxruntime", "openvino-fp32"}
    seconds = {engine: float(cells[4]) for engine, cells in rows.items()}
    for engine, cells in rows.items():
        assert abs(float(cells[6]) - seconds["edgediff"] / seconds[engine]) <= 0.01 * float(cells[6]) + 0.01
    assert rows["edgediff w8"][3] == "w8" and rows["openvino-fp32"][3] == "f32"
    quality = {
        engine: float("inf") if cells[7] == "exact" else float(cells[7])
        for engine, cells in rows.items()
        if engine != "eager"
    }
    # float engines reproduce float torch's trajectory closely; int8 weights cost visibly more, but not all
    assert min(quality["edgediff"], quality["onnxruntime"], quality["openvino-fp32"]) > 60
    assert 10 < quality["edgediff w8"] < quality["edgediff"]


def test_onnxruntime_int8_peer_is_quantized_in_a_child_process(tmp_path):
    import numpy as np
    import onnx

    from edgediff import zoo
    from edgediff.tools.bench.peers import make_peer, prepare_files

    zm = zoo.build("tiny-dit")
    prepare_files(["onnxruntime-int8"], zm, tmp_path)
    quantized = tmp_path / "tiny-dit-int8.onnx"
    ops = {node.op_type for node in onnx.load(str(quantized), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    peer = make_peer("onnxruntime-int8", zm, tmp_path, threads=1)
    inputs = tuple(np.ascontiguousarray(x.numpy()) for x in zm.example_inputs)
    got = peer.run(inputs)
    expected = zm.module(*zm.example_inputs).detach().numpy()
    assert got.shape == expected.shape
    # int8 activations cost accuracy, but the output still follows the float model
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.9
