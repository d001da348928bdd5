"""The host's dtypes from CPU flags: a pure function of made-up flag sets, never this machine's."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
import yaml

from edgediff.cli import main as cli_main
from edgediff.errors import TargetSpecError
from edgediff.targets import TargetSpec
from edgediff.targets.detect import detect_dtypes, missing_llvm_features

# /proc/cpuinfo excerpts of real CPUs (the flags that matter, plus a few that do not)
SKYLAKE_AVX2 = {"sse4_2", "avx", "avx2", "fma", "f16c"}
ICELAKE_SERVER = {"avx2", "avx512f", "avx512bw", "avx512_vnni"}
ALDER_LAKE = {"avx2", "fma", "avx_vnni"}
ZEN4 = {"avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx512_fp16", "amx_int8"}
CORTEX_A53 = {"fp", "asimd", "aes", "crc32"}
CORTEX_A78 = {"fp", "asimd", "fphp", "asimdhp", "asimddp", "asimdrdm"}
# LLVM's spelling (the reader's fallback off Linux)
LLVM_A78 = {"+neon", "+dotprod", "+fullfp16"}


@pytest.mark.parametrize(
    ("flags", "arch", "dtypes", "features"),
    [
        (SKYLAKE_AVX2, "x86_64", ("float32", "float16"), (False, False, False)),
        (ICELAKE_SERVER, "x86_64", ("float32", "float16", "int8"), (True, False, False)),
        (ALDER_LAKE, "x86_64", ("float32", "float16", "int8"), (True, False, False)),
        (ZEN4, "x86_64", ("float32", "float16", "int8", "bfloat16"), (True, True, False)),
        (SAPPHIRE_RAPIDS, "x86_64", ("float32", "float16", "int8", "bfloat16"), (True, True, True)),
        (CORTEX_A53, "aarch64", ("float32", "float16"), (False, False, False)),
        (CORTEX_A78, "aarch64", ("float32", "float16", "int8"), (True, False, True)),
        (LLVM_A78, "aarch64", ("float32", "float16", "int8"), (True, False, True)),
        # x86 flag names mean nothing on Arm and vice versa
        (CORTEX_A78, "x86_64", ("float32", "float16"), (False, False, False)),
        (ZEN4, "aarch64", ("float32", "float16"), (False, False, False)),
    ],
)
def test_detect_dtypes_from_flags(flags: set[str], arch: str, dtypes: tuple, features: tuple) -> None:
    found = detect_dtypes(flags, arch)
    assert found.dtypes == dtypes
    assert tuple(found.features.values()) == features
    assert list(found.features) == ["int8_dot", "bf16_dot", "fp16_compute"]


def test_summary_names_the_flag_found_and_the_ones_missing() -> None:
    assert detect_dtypes(ZEN4, "x86_64").summary() == (
        "x86_64: int8 (avx512_vnni), bfloat16 (avx512_bf16), "
        "no fp16 compute (no avx512_fp16; float16 runs via fp32 conversion)"
    )
    assert detect_dtypes(ALDER_LAKE, "x86_64").summary().startswith("x86_64: int8 (avx_vnni)")
    assert detect_dtypes(CORTEX_A53, "aarch64").summary() == (
        "aarch64: no int8 (no asimddp), no bfloat16 (not detected on aarch64), "
        "no fp16 compute (no asimdhp/fphp; float16 runs via fp32 conversion)"
    )


def host_yaml() -> dict[str, Any]:
    text = (resources.files("edgediff.targets") / "builtin" / "host.yaml").read_text(encoding="utf-8")
    return yaml.safe_load(text)


def test_host_spec_resolves_dtypes_peaks_and_features_from_flags() -> None:
    zen4 = TargetSpec.from_dict(host_yaml(), cpu_flags=ZEN4, arch="x86_64")
    assert zen4.dtypes == ("float32", "float16", "int8", "bfloat16")
    # float32 from the YAML, the others float32 x what the flags give
    assert zen4.compute.peak_gflops == {"float32": 150.0, "float16": 75.0, "int8": 600.0, "bfloat16": 300.0}
    assert zen4.compute.vector_bits == 512
    assert zen4.features == {"int8_dot": True, "bf16_dot": True, "fp16_compute": False}
    assert zen4.detected is not None and "int8 (avx512_vnni)" in zen4.detected
    assert "detected" in zen4.describe() and "bfloat16 (avx512_bf16)" in zen4.describe()

    avx2 = TargetSpec.from_dict(host_yaml(), cpu_flags=SKYLAKE_AVX2, arch="x86_64")
    assert avx2.dtypes == ("float32", "float16")
    assert avx2.compute.peak_gflops == {"float32": 150.0, "float16": 75.0}
    assert avx2.compute.vector_bits == 256

    a78 = TargetSpec.from_dict(host_yaml(), cpu_flags=CORTEX_A78, arch="aarch64")
    assert a78.dtypes == ("float32", "float16", "int8")
    assert a78.compute.peak_gflops["float16"] == 300.0  # native fp16 arithmetic: 2x float32
    assert a78.compute.vector_bits == 128


def test_flags_llvm_s_cpu_name_lacks_become_mattr_entries() -> None:
    # a VM whose CPU model LLVM reads as an older one (only VNNI) while its flags pass everything through
    assert missing_llvm_features(SAPPHIRE_RAPIDS, "x86_64", lambda f: f == "avx512vnni") == [
        "+avx512bf16",
        "+avx512fp16",
    ]
    assert missing_llvm_features(SAPPHIRE_RAPIDS, "x86_64", lambda f: True) == []
    assert missing_llvm_features(SKYLAKE_AVX2, "x86_64", lambda f: False) == []
    assert missing_llvm_features(CORTEX_A78, "aarch64", lambda f: False) == ["+dotprod", "+fullfp16"]


def test_host_build_target_has_the_instructions_its_flags_grant() -> None:
    """Whatever LLVM calls this machine's CPU, the host spec resolved with Sapphire Rapids flags builds
    with VNNI, AVX512-BF16 and AVX512-FP16, so the kernels use them (on an x86 machine LLVM names)."""
    from edgediff.runtime.arch import machine_arch

    spec = TargetSpec.from_dict(host_yaml(), cpu_flags=SAPPHIRE_RAPIDS, arch="x86_64")
    target = spec.build_target()
    if machine_arch() != "x86_64" or "mcpu" not in spec.to_dict()["tvm"]["target"]:
        assert "mattr" not in spec.to_dict()["tvm"]["target"]  # another machine's flags: left alone
        return
    from tvm.target import codegen

    assert codegen.target_has_features(["avx512vnni", "avx512bf16", "avx512fp16"], target)


def test_resolved_host_round_trips_without_redetecting() -> None:
    zen4 = TargetSpec.from_dict(host_yaml(), cpu_flags=ZEN4, arch="x86_64")
    # the resolved dict holds concrete dtypes, so a plain CPU loading it keeps them
    again = TargetSpec.from_dict(zen4.to_dict(), cpu_flags=SKYLAKE_AVX2, arch="x86_64")
    assert again == zen4 and again.detected is None


def test_explicit_features_win_over_detected_ones() -> None:
    data = host_yaml()
    data["features"] = {"int8_dot": False}
    spec = TargetSpec.from_dict(data, cpu_flags=ICELAKE_SERVER, arch="x86_64")
    assert spec.features["int8_dot"] is False and "int8" in spec.dtypes


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # 'auto' reads this machine: a cross target cannot use it
        (
            lambda d: d["tvm"].update(target={"kind": "llvm", "mtriple": "aarch64-linux-gnu"}),
            "key 'compute.cores'",
        ),
        (
            lambda d: (
                d["compute"].update(cores=2, vector_bits=128)
                or d["tvm"]["target"].update(mtriple="aarch64-linux-gnu", mcpu="cortex-a78")
            ),
            "key 'dtypes': expected a concrete value",
        ),
        (lambda d: d["compute"]["peak_gflops"].update(float32="auto"), "key 'compute.peak_gflops.float32'"),
        (lambda d: d["compute"]["peak_gflops"].pop("float16"), "missing float16"),
        (lambda d: d.update(dtypes="everything"), "key 'dtypes': expected a non-empty list"),
    ],
)
def test_auto_dtypes_errors_name_the_key(mutate, message: str) -> None:
    data = host_yaml()
    mutate(data)
    with pytest.raises(TargetSpecError, match=message):
        TargetSpec.from_dict(data, "my.yaml", cpu_flags=ZEN4, arch="x86_64")


def test_targets_list_and_show_say_what_was_detected(capsys) -> None:
    assert cli_main(["targets", "show", "host"]) == 0
    out = capsys.readouterr().out
    assert "detected" in out and ("x86_64" in out or "aarch64" in out)
    assert "cost figures    spec peak_gflops" in out
    assert cli_main(["targets", "list"]) == 0
    out = capsys.readouterr().out
    assert "detected" in out and "dtypes float32, float16" in out
