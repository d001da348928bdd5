"""compile_model / edgediff compile with a precision: artifacts shrink, run, and match the measurement."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import pytest
import torch
import yaml

import edgediff
from edgediff import zoo
from edgediff.cli import main as cli_main
from edgediff.errors import PrecisionError
from edgediff.precision import PrecisionConfig
from edgediff.precision.assignment import aligned
from edgediff.targets import load_target
from tests.precision.helpers import (
    A78,
    ARMV8,
    ZNVER4,
    assert_packed_for_the_kernel,
    compile_at,
    host_dot_compensated,
    host_instruction,
    plan_of,
    rewrite_counts,
    with_target,
)
from tests.precision.models import FRAGILE
from tests.precision.ties import assert_matches_measurement


def relative_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.fixture(scope="module")
def fragile_artifacts(fragile, host_int8, tmp_path_factory):
    """The fragile model compiled at its own precision and at each uniform format."""
    model, inputs, names = fragile
    root = tmp_path_factory.mktemp("fragile")
    artifacts = {}
    for precision in (None, "fp16", "w8", "int8", "w4"):
        artifacts[precision] = compile_at(model, inputs, names, host_int8, root / str(precision), precision)
    return artifacts


def test_uniform_formats_shrink_weights_bin(fragile_artifacts, host_int8):
    size = {p: a.manifest["weights"]["bytes"] for p, a in fragile_artifacts.items()}
    assert size["w4"] < size["w8"] <= size["int8"] < size["fp16"] < size[None]
    # int8 stores the same weights, packed for the int8 kernels; only conv_out's 4 output channels are
    # padded with zero rows to whole vectors of the GEMM (8 or 16 lanes): 4-12 rows of 144 bytes; on a
    # vpdpbusd host also an int32 column sum per output channel of each kernel layer
    column_sums = [
        t for t in fragile_artifacts["int8"].manifest["weights"]["tensors"] if t["dtype"] == "int32"
    ]
    assert bool(column_sums) == host_dot_compensated(host_int8)
    column_bytes = sum(aligned(4 * int(np.prod(t["shape"]))) for t in column_sums)
    assert size["int8"] - size["w8"] - column_bytes <= 12 * (16 * 9 + 8)
    assert size["w8"] < 0.4 * size[None]
    for precision in ("fp16", "w8", "int8", "w4"):
        assert (fragile_artifacts[precision].path / "weights.bin").stat().st_size == size[precision]
    tensors = {t["name"]: t for t in fragile_artifacts["w8"].manifest["weights"]["tensors"]}
    assert tensors[f"{FRAGILE}.weight"]["dtype"] == "int8"
    assert tensors[f"{FRAGILE}.weight_scale"]["shape"] == [16, 1, 1]
    assert tensors[f"{FRAGILE}.bias:reshape"]["dtype"] == "float32"  # reshaped once, at compile time
    w4 = {t["name"]: t for t in fragile_artifacts["w4"].manifest["weights"]["tensors"]}
    assert w4[f"{FRAGILE}.weight"]["dtype"] == "uint8" and w4[f"{FRAGILE}.weight"]["shape"] == [16, 80]


@pytest.mark.parametrize("precision", ["fp16", "w8", "int8", "w4"])
def test_compiled_artifact_computes_what_was_measured(fragile, fragile_artifacts, precision):
    model, inputs, _ = fragile
    artifact = fragile_artifacts[precision]
    plan = plan_of(artifact)
    got = artifact.load()(*inputs)
    # integer formats match exactly up to float32 summation order and rounding ties (tests/precision/
    # ties.py); float16 rounds intermediate attention values (q * softmax scale) that the emulation rounds
    # before scaling: within float16's resolution
    tolerance = 2e-3 if precision == "fp16" else 1e-4
    assert_matches_measurement(got, model, inputs, plan, tolerance)
    with torch.no_grad():
        float_out = model(*inputs).numpy()
    # w8 and w4 break the fragile layer: the artifact must show it, not hide it
    if precision == "fp16":
        assert relative_error(got, float_out) < 1e-2
    else:
        assert relative_error(got, float_out) > 0.2


def test_int8_activation_scales_follow_the_timestep(fragile, fragile_artifacts):
    model, inputs, _ = fragile
    artifact = fragile_artifacts["int8"]
    plan = plan_of(artifact)
    assert plan.timestep_split is not None
    layer = plan.layer("mid")
    assert layer.format == "w8a8" and len(layer.scales) == 2 and layer.scales[0] != layer.scales[1]
    # a CPU target keeps attention in float (its fused kernel), and the plan says why
    assert plan.layer("attn.sdpa").format == "fp32"
    assert any("attention layers keep float" in note for note in plan.notes), plan.notes
    module = artifact.load()
    for t in (900.0, 100.0):  # either side of the split: each must use its own scale
        at_t = (inputs[0], torch.tensor([t]))
        assert_matches_measurement(module(*at_t), model, at_t, plan, 1e-4)


def test_auto_keeps_the_fragile_layer_in_float_and_honours_pins(fragile, host_int8, tmp_path):
    model, inputs, names = fragile
    config = PrecisionConfig(mode="auto", budget={"sqnr_db": 30}, pins={"conv_*": "fp32"})
    artifact = compile_at(model, inputs, names, host_int8, tmp_path / "auto", config)
    plan = plan_of(artifact)
    chosen = {layer.name: layer.format for layer in plan.layers}
    assert chosen[FRAGILE] in ("fp32", "fp16")
    assert chosen["conv_in"] == chosen["conv_out"] == "fp32"
    assert plan.layer("conv_in").pinned and plan.layer("conv_in").sqnr_db == {"fp32": 200.0}
    assert sum(fmt in ("w8", "w8a8", "w8a8-token", "w4") for fmt in chosen.values()) >= 5
    assert plan.totals["measured_sqnr_db"] >= 30
    # attention is never a8 on a CPU target unless pinned: a8 is not even measured
    assert "a8" not in plan.layer("attn.sdpa").sqnr_db and chosen["attn.sdpa"] != "a8"
    assert_matches_measurement(artifact.load()(*inputs), model, inputs, plan, 1e-4)


def test_auto_on_tiny_dit_meets_a_bytes_budget_with_report_and_plot(host_int8, tmp_path):
    spec_file = tmp_path / "host-int8.yaml"
    spec_file.write_text(yaml.safe_dump(host_int8.to_dict()))
    out = tmp_path / "dit"
    status = cli_main(
        [
            "compile",
            "--model",
            "tiny-dit",
            "--target",
            str(spec_file),
            "-o",
            str(out),
            "-q",
            "--max-bytes",
            "150KB",
        ]
    )
    assert status == 0
    artifact = edgediff.Artifact(out)
    plan = plan_of(artifact)
    written = artifact.manifest["weights"]["bytes"]
    assert written <= 150_000 < plan.totals["float_bytes"]
    assert 0 <= plan.totals["bytes"] - written < 64  # the plan counts each tensor's alignment padding
    assert plan.mode == "auto" and plan.budget["bytes"] == 150_000
    table = {layer.name: layer for layer in plan.layers}
    assert {"fp32", "fp16", "w8", "w8a8", "w4"} <= set(table["transformer.proj_out_2"].sqnr_db)
    assert table["transformer.transformer_blocks.0.attn1.sdpa"].kind == "attention"
    # the plot and the table are written and recorded in the manifest
    record = artifact.manifest["precision"]
    png = (out / record["plot"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 700 and height >= 200
    report = (out / record["report"]).read_text()
    assert "transformer.proj_out_2" in report and "measured" in report
    json.dumps(artifact.manifest)  # the plan is plain JSON
    # numerics of the whole artifact against the float model
    zm = zoo.build("tiny-dit")
    with torch.no_grad():
        want = zm.module(*zm.example_inputs).numpy()
    got = artifact.load()(*zm.example_inputs)
    # which formats the measured plan picks differs between machines; whichever it is, the artifact computes
    # what the measurement says, up to float32 order and the rounding ties that order can flip
    assert_matches_measurement(got, zm.module, zm.example_inputs, plan, 1e-4)
    assert 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2)) > 30


def test_unreachable_budget_names_the_smallest_reachable_size(fragile, host_int8, tmp_path):
    model, inputs, names = fragile
    with pytest.raises(
        PrecisionError, match=r"no precision assignment fits 1\.00 KB on target 'host-int8': "
    ):
        compile_at(model, inputs, names, host_int8, tmp_path / "x", "auto", precision_budget={"bytes": "1KB"})
    assert not (tmp_path / "x").exists()


def test_a_dtype_the_target_lacks_is_refused_before_capture(capsys, tmp_path):
    # this host's spec without int8, whatever its CPU has (`host` lists int8 where it has VNNI / dotprod)
    data = load_target("host").to_dict()
    data.update(name="host-float", dtypes=["float32", "float16"])
    data["compute"]["peak_gflops"] = {"float32": 150, "float16": 75}
    spec_file = tmp_path / "host-float.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    args = ["compile", "--model", "tiny-dit", "--target", str(spec_file), "--precision", "int8"]
    status = cli_main([*args, "-o", str(tmp_path / "y")])
    assert status == 1
    message = capsys.readouterr().err.strip()
    assert message == (
        "edgediff: error: target 'host-float' does not support int8 (needed by precision 'w8a8'); "
        "it computes in float32, float16"
    )
    pins = PrecisionConfig(pins={"*.proj_out_2": "int4"})
    with pytest.raises(
        PrecisionError, match=r"target 'adreno-740' does not support int8 \(needed by pinned layer"
    ):
        edgediff.compile_model(
            "tiny-dit", target="adreno-740", precision=pins, output_dir=tmp_path, progress=False
        )


def _kernels_reading(mod, param: str) -> list[tuple[str, str]]:
    """(kernel name, output dtype) of every call_tir in main that takes the parameter named ``param``."""
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            args = expr.args[1].fields
            if any(isinstance(a, relax.Var) and a.name == param for a in args):
                found.append((expr.args[0].name_hint, str(expr.ty.dtype)))

    relax.analysis.post_order_visit(mod["main"], visit)
    return found


@pytest.mark.parametrize("precision", ["w8", "w4"])
def test_where_fuse_ops_puts_the_dequantization(fragile, fragile_artifacts, host_int8, precision):
    """int8 weights go straight into the conv kernel, whose epilogue applies the scale (and bias); int4
    weights need a dequantize kernel of their own, because FuseOps never fuses ops *into* a conv/matmul's
    inputs (what the cost model charges w4 for)."""
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    model, inputs, names = fragile
    imported = import_to_relax(capture(model, inputs, input_names=names))
    plan = plan_of(fragile_artifacts[precision])
    options = {"mixed-precision": {"plan": plan, "weight_names": imported.weight_names}}
    mod, _ = run_passes(imported.mod, host_int8, ["mixed-precision", "legalize", "fuse-ops"], options=options)
    readers = _kernels_reading(mod, f"{FRAGILE}.weight")
    assert len(readers) == 1
    name, dtype = readers[0]
    if precision == "w8":
        assert "conv2d" in name and "multiply" in name and "add" in name, name
    else:
        assert "conv2d" not in name and dtype == "float32", name
        assert _kernels_reading(mod, f"{FRAGILE}.weight_scale") == readers


# ------------------------------------------------------------------ w8a8 Linear layers on the int8 kernel


def _int8_passes(fragile, fragile_artifacts, spec, precision="int8"):
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    model, inputs, names = fragile
    imported = import_to_relax(capture(model, inputs, input_names=names))
    options = {
        "mixed-precision": {
            "plan": plan_of(fragile_artifacts[precision]),
            "weight_names": imported.weight_names,
        }
    }
    passes = ["mixed-precision", "legalize", "lift-weight-transforms"]
    return run_passes(imported.mod, spec, passes, options=options)


def _report(results, name):
    return next(r.report for r in results if r.name == name)


@pytest.mark.parametrize(("target", "instruction"), [(ZNVER4, "avx512-vnni vpdpbusd"), (A78, "neon sdot")])
def test_int8_linear_layers_call_the_int8_kernel_with_packed_weights(
    fragile, fragile_artifacts, host_int8, target, instruction
):
    """Each w8a8 Linear becomes one call of the int8 GEMM (bias in its epilogue) on packed int8 weights that
    lift-weight-transforms computes at compile time: no weight stays behind in main, none widens."""
    mod, results = _int8_passes(fragile, fragile_artifacts, with_target(host_int8, target))
    rewritten = _report(results, "mixed-precision").rewritten
    assert rewritten[f"int8 kernel ({instruction})"] == rewritten["linear w8a8"] == 5
    assert rewritten["int8 kernel bias fused"] == 5
    lifted = _report(results, "lift-weight-transforms")
    assert lifted.kept_unlifted_weights == 0
    params = set(mod["main"].params)
    kernels = [
        call.args[1].fields
        for call in _calls(mod["main"])
        if call.args[0].name_hint.startswith("int8_matmul")
    ]
    assert len(kernels) == 5 + 4  # the Linear layers and the convs (tests/precision/test_int8_conv.py)
    lanes = 16 if instruction.startswith("avx512") else 4
    for a, w, compensation, _a_scale, _w_scale, bias in kernels:
        assert str(a.ty.dtype) == ("uint8" if lanes == 16 else "int8")
        # the packed weight is a parameter of main: packed at compile time, read as stored
        assert w in params and str(w.ty.dtype) == "int8" and len(w.ty.shape) == 4 and int(w.ty.shape[3]) == 4
        assert int(w.ty.shape[2]) % lanes == 0
        assert str(compensation.ty.dtype) == "int32" and (compensation in params) == (lanes == 16)
        assert bias in params  # the Linear's own bias, not a zero constant
    # vpdpbusd's compensation (128 * column sums of the weight) is a stored weight, lifted
    outputs = lifted.weight_transform.outputs
    assert any("sum" in " ".join(o.kernels) for o in outputs) == (lanes == 16)


def _calls(func):
    from tvm import relax

    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == "relax.call_tir":
            found.append(expr)

    relax.analysis.post_order_visit(func, visit)
    return found


def test_int8_linear_without_a_dot_product_step_keeps_the_relax_matmul(fragile, fragile_artifacts, host_int8):
    """Arm without dotprod has only the kernel's portable step, no faster than TVM's: the Relax int8
    matmul stays."""
    mod, results = _int8_passes(fragile, fragile_artifacts, with_target(host_int8, ARMV8))
    rewritten = _report(results, "mixed-precision").rewritten
    assert rewritten["linear w8a8"] == 5 and not any(k.startswith("int8 kernel") for k in rewritten)
    assert not [c for c in _calls(mod["main"]) if c.args[0].name_hint.startswith("int8_matmul")]


def test_int8_artifact_runs_its_linear_layers_on_the_int8_kernel(fragile_artifacts, host_int8):
    """The artifact that test_compiled_artifact_computes_what_was_measured[int8] checks against the torch
    fake-quant reference is the one with the kernel: its report counts it, its weights.bin holds the packed
    weights."""
    instruction = host_instruction(host_int8)
    if instruction == "portable":
        pytest.skip("this CPU has no int8 dot-product step (AVX2, VNNI, dotprod): the Relax path is used")
    artifact = fragile_artifacts["int8"]
    assert rewrite_counts(artifact)[f"int8 kernel ({instruction})"] == 5
    assert_packed_for_the_kernel(artifact, "attn.to_q.weight", host_int8)


def test_per_token_int8_build_matches_the_measurement(fragile, host_int8, tmp_path):
    """w8a8-token: per-token scales computed at run time, the GEMM on the int8 kernel; the artifact
    computes what the torch fake-quant measurement says."""
    model, inputs, names = fragile
    artifact = compile_at(model, inputs, names, host_int8, tmp_path / "token", "w8a8-token")
    plan = plan_of(artifact)
    assert plan.layer("attn.to_q").format == "w8a8-token"
    rewritten = rewrite_counts(artifact)
    # convs fall back to static w8a8 (runtime/quantize.py UNIFORM_FALLBACK), on the int8 conv kernel
    assert rewritten["conv2d w8a8"] == 4
    if host_instruction(host_int8) != "portable":
        assert rewritten[f"int8 kernel ({host_instruction(host_int8)})"] == 5
        assert rewritten[f"int8 kernel conv2d ({host_instruction(host_int8)})"] == 4
    for t in (900.0, 100.0):
        at_t = (inputs[0], torch.tensor([t]))
        assert_matches_measurement(artifact.load()(*at_t), model, at_t, plan, 1e-4)


def test_the_manifest_says_where_an_auto_compile_spent_its_time(fragile, host_int8, tmp_path):
    from edgediff.runtime.artifact import describe_manifest

    model, inputs, names = fragile
    artifact = compile_at(
        model, inputs, names, host_int8, tmp_path / "auto", "auto", precision_budget={"sqnr_db": 30}
    )
    stages = artifact.manifest["stage_seconds"]
    # progress counts ("sensitivity 3/40 ETA 00:02") and per-pass labels fold into one stage each
    assert list(stages)[:3] == ["capture (torch.export)", "import (fx -> Relax)", "precision: calibrate"]
    assert {"precision: sensitivity", "precision: check (all layers at once, full size)", "passes"} <= set(
        stages
    )
    assert "build (TVM)" in stages and not any(re.search(r"\d+/\d+", name) for name in stages)
    assert all(seconds >= 0 for seconds in stages.values())
    assert sum(stages.values()) <= artifact.manifest["compile_seconds"] + 0.05
    line = next(x for x in describe_manifest(artifact.manifest).splitlines() if x.startswith("  stages"))
    assert "precision: sensitivity" in line and "build (TVM)" in line
