"""fx / ONNX -> Relax, with weights kept as function inputs.

Weights stay parameters of ``main`` (``keep_params_as_input``) and are detached into a list, so the compiled
library holds code only and the weights are written beside it: a multi-GB UNet must not be baked into a
``.so``, and later stages (LoRA merging, re-quantisation) rewrite weights without a rebuild.

Before TVM's importer runs we check every fx node against its converter table, so an unsupported op is
reported with the op, the fx node and the ``nn.Module`` path it came from instead of a ``KeyError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgediff.errors import CaptureError, UnsupportedOpError, first_line
from edgediff.frontend.capture import CapturedModel
from edgediff.runtime.tensor_info import TensorInfo


@dataclass
class ImportedModel:
    """A Relax module whose ``main`` takes the user inputs followed by the weights."""

    mod: Any  # tvm.IRModule
    # TVM tensors as the importer made them; converted to numpy one at a time when written, so a multi-GB
    # model is not held twice
    weights: list[Any]
    weight_names: list[str]  # torch state-dict names (or ONNX initializer names)
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


def import_to_relax(captured: CapturedModel) -> ImportedModel:
    """Translate a captured model to Relax and detach its weights."""
    if captured.source == "onnx":
        return _import_onnx(captured)
    return _import_exported_program(captured)


def module_path(node: Any) -> str:
    """The dotted ``nn.Module`` path an fx node was traced from ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path, _ = list(stack.values())[-1]
    return str(path).replace("L['self'].", "").replace("L__self___", "")


def _node_location(node: Any) -> str:
    path = module_path(node)
    return f"fx node '{node.name}'" + (f" in module '{path}'" if path else " at the top level")


def _guarded(convert: Any, node_op: str) -> Any:
    """Wrap one converter so that its failures name the node they failed on."""

    def run(node: Any, *rest: Any) -> Any:
        try:
            return convert(node, *rest)
        except Exception as err:
            raise CaptureError(
                f"cannot convert op '{node_op}' ({_node_location(node)}): {first_line(err)}"
            ) from err

    return run


def _import_exported_program(captured: CapturedModel) -> ImportedModel:
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    try:
        program = captured.exported_program.run_decompositions()
    except Exception as err:
        raise CaptureError(f"decomposing {captured.name} to core ATen ops failed: {first_line(err)}") from err

    importer = ExportedProgramImporter()
    unsupported = [
        node
        for node in program.graph.nodes
        if node.op == "call_function" and node.target.__name__ not in importer.convert_map
    ]
    if unsupported:
        node = unsupported[0]
        others = sorted({n.target.__name__ for n in unsupported} - {node.target.__name__})
        extra = f"; also unsupported: {', '.join(others)}" if others else ""
        raise UnsupportedOpError(
            f"unsupported op '{node.target.__name__}' ({_node_location(node)}) in {captured.name}{extra}"
        )
    importer.convert_map = {key: _guarded(convert, key) for key, convert in importer.convert_map.items()}
    try:
        mod = importer.from_exported_program(
            program,
            keep_params_as_input=True,
            unwrap_unit_return_tuple=True,
            no_bind_return_tuple=False,
            custom_convert_map=None,
        )
    except CaptureError:
        raise
    except Exception as err:
        raise CaptureError(f"importing {captured.name} into Relax failed: {first_line(err)}") from err
    mod, params = relax.frontend.detach_params(mod)
    weights = list(params.get("main", []))

    # The importer names weight inputs after the fx placeholders; map them back to state-dict names so
    # the artifact can be matched against checkpoints and LoRA files.
    signature = program.graph_signature
    placeholder_to_fqn = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    placeholder_to_fqn.update(getattr(signature, "inputs_to_lifted_tensor_constants", {}) or {})
    relax_params = list(mod["main"].params)
    num_inputs = len(relax_params) - len(weights)
    weight_names = [placeholder_to_fqn.get(v.name, v.name) for v in relax_params[num_inputs:]]
    inputs = [
        TensorInfo(name, _shape_of(var.ty), str(var.ty.dtype))
        for name, var in zip(captured.input_names, relax_params[:num_inputs], strict=True)
    ]
    return ImportedModel(mod, weights, weight_names, inputs, _outputs_of(mod, captured.output_names))


def _import_onnx(captured: CapturedModel) -> ImportedModel:
    import onnx
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    model = captured.onnx_model
    dtypes = {}
    for inp in model.graph.input:
        if inp.name in captured.onnx_shapes:
            elem = inp.type.tensor_type.elem_type
            dtypes[inp.name] = str(onnx.helper.tensor_dtype_to_np_dtype(elem))
    try:
        mod = from_onnx(
            model, shape_dict=dict(captured.onnx_shapes), dtype_dict=dtypes, keep_params_in_input=True
        )
    except Exception as err:
        raise UnsupportedOpError(f"importing ONNX model {captured.name} failed: {first_line(err)}") from err
    mod, params = relax.frontend.detach_params(mod)
    weights = list(params.get("main", []))
    relax_params = list(mod["main"].params)
    num_inputs = len(relax_params) - len(weights)
    weight_names = [v.name for v in relax_params[num_inputs:]]
    inputs = [
        TensorInfo(name, _shape_of(var.ty), str(var.ty.dtype))
        for name, var in zip(captured.input_names, relax_params[:num_inputs], strict=True)
    ]
    return ImportedModel(mod, weights, weight_names, inputs, _outputs_of(mod, captured.output_names))


def _shape_of(ty: Any) -> tuple[int, ...]:
    try:
        return tuple(int(dim) for dim in ty.shape)
    except (TypeError, ValueError) as err:
        raise CaptureError(f"only static shapes are supported so far; got {ty}") from err


def _outputs_of(mod: Any, names: tuple[str, ...] | None) -> list[TensorInfo]:
    from tvm import relax

    ret = mod["main"].ret_type if hasattr(mod["main"], "ret_type") else mod["main"].body.ty
    fields = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if names is None or len(names) != len(fields):
        names = tuple("output" if len(fields) == 1 else f"output{i}" for i in range(len(fields)))
    return [TensorInfo(n, _shape_of(f), str(f.dtype)) for n, f in zip(names, fields, strict=True)]
