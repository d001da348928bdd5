"""The target-spec YAML schema and its validator.

The schema is declarative: :data:`SCHEMA` maps each dotted key path to a :class:`Field` saying what the
value must be and what it means. :func:`validate` walks a parsed YAML document against it, then runs the
checks that span several keys and finally asks TVM whether it accepts the target, so a bad spec fails at
load time with one line naming the file, the key and the expected value instead of deep inside a build.

Validation stops at the first error: one precise line is easier to act on than a cascade of follow-on
errors (a misspelt section name would otherwise also report every key in it as missing).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from edgediff.errors import TargetSpecError

#: Bit width of every dtype a spec may list; the cost model derives vector lanes from it.
DTYPE_BITS: dict[str, int] = {
    "float32": 32,
    "float16": 16,
    "bfloat16": 16,
    "int32": 32,
    "int16": 16,
    "int8": 8,
    "uint8": 8,
}
KINDS: tuple[str, ...] = ("cpu", "gpu", "npu")
#: Precision formats a `measured.gflops` block may give figures for (edgediff.runtime.quantize.FORMATS).
MEASURED_FORMATS: tuple[str, ...] = ("fp32", "fp16", "bf16", "w8", "w8a8", "w8a8-token", "w4", "a8")
LAYOUTS: tuple[str, ...] = ("NCHW", "NHWC", "NCHW4c", "NCHW8c")
#: The placeholder a native host spec may use for values only known on the machine that loads it.
AUTO = "auto"

# TVM target kinds that make sense for each device class; npu specs are simulated on a host CPU target
# for now, so they take any kind.
_TVM_KINDS_FOR: dict[str, tuple[str, ...]] = {
    "cpu": ("llvm", "c"),
    "gpu": ("opencl", "vulkan", "cuda", "rocm", "metal", "webgpu"),
}
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]*")


@dataclass(frozen=True)
class Field:
    """What one key of a target spec must hold.

    ``expected`` completes the sentence "expected ..." in error messages. ``item`` checks each element of
    a list and ``value`` each value of a free-form mapping, so errors can name ``dtypes[1]`` or
    ``compute.peak_gflops.int8`` rather than the whole container. ``keys`` restricts the keys of such a
    mapping and ``choices`` the value itself; both feed the "did you mean" suggestions.
    """

    expected: str
    check: Callable[[Any], bool]
    description: str
    required: bool = True
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    item: Field | None = None
    value: Field | None = None
    keys: tuple[str, ...] | None = None


def _is_int(v: Any) -> bool:
    # bool is a subclass of int in Python, but `cores: true` is a mistake, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_text(v: Any) -> bool:
    return isinstance(v, str) and v.strip() != ""


def _is_mapping(v: Any) -> bool:
    return isinstance(v, Mapping)


def _is_list(v: Any) -> bool:
    return isinstance(v, list) and len(v) > 0


def _is_distinct_list(v: Any) -> bool:
    return _is_list(v) and all(isinstance(x, (str, int, float)) for x in v) and len(set(v)) == len(v)


def _is_target_dict(v: Any) -> bool:
    return isinstance(v, Mapping) and _is_text(v.get("kind"))


def _choice(choices: tuple[str, ...], description: str) -> Field:
    return Field(
        expected="one of " + ", ".join(choices),
        check=lambda v: isinstance(v, str) and v in choices,
        description=description,
        choices=choices,
    )


_POSITIVE_INT = "a positive integer"
_NON_NEGATIVE_INT = "a non-negative integer"
_POSITIVE_NUMBER = "a positive number"


def _positive_int(description: str, allow_auto: bool = False) -> Field:
    return Field(
        expected=_POSITIVE_INT + (f" or '{AUTO}'" if allow_auto else ""),
        check=lambda v: (_is_int(v) and v > 0) or (allow_auto and v == AUTO),
        description=description,
    )


def _non_negative_int(description: str) -> Field:
    return Field(_NON_NEGATIVE_INT, lambda v: _is_int(v) and v >= 0, description)


def _positive_number(description: str) -> Field:
    return Field(_POSITIVE_NUMBER, lambda v: _is_number(v) and v > 0, description)


def _section(description: str, required: bool = True) -> Field:
    return Field("a mapping", _is_mapping, description, required=required, nullable=not required)


#: Every key a target spec may contain, by dotted path. A key whose path prefixes other keys is a section:
#: its own keys are exactly those listed here.
SCHEMA: dict[str, Field] = {
    "name": Field(
        "a lowercase name of letters, digits and '-' (e.g. 'arm-a78')",
        lambda v: isinstance(v, str) and _NAME_RE.fullmatch(v) is not None,
        "Target name used on the command line and in artifact manifests.",
    ),
    "description": Field("a non-empty string", _is_text, "One-line human description of the device."),
    "kind": _choice(KINDS, "Device class; selects the default pass pipeline."),
    "tvm": _section("How to construct the TVM 0.27 target."),
    "tvm.target": Field(
        "a TVM target tag string (e.g. 'qcom/adreno-opencl') or a target dict with a 'kind' key",
        lambda v: _is_text(v) or _is_target_dict(v),
        "TVM target as a JSON dict (TVM 0.27 rejects 'llvm -mtriple=...' strings) or a tag name.",
    ),
    "tvm.host": Field(
        "null or a target dict with a 'kind' key",
        _is_target_dict,
        "Host-side TVM target for GPU/NPU targets (the CPU that drives the device).",
        required=False,
        nullable=True,
    ),
    "cross_compiler": Field(
        "null or a compiler command (e.g. 'aarch64-linux-gnu-g++')",
        _is_text,
        "C++ compiler that links the shared library; null means the native host compiler.",
        required=False,
        nullable=True,
    ),
    "compute": _section("Compute resources used by the cost model and schedules."),
    "compute.cores": _positive_int(f"Cores (or compute units) to use; '{AUTO}' = this machine's.", True),
    "compute.vector_bits": _positive_int(
        f"SIMD register width in bits; '{AUTO}' = detected from this machine's CPU flags.", True
    ),
    "compute.peak_gflops": Field(
        "a mapping of dtype to peak GFLOP/s",
        lambda v: _is_mapping(v) and len(v) > 0,
        "Peak throughput per dtype in GFLOP/s (GOP/s for integers), one entry per listed dtype; "
        f"'{AUTO}' (native llvm only) = float32's figure scaled by what the CPU flags say this dtype gets.",
        keys=tuple(DTYPE_BITS),
        value=Field(f"{_POSITIVE_NUMBER} or '{AUTO}'", lambda v: (_is_number(v) and v > 0) or v == AUTO, ""),
    ),
    "memory": _section("Memory hierarchy used by the cost model and tiling passes."),
    "memory.sram_bytes": _non_negative_int("On-chip scratchpad (NPU SRAM / GPU local memory); 0 if none."),
    "memory.l1_bytes": _non_negative_int("L1 data cache per core, bytes."),
    "memory.l2_bytes": _non_negative_int("L2 cache, bytes."),
    "memory.dram_bandwidth_gbps": _positive_number("Peak DRAM bandwidth in GB/s."),
    "dtypes": Field(
        f"a non-empty list of distinct dtypes or '{AUTO}'",
        lambda v: v == AUTO or _is_distinct_list(v),
        f"Dtypes the device computes in natively; '{AUTO}' (native llvm only) = detected from the CPU flags "
        "(int8 with VNNI / Arm dotprod, bfloat16 with AVX512-BF16; see edgediff.targets.detect).",
        item=_choice(tuple(DTYPE_BITS), ""),
    ),
    "layout": _choice(LAYOUTS, "Preferred activation layout."),
    "ops": Field(
        "'all' or a non-empty list of distinct Relax op names",
        lambda v: v == "all" or _is_distinct_list(v),
        "Relax ops the device runs; others fall back to the host ('all' = no restriction).",
        item=Field("a Relax op name such as 'relax.nn.conv2d'", _is_text, ""),
    ),
    "features": Field(
        "a mapping of feature name to true/false",
        _is_mapping,
        "Free-form hardware flags passes may consult (e.g. texture_memory).",
        required=False,
        nullable=True,
        value=Field("true or false", lambda v: isinstance(v, bool), ""),
    ),
    "passes": Field(
        "null or a non-empty list of distinct pass names",
        _is_distinct_list,
        "Pass pipeline overriding the default one for the target's kind.",
        required=False,
        nullable=True,
        item=Field("a pass name", _is_text, ""),
    ),
    "measured": _section(
        "Kernel throughput measured on the device by `edgediff calibrate-target`; the cost model prefers it "
        "to the peak_gflops roofline for the formats it lists.",
        required=False,
    ),
    "measured.date": Field("a date string (ISO 8601)", _is_text, "When the figures were measured (UTC)."),
    "measured.cpu": Field(
        "a non-empty string", _is_text, "The CPU (model name and flags) or device they were measured on."
    ),
    "measured.command": Field("a non-empty string", _is_text, "The command that re-measures them."),
    "measured.threads": _positive_int("Threads the kernels ran on while measured."),
    "measured.gflops": Field(
        "a mapping of precision format to measured GFLOP/s",
        lambda v: _is_mapping(v) and len(v) > 0,
        "Effective throughput (2 x MACs / second) of the compiled conv/linear/attention kernels per "
        "precision format (fp32, fp16, w8, w8a8, w8a8-token, w4, a8).",
        keys=MEASURED_FORMATS,
        value=_positive_number(""),
    ),
    "npu": _section("NPU-only parameters of the simulated accelerator.", required=False),
    "npu.tensor_engine": Field(
        "a list of two positive integers [rows, cols]",
        lambda v: isinstance(v, list) and len(v) == 2 and all(_is_int(x) and x > 0 for x in v),
        "Shape of the matrix engine's MAC array; tiling passes align to it.",
    ),
    "npu.dma_bandwidth_gbps": _positive_number("DMA bandwidth between DRAM and SRAM in GB/s."),
}


def _children(prefix: str) -> dict[str, Field]:
    """Direct child keys of the section at ``prefix`` ("" for the top level, else "tvm." etc.)."""
    return {
        path[len(prefix) :]: field
        for path, field in SCHEMA.items()
        if path.startswith(prefix) and "." not in path[len(prefix) :]
    }


_SECTIONS: dict[str, dict[str, Field]] = {
    prefix: _children(prefix)
    for prefix in [""] + [p + "." for p in SCHEMA if any(q.startswith(p + ".") for q in SCHEMA)]
}


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _did_you_mean(word: Any, options: tuple[str, ...] | list[str]) -> str:
    close = difflib.get_close_matches(str(word), list(options), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _error(source: str, key: str, problem: str) -> TargetSpecError:
    # Keep every message on one line: TVM's own messages may contain newlines.
    return TargetSpecError(f"{source}: key '{key}': {' '.join(problem.split())}")


def _expected(source: str, key: str, field: Field, value: Any) -> TargetSpecError:
    suggestion = _did_you_mean(value, field.choices) if field.choices and isinstance(value, str) else ""
    return _error(source, key, f"expected {field.expected}, got {_show(value)}{suggestion}")


def _unknown_key(source: str, key: str, name: Any, allowed: tuple[str, ...] | list[str]) -> TargetSpecError:
    return _error(
        source, key, f"unknown key{_did_you_mean(name, allowed)}; expected one of {', '.join(allowed)}"
    )


def _check_value(value: Any, key: str, field: Field, source: str) -> None:
    if not field.check(value):
        raise _expected(source, key, field, value)
    if field.item is not None and isinstance(value, list):
        for index, item in enumerate(value):
            if not field.item.check(item):
                raise _expected(source, f"{key}[{index}]", field.item, item)
    if isinstance(value, Mapping):
        for name, item in value.items():
            if field.keys is not None and name not in field.keys:
                raise _unknown_key(source, f"{key}.{name}", name, field.keys)
            if field.value is not None and not field.value.check(item):
                raise _expected(source, f"{key}.{name}", field.value, item)


def _check_section(data: Mapping[str, Any], prefix: str, source: str) -> None:
    fields = _SECTIONS[prefix]
    # Unknown keys first: a misspelt key would otherwise be reported as the required key it was meant to be.
    for name in data:
        if name not in fields:
            raise _unknown_key(source, f"{prefix}{name}", name, list(fields))
    for name, field in fields.items():
        key = prefix + name
        if name not in data:
            if field.required:
                what = field.description.rstrip(".")
                raise _error(source, key, f"missing required key ({what}); expected {field.expected}")
            continue
        value = data[name]
        if value is None and field.nullable:
            continue
        _check_value(value, key, field, source)
        if key + "." in _SECTIONS:
            _check_section(value, key + ".", source)


def _is_native_llvm(target: Any) -> bool:
    """True for an llvm target dict without ``mtriple``: it compiles for whatever machine loads the spec."""
    return _is_target_dict(target) and target["kind"] == "llvm" and "mtriple" not in target


def _check_consistency(data: Mapping[str, Any], source: str) -> None:
    """Checks that relate several keys, run once every key is known to be well-formed."""
    dtypes = data["dtypes"]
    peaks = data["compute"]["peak_gflops"]
    target = data["tvm"]["target"]
    auto_peaks = [f"compute.peak_gflops.{d}" for d, v in peaks.items() if v == AUTO]
    if auto_peaks and not _is_number(peaks.get("float32")):
        raise _error(
            source,
            auto_peaks[0],
            f"expected a number; '{AUTO}' scales compute.peak_gflops.float32, which must then be a number",
        )
    if dtypes == AUTO:
        # Detection may add any dtype, so every one it can add needs a figure (a number or 'auto').
        floats = ["float32", "float16"]
        dtypes = floats + [d for d in DTYPE_BITS if d in peaks and d not in floats]
    missing = [d for d in dtypes if d not in peaks]
    if missing:
        raise _error(
            source,
            "compute.peak_gflops",
            f"expected an entry for every dtype in 'dtypes', missing {', '.join(missing)}",
        )
    for name in peaks:
        if name not in dtypes:
            raise _error(
                source,
                f"compute.peak_gflops.{name}",
                f"expected only dtypes listed in 'dtypes' ({', '.join(dtypes)}), got {name!r}",
            )

    # 'auto' reads this machine, which is only meaningful when the code is compiled for this machine too.
    autos = [f"compute.{k}" for k in ("cores", "vector_bits") if data["compute"][k] == AUTO]
    autos += ["dtypes"] if data["dtypes"] == AUTO else []
    autos += auto_peaks
    if isinstance(target, Mapping) and target.get("mcpu") == AUTO:
        autos.append("tvm.target.mcpu")
    if autos and not _is_native_llvm(target):
        raise _error(
            source,
            autos[0],
            f"expected a concrete value; '{AUTO}' is only allowed with an llvm tvm.target without 'mtriple'",
        )

    # build_target() fills num-cores from compute.cores; two different values would make TVM's thread pool
    # and the cost model disagree.
    cores = data["compute"]["cores"]
    if isinstance(target, Mapping) and cores != AUTO and target.get("num-cores", cores) != cores:
        raise _error(
            source,
            "tvm.target.num-cores",
            f"expected compute.cores ({cores}) or no num-cores at all, got {_show(target['num-cores'])}",
        )

    if data.get("npu") is not None and data["kind"] != "npu":
        raise _error(
            source, "npu", f"expected no 'npu' section for kind {data['kind']!r}; it is for kind 'npu'"
        )


def _tvm_problem(exc: Exception) -> str:
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    # TVM appends the whole config again ("... Target creation from config dict failed: {...}").
    return lines[0].split(" Target creation from")[0].rstrip(".")


def _check_tvm(data: Mapping[str, Any], source: str) -> None:
    """Ask TVM itself: the target must construct, mcpu must be known to LLVM, ops must be registered."""
    # Deferred: importing TVM takes seconds and most CLI commands never need it.
    import tvm
    from tvm.target import codegen

    target = data["tvm"]["target"]
    host = data["tvm"].get("host")
    if isinstance(target, Mapping) and target.get("mcpu") == AUTO:
        # Resolved from this machine's CPU at load time; the rest of the target still needs checking.
        target = {k: v for k, v in target.items() if k != "mcpu"}

    built: dict[str, Any] = {}
    for key, value in (("tvm.host", host), ("tvm.target", target)):
        if value is None:
            continue
        try:
            built[key] = tvm.target.Target(value)
        except Exception as exc:  # TVM raises ValueError, TypeError or its own FFI error types
            problem = f"expected a target TVM accepts, got {_show(value)} ({_tvm_problem(exc)})"
            raise _error(source, key, problem) from None

    # LLVM only logs an unknown -mcpu and silently builds generic code, so check it explicitly.
    for key, tgt in built.items():
        mcpu = tgt.attrs.get("mcpu")
        triple = tgt.attrs.get("mtriple")
        if tgt.kind.name == "llvm" and mcpu and triple and not codegen.llvm_is_valid_cpu(mcpu, triple):
            raise _error(
                source, f"{key}.mcpu", f"expected a CPU LLVM knows for {triple!r}, got {str(mcpu)!r}"
            )

    allowed = _TVM_KINDS_FOR.get(data["kind"])
    tvm_kind = built["tvm.target"].kind.name
    if allowed is not None and tvm_kind not in allowed:
        raise _error(
            source,
            "tvm.target",
            f"expected a TVM target of kind {', '.join(allowed)} for kind {data['kind']!r}, got {tvm_kind!r}",
        )

    if isinstance(data["ops"], list):
        registered = sorted(str(n) for n in tvm.ir.Op.list_op_names() if str(n).startswith("relax."))
        known = set(registered)
        for index, op in enumerate(data["ops"]):
            if op not in known:
                raise _error(
                    source,
                    f"ops[{index}]",
                    f"expected a registered Relax op name, got {op!r}{_did_you_mean(op, registered)}",
                )


def validate(data: Any, source: str) -> None:
    """Raise :class:`TargetSpecError` unless ``data`` (a parsed YAML document) is a valid target spec.

    ``source`` names the document in the message (a file path, or ``builtin:<name>``). The value ``auto``
    is accepted for ``compute.cores``, ``compute.vector_bits`` and ``tvm.target.mcpu`` of native llvm
    targets; the loader resolves it.
    """
    if not isinstance(data, Mapping):
        got = "an empty document" if data is None else type(data).__name__
        raise TargetSpecError(f"{source}: expected a mapping of target-spec keys at the top level, got {got}")
    _check_section(data, "", source)
    _check_consistency(data, source)
    _check_tvm(data, source)


def validate_measured(block: Any, source: str) -> None:
    """Raise :class:`TargetSpecError` unless ``block`` is a valid ``measured`` section (e.g. the contents
    of a ``<target>.measured.yaml`` sidecar); messages name ``source`` and the key, like :func:`validate`."""
    _check_value(block, "measured", SCHEMA["measured"], source)
    _check_section(block, "measured.", source)


def schema_reference() -> str:
    """Human-readable list of every key, for documentation and ``edgediff targets schema``-style output."""
    lines = []
    for path, field in SCHEMA.items():
        need = "required" if field.required else "optional"
        lines.append(f"{path} ({need}): {field.expected}. {field.description}".rstrip())
    return "\n".join(lines)
