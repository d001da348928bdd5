"""The engines a user would pick instead of edgediff, on the same ONNX export of a zoo model: onnxruntime
fp32 and int8 (its own static QDQ quantizer, per-channel weights) and OpenVINO fp32 and at its default
precision for this CPU (bf16 where the CPU has it)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PEERS = ("onnxruntime", "onnxruntime-int8", "openvino-fp32", "openvino")
# calibration batches for onnxruntime's static int8 quantizer: the example inputs at these timesteps,
# with seeded noise latents (what the model sees along a trajectory)
CALIBRATION_TIMESTEPS = (999, 800, 600, 400, 200, 50)

Run = Callable[[tuple[np.ndarray, ...]], np.ndarray]


@dataclass
class Peer:
    """A ready engine: ``run(inputs)`` returns the model output; ``precision`` says what it computes in."""

    name: str
    run: Run
    precision: str


def export_onnx(zm: Any, path: Path) -> Path:
    """The zoo model as ONNX (TorchScript exporter, weights as external data: a UNet exceeds 2 GB)."""
    import torch

    if not path.exists():
        torch.onnx.export(
            zm.module,
            tuple(zm.example_inputs),
            str(path),
            input_names=list(zm.input_names),
            dynamo=False,
            external_data=True,
        )
    return path


def calibration_feeds(zm: Any) -> list[dict[str, np.ndarray]]:
    """Inputs for static calibration: seeded noise latents at several timesteps, the example conditioning."""
    rng = np.random.default_rng(0)
    base = [np.asarray(x.numpy() if hasattr(x, "numpy") else x) for x in zm.example_inputs]
    feeds = []
    for t in CALIBRATION_TIMESTEPS:
        values = list(base)
        values[0] = rng.standard_normal(base[0].shape).astype(base[0].dtype)
        if len(values) > 1 and values[1].dtype.kind == "f":
            values[1] = np.full_like(values[1], t)
        feeds.append(dict(zip(zm.input_names, values, strict=True)))
    return feeds


def make_peer(name: str, zm: Any, workdir: Path, threads: int) -> Peer:
    """Build peer engine ``name`` (one of :data:`PEERS`) for zoo model ``zm``."""
    onnx_path = export_onnx(zm, workdir / f"{zm.name}.onnx")
    if name == "onnxruntime":
        return Peer(name, _ort_runner(onnx_path, zm.input_names, threads), "fp32")
    if name == "onnxruntime-int8":
        return Peer(name, _ort_runner(_ort_int8(onnx_path, zm), zm.input_names, threads), "int8 (QDQ)")
    if name in ("openvino", "openvino-fp32"):
        return _openvino(name, onnx_path, zm.input_names, threads, fp32=name == "openvino-fp32")
    raise ValueError(f"unknown peer engine {name!r} (known: {', '.join(PEERS)})")


def _ort_runner(path: Path, input_names: tuple[str, ...], threads: int) -> Run:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda inputs: session.run(None, dict(zip(input_names, inputs, strict=True)))[0]


def prepare_files(peers: list[str], zm: Any, workdir: Path) -> None:
    """Write the peers' model files (ONNX export, onnxruntime's int8 model) before anything large is loaded:
    the quantizer holds the model's weights three times over (its graph, an inference session, the quantized
    copy), which for a full-size UNet does not fit beside a process that already holds every other engine."""
    if peers:
        onnx_path = export_onnx(zm, workdir / f"{zm.name}.onnx")
        if "onnxruntime-int8" in peers:
            _ort_int8(onnx_path, zm)


def _ort_int8(path: Path, zm: Any) -> Path:
    """onnxruntime's own static quantizer: QDQ format, per-channel int8 weights, uint8 activations. It runs in
    a child process, so the memory its calibration takes is given back to the system when it ends."""
    import subprocess
    import sys

    out = path.with_name(path.stem + "-int8.onnx")
    if not out.exists():
        feeds_path = path.with_name(path.stem + "-calibration.npz")
        feeds = calibration_feeds(zm)
        np.savez(feeds_path, **{f"{i}/{k}": v for i, feed in enumerate(feeds) for k, v in feed.items()})
        code = "import sys; from edgediff.tools.bench.peers import quantize_int8 as q; q(*sys.argv[1:])"
        result = subprocess.run([sys.executable, "-c", code, str(path), str(out), str(feeds_path)])
        if result.returncode != 0:
            raise RuntimeError(
                f"onnxruntime's quantize_static failed on {path.name} (exit {result.returncode})"
            )
    return out


def quantize_int8(source: str, target: str, feeds_path: str) -> None:
    """Quantize ONNX model ``source`` into ``target`` with onnxruntime's static QDQ quantizer, calibrated on
    the feeds saved in ``feeds_path`` (keys ``"<batch>/<input name>"``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    with np.load(feeds_path) as saved:
        batches: dict[int, dict[str, np.ndarray]] = {}
        for key in saved.files:
            index, name = key.split("/", 1)
            batches.setdefault(int(index), {})[name] = saved[key]
    feeds = [batches[i] for i in sorted(batches)]

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    quantize_static(
        source,
        target,
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        use_external_data_format=True,
    )


def _openvino(name: str, path: Path, input_names: tuple[str, ...], threads: int, fp32: bool) -> Peer:
    import openvino as ov

    core = ov.Core()
    config: dict[str, Any] = {"INFERENCE_NUM_THREADS": threads}
    if fp32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    hint = compiled.get_property("INFERENCE_PRECISION_HINT")  # what it resolved to on this CPU
    precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
    request = compiled.create_infer_request()

    def run(inputs: tuple[np.ndarray, ...]) -> np.ndarray:
        request.infer(dict(zip(input_names, inputs, strict=True)))
        return request.get_output_tensor(0).data.copy()

    return Peer(name, run, precision)
