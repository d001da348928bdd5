"""Tests of edgediff.targets: built-in specs, user YAML loading, validation errors and the cost model."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgediff.errors import TargetSpecError
from edgediff.targets import CostModel, TargetSpec, list_targets, load_target, validate_target_file

BUILTINS = ["adreno-740", "ane-like", "arm-a55", "arm-a78", "host"]


def write_yaml(tmp_path: Path, data: Any, name: str = "my.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def a78_dict() -> dict[str, Any]:
    """A valid spec document to mutate into invalid ones."""
    return load_target("arm-a78").to_dict()


def test_list_targets_is_sorted_builtin_names() -> None:
    assert list_targets() == BUILTINS


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_loads_and_builds_a_tvm_target(name: str) -> None:
    spec = load_target(name)
    assert spec.name == name
    assert spec.source == f"builtin:{name}"
    assert spec.kind in ("cpu", "gpu", "npu")
    assert set(spec.compute.peak_gflops) == set(spec.dtypes)
    target = spec.build_target()
    expected_kind = "opencl" if spec.kind == "gpu" else "llvm"
    assert target.kind.name == expected_kind
    assert "\n" in spec.describe() and name in spec.describe()


def test_cpu_build_target_carries_mcpu_mattr_and_num_cores() -> None:
    target = load_target("arm-a78").build_target()
    assert target.attrs["mtriple"] == "aarch64-linux-gnu"
    assert target.attrs["mcpu"] == "cortex-a78"
    assert int(target.attrs["num-cores"]) == 4
    assert bool(target.attrs["feature.has_dotprod"]) and bool(target.attrs["feature.has_fp16_simd"])


def test_gpu_build_target_attaches_aarch64_host() -> None:
    spec = load_target("adreno-740")
    target = spec.build_target()
    assert target.attrs["device"] == "adreno"
    assert target.host is not None and target.host.attrs["mtriple"] == "aarch64-linux-gnu"
    assert spec.features["texture_memory"] is True


def test_host_resolves_auto_values_and_runs_on_host() -> None:
    spec = load_target("host")
    assert spec.runs_on_host
    expected_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert spec.compute.cores == expected_cores
    assert spec.compute.vector_bits in (128, 256, 512)
    assert spec.tvm_target.get("mcpu") != "auto"  # type: ignore[union-attr]
    assert "auto" not in json.dumps(spec.to_dict())


@pytest.mark.parametrize("name", ["arm-a78", "arm-a55", "adreno-740"])
def test_cross_targets_do_not_run_on_host(name: str) -> None:
    assert not load_target(name).runs_on_host


def test_user_yaml_loads_from_str_and_path(tmp_path: Path) -> None:
    data = a78_dict()
    data["name"] = "my-board"
    data["compute"]["cores"] = 2
    path = write_yaml(tmp_path, data, "board.yml")
    spec = load_target(path)
    assert spec.name == "my-board"
    assert spec.source == str(path.resolve())
    assert spec.build_target().attrs["num-cores"] == 2
    assert load_target(str(path)) == spec
    assert validate_target_file(path) == spec


def test_user_native_yaml_may_use_auto(tmp_path: Path) -> None:
    data = load_target("host").to_dict()
    data["name"] = "native"
    data["tvm"]["target"] = {"kind": "llvm", "mcpu": "auto"}
    data["compute"].update(cores="auto", vector_bits="auto")
    spec = load_target(write_yaml(tmp_path, data))
    host = load_target("host")
    assert spec.compute == host.compute
    assert spec.tvm_target == host.tvm_target


@pytest.mark.parametrize("name", BUILTINS)
def test_to_dict_yaml_round_trip_gives_equal_spec(tmp_path: Path, name: str) -> None:
    spec = load_target(name)
    data = spec.to_dict()
    json.dumps(data)  # must be JSON-serialisable for manifests
    again = load_target(write_yaml(tmp_path, data))
    assert again == spec
    assert hash(again) == hash(spec)
    assert again.source != spec.source


def test_spec_passes_through_load_target() -> None:
    spec = load_target("arm-a55")
    assert load_target(spec) is spec
    assert isinstance(spec, TargetSpec)


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    data[last] = value


def _delete(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        data = data[key]
    del data[last]


# (mutation, fragments the one-line error must contain besides the file name)
BAD_SPECS: dict[str, tuple[Any, list[str]]] = {
    "wrong type": (
        lambda d: _set(d, "memory.sram_bytes", "abc"),
        ["key 'memory.sram_bytes'", "expected a non-negative integer", "got 'abc'"],
    ),
    "bool is not an int": (lambda d: _set(d, "compute.cores", True), ["key 'compute.cores'", "got True"]),
    "negative number": (lambda d: _set(d, "memory.l1_bytes", -1), ["key 'memory.l1_bytes'", "got -1"]),
    "zero bandwidth": (
        lambda d: _set(d, "memory.dram_bandwidth_gbps", 0),
        ["key 'memory.dram_bandwidth_gbps'", "expected a positive number"],
    ),
    "unknown top-level key": (
        lambda d: _set(d, "dtype", ["int8"]),
        ["key 'dtype'", "did you mean 'dtypes'?"],
    ),
    "unknown nested key": (
        lambda d: (_delete(d, "memory.dram_bandwidth_gbps"), _set(d, "memory.dram_bandwith_gbps", 1.0)),
        ["key 'memory.dram_bandwith_gbps'", "unknown key", "did you mean 'dram_bandwidth_gbps'?"],
    ),
    "missing required key": (
        lambda d: _delete(d, "memory.l2_bytes"),
        ["key 'memory.l2_bytes'", "missing required key", "expected a non-negative integer"],
    ),
    "missing section": (lambda d: _delete(d, "compute"), ["key 'compute'", "missing required key"]),
    "unknown dtype": (
        lambda d: _set(d, "dtypes", ["float32", "float33"]),
        ["key 'dtypes[1]'", "got 'float33'", "did you mean 'float32'?"],
    ),
    "peak for unknown dtype": (
        lambda d: _set(d, "compute.peak_gflops.fp32", 1.0),
        ["key 'compute.peak_gflops.fp32'", "unknown key"],
    ),
    "peak missing for a dtype": (
        lambda d: _delete(d, "compute.peak_gflops.int8"),
        ["key 'compute.peak_gflops'", "missing int8"],
    ),
    "bad layout": (lambda d: _set(d, "layout", "NHCW"), ["key 'layout'", "expected one of NCHW, NHWC"]),
    "bad name": (lambda d: _set(d, "name", "Arm A78"), ["key 'name'", "got 'Arm A78'"]),
    "bad tvm target kind": (
        lambda d: _set(d, "tvm.target", {"kind": "nonsense"}),
        ["key 'tvm.target'", "nonsense", "is not defined"],
    ),
    "old tvm string form": (
        lambda d: _set(d, "tvm.target", "llvm -mtriple=aarch64-linux-gnu"),
        ["key 'tvm.target'", "no longer supported"],
    ),
    "unknown tvm attr": (
        lambda d: _set(d, "tvm.target.num_cores", 4),
        ["key 'tvm.target'", "Unknown config option 'num_cores'"],
    ),
    "bad tvm host": (lambda d: _set(d, "tvm.host", {"kind": "nope"}), ["key 'tvm.host'", "nope"]),
    "mcpu llvm does not know": (
        lambda d: _set(d, "tvm.target.mcpu", "cortex-a99"),
        ["key 'tvm.target.mcpu'", "got 'cortex-a99'"],
    ),
    "kind does not match tvm target": (
        lambda d: _set(d, "kind", "gpu"),
        ["key 'tvm.target'", "for kind 'gpu'", "got 'llvm'"],
    ),
    "num-cores disagrees with cores": (
        lambda d: _set(d, "tvm.target.num-cores", 8),
        ["key 'tvm.target.num-cores'", "got 8"],
    ),
    "auto on a cross target": (
        lambda d: _set(d, "compute.cores", "auto"),
        ["key 'compute.cores'", "'auto' is only allowed"],
    ),
    "unknown op": (
        lambda d: _set(d, "ops", ["relax.nn.conv2", "relax.add"]),
        ["key 'ops[0]'", "did you mean 'relax.nn.conv2d'?"],
    ),
    "feature not a bool": (
        lambda d: _set(d, "features", {"texture_memory": "yes"}),
        ["key 'features.texture_memory'"],
    ),
    "npu section on a cpu": (
        lambda d: _set(d, "npu", {"tensor_engine": [16, 16], "dma_bandwidth_gbps": 10}),
        ["key 'npu'", "for kind 'cpu'"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_invalid_spec_names_file_and_key(tmp_path: Path, case: str) -> None:
    mutate, fragments = BAD_SPECS[case]
    data = a78_dict()
    mutate(data)
    path = write_yaml(tmp_path, data)
    with pytest.raises(TargetSpecError) as info:
        load_target(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(str(path.resolve()) + ": ")
    for fragment in fragments:
        assert fragment in message


def test_invalid_yaml_syntax_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("name: broken\ndescription: x\nkind: cpu: gpu\n")
    with pytest.raises(TargetSpecError, match=r"broken\.yaml: invalid YAML at line 3, column \d+: "):
        load_target(path)


@pytest.mark.parametrize(("text", "got"), [("- a\n- b\n", "got list"), ("", "got an empty document")])
def test_non_mapping_document_is_rejected(tmp_path: Path, text: str, got: str) -> None:
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(TargetSpecError, match=f"list.yaml: expected a mapping .*{got}"):
        load_target(path)


def test_unknown_target_name_lists_builtins() -> None:
    with pytest.raises(TargetSpecError) as info:
        load_target("arm-a77")
    assert str(info.value) == (
        "unknown target 'arm-a77'; built-in targets: adreno-740, ane-like, arm-a55, arm-a78, host; "
        "or pass a path to a target YAML"
    )


def test_missing_file_and_wrong_suffix(tmp_path: Path) -> None:
    with pytest.raises(TargetSpecError, match=r"nope\.yaml: target file does not exist"):
        load_target(tmp_path / "nope.yaml")
    notes = tmp_path / "spec.txt"
    notes.write_text("name: x\n")
    with pytest.raises(TargetSpecError, match=r"spec\.txt: expected a target YAML file"):
        validate_target_file(notes)


def test_supports_dtype_and_op() -> None:
    npu = load_target("ane-like")
    assert npu.supports_dtype("float16") and not npu.supports_dtype("float32")
    assert npu.supports_op("relax.nn.conv2d") and not npu.supports_op("relax.nn.conv3d")
    assert npu.npu is not None and npu.npu.tensor_engine == (16, 16)
    assert load_target("arm-a78").supports_op("relax.nn.conv3d")


def test_cost_model_roofline_hand_computed() -> None:
    # arm-a78: 153.6 GFLOP/s float32, 614.4 GOP/s int8, 51.2 GB/s DRAM.
    model = CostModel(load_target("arm-a78"))
    assert model.peak_flops("float32") == pytest.approx(153.6e9)
    # Compute-bound: 1.536 GFLOP takes 10 ms; its 5.12 MB of traffic alone would take 0.1 ms.
    assert model.estimate_seconds(1.536e9, 5.12e6) == pytest.approx(0.01)
    # Memory-bound: 512 MB takes 10 ms; its 1.536 MFLOP alone would take 10 us.
    assert model.estimate_seconds(1.536e6, 5.12e8) == pytest.approx(0.01)
    # int8 is 4x faster, so the same compute-bound work takes a quarter of the time.
    assert model.estimate_seconds(1.536e9, 0, dtype="int8") == pytest.approx(0.0025)
    assert model.arithmetic_intensity_ridge("float32") == pytest.approx(3.0)
    assert model.arithmetic_intensity_ridge("int8") == pytest.approx(12.0)
    assert [model.vector_lanes(d) for d in ("float32", "float16", "int8")] == [4, 8, 16]


def test_cost_model_fits_memory_levels() -> None:
    npu = CostModel(load_target("ane-like"))
    assert npu.fits(4 * 1024 * 1024, "sram") and not npu.fits(4 * 1024 * 1024 + 1, "sram")
    assert not npu.fits(1, "l1")  # the NPU has no caches
    cpu = CostModel(load_target("arm-a78"))
    assert not cpu.fits(1, "sram")
    assert cpu.fits(65536, "l1") and not cpu.fits(65537, "l1") and cpu.fits(65537, "l2")
    with pytest.raises(ValueError, match="unknown memory level 'l3'"):
        cpu.fits(1, "l3")  # type: ignore[arg-type]


def test_cost_model_unsupported_dtype_names_target_and_dtype() -> None:
    with pytest.raises(TargetSpecError, match="target 'ane-like' does not support dtype 'float32'"):
        CostModel(load_target("ane-like")).estimate_seconds(1.0, 1.0, dtype="float32")
    with pytest.raises(TargetSpecError, match="unknown dtype 'float8'"):
        CostModel(load_target("arm-a78")).vector_lanes("float8")
