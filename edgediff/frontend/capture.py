"""Model capture: turn what the user hands us into a torch.export graph or an ONNX graph.

Users pass a zoo name, a local diffusers folder, an ONNX file, a :class:`~edgediff.zoo.ZooModel` or any
``torch.nn.Module`` with example inputs. Everything ends up as a :class:`CapturedModel`: an
``ExportedProgram`` (the fx graph TVM's importer reads) or a loaded ONNX model, with names for the inputs
and outputs and the metadata the runtime needs later (prediction type, latent size, ...).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgediff.errors import CaptureError, InputError, ModelNotFoundError, first_line

if TYPE_CHECKING:
    import onnx
    import torch


@dataclass
class CapturedModel:
    """A captured graph plus what the artifact records about the model it came from."""

    name: str
    source: str  # "torch" or "onnx"
    input_names: tuple[str, ...]
    output_names: tuple[str, ...] | None
    exported_program: Any = None  # torch.export.ExportedProgram when source == "torch"
    onnx_model: onnx.ModelProto | None = None
    onnx_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    family: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    torch_module: Any = None  # kept so tests and the demo can compare against eager PyTorch
    example_inputs: tuple[Any, ...] = ()


def capture(
    model: Any,
    example_inputs: Sequence[Any] | None = None,
    *,
    input_names: Sequence[str] | None = None,
    name: str | None = None,
    batch: int | None = None,
    latent_size: int | None = None,
) -> CapturedModel:
    """Resolve ``model`` (module, ZooModel, zoo name, diffusers folder or .onnx path) and capture it.

    ``batch`` and ``latent_size`` choose the example input shapes of zoo names and diffusers folders (batch 2
    is the classifier-free-guidance build).
    """
    from edgediff import zoo

    shape_options = {k: v for k, v in (("batch", batch), ("latent_size", latent_size)) if v is not None}
    if isinstance(model, (str, os.PathLike)):
        text = os.fspath(model)
        if text.lower().endswith(".onnx"):
            _reject_shape_options(shape_options, "an ONNX file (pass example_inputs)")
            return _capture_onnx(Path(text), example_inputs, input_names=input_names, name=name)
        if os.path.isdir(text):
            model = zoo.load_local(text, **shape_options)
        elif os.path.sep in text or text.startswith("."):
            raise ModelNotFoundError(f"model path '{text}' does not exist")
        else:
            model = zoo.build(text, **shape_options)
        shape_options = {}
    _reject_shape_options(shape_options, f"a {type(model).__name__} (build it with the shapes you want)")
    if isinstance(model, zoo.ZooModel):
        return _capture_torch(
            model.module,
            tuple(example_inputs) if example_inputs is not None else model.example_inputs,
            input_names=input_names or model.input_names,
            output_names=model.output_names,
            name=name or model.name,
            family=model.family,
            meta=dict(model.meta),
        )
    import torch

    if isinstance(model, torch.nn.Module):
        if example_inputs is None:
            raise InputError(
                f"example_inputs are required to capture a {type(model).__name__}: pass a tuple of tensors "
                "with the shapes the compiled model will be called with"
            )
        if isinstance(example_inputs, torch.Tensor):
            example_inputs = (example_inputs,)
        return _capture_torch(
            model,
            tuple(example_inputs),
            input_names=input_names,
            output_names=None,
            name=name or type(model).__name__,
            family=None,
            meta={},
        )
    raise ModelNotFoundError(
        f"cannot compile a {type(model).__name__}: pass a torch.nn.Module, a zoo name, a diffusers folder "
        "or an .onnx file"
    )


def _reject_shape_options(options: dict[str, int], what: str) -> None:
    if options:
        raise InputError(
            f"{' and '.join(options)} only apply to zoo names and diffusers folders, not to {what}"
        )


def _forward_arg_names(module: torch.nn.Module, count: int) -> tuple[str, ...]:
    params = [
        p.name
        for p in inspect.signature(module.forward).parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    if len(params) >= count:
        return tuple(params[:count])
    return tuple(f"input{i}" for i in range(count))


def _capture_torch(
    module: torch.nn.Module,
    example_inputs: tuple[Any, ...],
    *,
    input_names: Sequence[str] | None,
    output_names: Sequence[str] | None,
    name: str,
    family: str | None,
    meta: dict[str, Any],
) -> CapturedModel:
    import torch

    for i, value in enumerate(example_inputs):
        if not isinstance(value, torch.Tensor):
            raise InputError(f"example input {i} is a {type(value).__name__}; only tensors can be inputs")
    names = tuple(input_names) if input_names else _forward_arg_names(module, len(example_inputs))
    if len(names) != len(example_inputs):
        raise InputError(f"{len(names)} input names given for {len(example_inputs)} example inputs")
    module = module.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(module, example_inputs)
    except Exception as err:  # torch raises many unrelated types; the message is what matters
        raise CaptureError(f"torch.export failed for {name}: {first_line(err)}") from err
    return CapturedModel(
        name=name,
        source="torch",
        input_names=names,
        output_names=tuple(output_names) if output_names else None,
        exported_program=exported,
        family=family,
        meta=meta,
        torch_module=module,
        example_inputs=example_inputs,
    )


def _capture_onnx(
    path: Path,
    example_inputs: Sequence[Any] | None,
    *,
    input_names: Sequence[str] | None,
    name: str | None,
) -> CapturedModel:
    import onnx

    if not path.is_file():
        raise ModelNotFoundError(f"ONNX file '{path}' does not exist")
    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except Exception as err:
        raise CaptureError(f"{path}: not a valid ONNX model: {first_line(err)}") from err
    initializers = {init.name for init in model.graph.initializer}
    graph_inputs = [inp for inp in model.graph.input if inp.name not in initializers]
    names = tuple(inp.name for inp in graph_inputs)
    if input_names and tuple(input_names) != names:
        raise InputError(f"{path}: the ONNX graph's inputs are {list(names)}, not {list(input_names)}")
    shapes: dict[str, tuple[int, ...]] = {}
    for i, inp in enumerate(graph_inputs):
        dims = inp.type.tensor_type.shape.dim
        if example_inputs is not None:
            if len(example_inputs) != len(graph_inputs):
                raise InputError(
                    f"{path}: {len(example_inputs)} example inputs for {len(graph_inputs)} graph inputs "
                    f"{list(names)}"
                )
            shapes[inp.name] = tuple(int(d) for d in example_inputs[i].shape)
        elif all(d.HasField("dim_value") for d in dims):
            shapes[inp.name] = tuple(int(d.dim_value) for d in dims)
        else:
            raise InputError(
                f"{path}: input '{inp.name}' has a dynamic shape; pass example_inputs to fix its shape"
            )
    return CapturedModel(
        name=name or path.stem,
        source="onnx",
        input_names=names,
        output_names=tuple(out.name for out in model.graph.output),
        onnx_model=model,
        onnx_shapes=shapes,
        meta={"onnx_file": path.name},
        example_inputs=tuple(example_inputs) if example_inputs is not None else (),
    )
