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


def _ort_int8(path: Path, zm: Any) -> Path:
    """onnxruntime's own static quantizer: QDQ format, per-channel int8 weights, uint8 activations."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter(calibration_feeds(zm))

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.feeds, None)

    out = path.with_name(path.stem + "-int8.onnx")
    if not out.exists():
        quantize_static(
            str(path),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            use_external_data_format=True,
        )
    return out


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
