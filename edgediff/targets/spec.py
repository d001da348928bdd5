"""Target specs as frozen dataclasses, and loading them from built-in names or user YAML files.

A :class:`TargetSpec` is the single description of a device that the rest of edgediff consults: how to build
the TVM target, which dtypes, layout and ops the device handles, and the compute and memory figures the
cost model uses. Specs are validated (see :mod:`edgediff.targets.schema`) before any dataclass is built, so
code holding a ``TargetSpec`` never has to re-check it.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edgediff.errors import TargetSpecError
from edgediff.runtime.arch import machine_arch, normalise_arch
from edgediff.targets.detect import Detected, detect_dtypes, missing_llvm_features
from edgediff.targets.schema import AUTO, validate, validate_measured

if TYPE_CHECKING:
    import tvm

_BUILTIN_PREFIX = "builtin:"
_YAML_SUFFIXES = (".yaml", ".yml")
#: A user target ``board.yaml`` takes its measured figures from ``board.measured.yaml`` next to it.
MEASURED_SUFFIX = ".measured.yaml"


def measured_sidecar(path: str | os.PathLike[str]) -> Path:
    """Where ``edgediff calibrate-target`` stores the measured figures of the target YAML at ``path``."""
    path = Path(path)
    return path.with_name(path.name[: -len(path.suffix)] + MEASURED_SUFFIX)


@dataclass(frozen=True)
class ComputeSpec:
    """Compute resources: core count, SIMD width and peak GFLOP/s (GOP/s for integers) per dtype."""

    cores: int
    vector_bits: int
    peak_gflops: dict[str, float]


@dataclass(frozen=True)
class MemorySpec:
    """Memory hierarchy sizes in bytes (0 = level absent) and DRAM bandwidth in GB/s."""

    sram_bytes: int
    l1_bytes: int
    l2_bytes: int
    dram_bandwidth_gbps: float


@dataclass(frozen=True)
class NpuSpec:
    """Parameters of a (simulated) NPU: the MAC array shape tiling aligns to, and DRAM<->SRAM DMA speed."""

    tensor_engine: tuple[int, int]
    dma_bandwidth_gbps: float


@dataclass(frozen=True)
class MeasuredSpec:
    """Kernel throughput measured on the device (``edgediff calibrate-target``), per precision format.

    ``gflops[fmt]`` is 2 x MACs / second of the compiled conv/linear/attention kernels at that format; the
    cost model uses it instead of the ``peak_gflops`` roofline for the formats listed, and says which
    figures were measured and which come from the spec.
    """

    date: str
    cpu: str
    command: str
    threads: int
    gflops: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "date": self.date,
            "cpu": self.cpu,
            "command": self.command,
            "threads": self.threads,
            "gflops": dict(self.gflops),
        }


@dataclass(frozen=True)
class TargetSpec:
    """A validated, fully resolved description of one deployment target.

    ``source`` records where the spec came from (``builtin:<name>`` or an absolute path); it is excluded
    from equality so that a spec re-loaded from a dump of :meth:`to_dict` compares equal to the original.
    """

    name: str
    description: str
    kind: str
    tvm_target: dict[str, Any] | str
    tvm_host: dict[str, Any] | None
    cross_compiler: str | None
    compute: ComputeSpec
    memory: MemorySpec
    dtypes: tuple[str, ...]
    layout: str
    supported_ops: tuple[str, ...] | None
    features: dict[str, bool]
    passes: tuple[str, ...] | None
    npu: NpuSpec | None = None
    measured: MeasuredSpec | None = None
    source: str = field(default="<dict>", compare=False)
    # What `dtypes: auto` / `peak_gflops: auto` were resolved from (this machine's CPU flags), for reports.
    detected: str | None = field(default=None, compare=False)

    # Frozen dataclasses with dict fields are unhashable by default; hashing the resolved content keeps
    # specs usable as cache keys and stays consistent with __eq__ (which also ignores ``source``).
    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @classmethod
    def from_dict(
        cls,
        data: Any,
        source: str = "<dict>",
        *,
        cpu_flags: set[str] | None = None,
        arch: str | None = None,
    ) -> TargetSpec:
        """Validate a parsed spec document, resolve its ``auto`` values for this machine and build the spec.

        Also the way back from a manifest: ``TargetSpec.from_dict(spec.to_dict())`` equals ``spec``.
        ``cpu_flags``/``arch`` replace this machine's CPU flags and architecture for ``auto`` values (tests
        resolve the host spec for made-up CPUs this way).
        """
        validate(data, source)
        data, detected = _resolve_auto(data, cpu_flags, arch)
        measured = data.get("measured")
        compute, memory, ops, passes = data["compute"], data["memory"], data["ops"], data.get("passes")
        npu = None
        if data.get("npu") is not None:
            rows, cols = data["npu"]["tensor_engine"]
            npu = NpuSpec((rows, cols), float(data["npu"]["dma_bandwidth_gbps"]))
        return cls(
            name=data["name"],
            description=data["description"],
            kind=data["kind"],
            tvm_target=data["tvm"]["target"],
            tvm_host=data["tvm"].get("host"),
            cross_compiler=data.get("cross_compiler"),
            compute=ComputeSpec(
                cores=compute["cores"],
                vector_bits=compute["vector_bits"],
                peak_gflops={k: float(v) for k, v in compute["peak_gflops"].items()},
            ),
            memory=MemorySpec(
                sram_bytes=memory["sram_bytes"],
                l1_bytes=memory["l1_bytes"],
                l2_bytes=memory["l2_bytes"],
                dram_bandwidth_gbps=float(memory["dram_bandwidth_gbps"]),
            ),
            dtypes=tuple(data["dtypes"]),
            layout=data["layout"],
            supported_ops=None if ops == "all" else tuple(ops),
            features=dict(data.get("features") or {}),
            passes=None if passes is None else tuple(passes),
            npu=npu,
            measured=None
            if measured is None
            else MeasuredSpec(
                date=str(measured["date"]),
                cpu=str(measured["cpu"]),
                command=str(measured["command"]),
                threads=int(measured["threads"]),
                gflops={k: float(v) for k, v in measured["gflops"].items()},
            ),
            source=source,
            detected=None if detected is None else detected.summary(),
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec in the YAML schema's shape (JSON-serialisable), e.g. for artifact manifests."""
        return {
            "name": self.name,
            "description": self.description,
            "kind": self.kind,
            "tvm": {"target": copy.deepcopy(self.tvm_target), "host": copy.deepcopy(self.tvm_host)},
            "cross_compiler": self.cross_compiler,
            "compute": {
                "cores": self.compute.cores,
                "vector_bits": self.compute.vector_bits,
                "peak_gflops": dict(self.compute.peak_gflops),
            },
            "memory": {
                "sram_bytes": self.memory.sram_bytes,
                "l1_bytes": self.memory.l1_bytes,
                "l2_bytes": self.memory.l2_bytes,
                "dram_bandwidth_gbps": self.memory.dram_bandwidth_gbps,
            },
            "dtypes": list(self.dtypes),
            "layout": self.layout,
            "ops": "all" if self.supported_ops is None else list(self.supported_ops),
            "features": dict(self.features),
            "passes": None if self.passes is None else list(self.passes),
            "npu": None
            if self.npu is None
            else {
                "tensor_engine": list(self.npu.tensor_engine),
                "dma_bandwidth_gbps": self.npu.dma_bandwidth_gbps,
            },
            "measured": None if self.measured is None else self.measured.to_dict(),
        }

    def build_target(self) -> tvm.target.Target:
        """The TVM target to compile for, with the host target attached when the spec has one.

        For CPU specs, ``num-cores`` is filled from ``compute.cores`` when the llvm target dict lacks it, so
        TVM's thread pool and schedules see the same core count as the cost model.
        """
        import tvm  # deferred: importing TVM takes seconds

        target = self.tvm_target
        if self.kind == "cpu" and isinstance(target, dict) and target["kind"] == "llvm":
            target = {"num-cores": self.compute.cores, **target}
        return tvm.target.Target(target, host=self.tvm_host)

    @property
    def runs_on_host(self) -> bool:
        """True when code built for this spec can run on this machine: an llvm target for this machine's arch.

        Device targets (OpenCL, Vulkan, ...) never do; an llvm target without ``mtriple`` compiles for this
        machine. (TVM fills in its default triple only when ``mcpu`` is also absent, so both cases occur.)
        """
        target = self.build_target()
        if target.kind.name != "llvm":
            return False
        triple = str(target.attrs.get("mtriple", ""))
        return not triple or normalise_arch(triple.split("-")[0]) == machine_arch()

    def supports_dtype(self, dtype: str) -> bool:
        """Whether the device computes in ``dtype`` natively (e.g. ``"int8"``)."""
        return dtype in self.dtypes

    def supports_op(self, op_name: str) -> bool:
        """Whether the device runs Relax op ``op_name`` (e.g. ``"relax.nn.conv2d"``); True if ``ops: all``."""
        return self.supported_ops is None or op_name in self.supported_ops

    def cost_figures(self) -> str:
        """Where the cost model's throughput figures come from: measured (when, where, per format) or spec."""
        if self.measured is None:
            return "spec peak_gflops (roofline; not measured: run `edgediff calibrate-target`)"
        m = self.measured
        formats = ", ".join(f"{fmt} {g:.3g}" for fmt, g in m.gflops.items())
        return (
            f"measured GFLOP/s {formats} ({m.threads} thread{'s' if m.threads > 1 else ''}, {m.date}, "
            f"{m.cpu}); other formats: spec peak_gflops"
        )

    def describe(self) -> str:
        """A readable multi-line summary, as printed by ``edgediff targets show``."""
        peaks = ", ".join(f"{dtype} {gflops:g}" for dtype, gflops in self.compute.peak_gflops.items())
        memory = self.memory
        rows = [
            ("source", self.source),
            ("tvm target", json.dumps(self.tvm_target)),
            ("tvm host", "-" if self.tvm_host is None else json.dumps(self.tvm_host)),
            ("cross compiler", self.cross_compiler or "native"),
            ("compute", f"{self.compute.cores} cores, {self.compute.vector_bits}-bit vectors"),
            ("peak GFLOP/s", peaks),
            (
                "memory",
                f"SRAM {_format_bytes(memory.sram_bytes)}, L1 {_format_bytes(memory.l1_bytes)}, "
                f"L2 {_format_bytes(memory.l2_bytes)}, DRAM {memory.dram_bandwidth_gbps:g} GB/s",
            ),
            ("dtypes", ", ".join(self.dtypes)),
            ("layout", self.layout),
            ("ops", "all" if self.supported_ops is None else ", ".join(self.supported_ops)),
            ("features", ", ".join(f"{k}={str(v).lower()}" for k, v in self.features.items()) or "-"),
            ("passes", "default" if self.passes is None else ", ".join(self.passes)),
        ]
        if self.npu is not None:
            engine = "x".join(str(n) for n in self.npu.tensor_engine)
            rows.append(("npu", f"{engine} tensor engine, DMA {self.npu.dma_bandwidth_gbps:g} GB/s"))
        if self.detected is not None:
            rows.append(("detected", self.detected))
        rows.append(("cost figures", self.cost_figures()))
        rows.append(("runs on host", "yes" if self.runs_on_host else "no"))
        width = max(len(label) for label, _ in rows)
        return "\n".join(
            [f"{self.name} ({self.kind}): {self.description}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
        )


def _format_bytes(n: int) -> str:
    if n == 0:
        return "none"
    for unit, size in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


def _host_cores() -> int:
    # sched_getaffinity honours taskset/cgroup CPU limits that os.cpu_count() ignores; it is Linux-only.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def host_cpu_flags() -> set[str]:
    """CPU feature flags the OS reports (x86 'flags' / arm 'Features' in /proc/cpuinfo), else LLVM's view."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                label, _, value = line.partition(":")
                if label.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        pass
    import tvm  # deferred: only needed off Linux
    from tvm.target import codegen

    host = tvm.target.Target({"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu()})
    return {str(f) for f in codegen.llvm_get_cpu_features(host)}


def _host_vector_bits(flags: set[str]) -> int:
    if "avx512f" in flags:
        return 512
    if "avx2" in flags:
        return 256
    return 128  # SSE / NEON


def _host_mcpu() -> str | None:
    """LLVM's name for this machine's CPU (e.g. 'znver4'), or None when LLVM would not accept it."""
    from tvm.target import codegen  # deferred: importing TVM takes seconds

    cpu = str(codegen.llvm_get_system_cpu())
    if cpu == "generic" or not codegen.llvm_is_valid_cpu(cpu, codegen.llvm_get_system_triple()):
        return None
    return cpu


def _resolve_auto(
    data: Mapping[str, Any], cpu_flags: set[str] | None = None, arch: str | None = None
) -> tuple[dict[str, Any], Detected | None]:
    """A deep copy of validated ``data`` with every ``auto`` replaced by this machine's value (CPU flags and
    arch from ``cpu_flags``/``arch`` when given), and the dtype detection when ``auto`` asked for one."""
    data = copy.deepcopy(dict(data))
    compute = data["compute"]
    flags: set[str] | None = cpu_flags

    def cpu() -> set[str]:
        nonlocal flags
        if flags is None:
            flags = host_cpu_flags()
        return flags

    if compute["cores"] == AUTO:
        compute["cores"] = _host_cores()
    if compute["vector_bits"] == AUTO:
        compute["vector_bits"] = _host_vector_bits(cpu())
    detected = None
    peaks = compute["peak_gflops"]
    if data["dtypes"] == AUTO or AUTO in peaks.values():
        detected = detect_dtypes(cpu(), _arch(arch))
    if data["dtypes"] == AUTO:
        data["dtypes"] = list(detected.dtypes)
        compute["peak_gflops"] = peaks = {d: peaks[d] for d in data["dtypes"]}
        # Detected capabilities become features (explicit entries in the YAML win).
        data["features"] = {**detected.features, **(data.get("features") or {})}
    for dtype, value in peaks.items():
        if value == AUTO:
            peaks[dtype] = round(float(peaks["float32"]) * detected.peak_ratio(dtype), 3)
    target = data["tvm"]["target"]
    if isinstance(target, dict) and target.get("mcpu") == AUTO:
        mcpu = _host_mcpu()
        # Without a usable name LLVM falls back to a generic CPU, which is correct, merely slower.
        if mcpu is None:
            del target["mcpu"]
        else:
            target["mcpu"] = mcpu
            if "mattr" not in target and _arch(arch) == machine_arch():  # flags of this machine's CPU
                mattr = missing_llvm_features(cpu(), _arch(arch), lambda f: _cpu_has(mcpu, f))
                if mattr:
                    target["mattr"] = mattr
    return data, detected


def _arch(arch: str | None) -> str:
    return normalise_arch(arch) if arch else machine_arch()


def _cpu_has(mcpu: str, feature: str) -> bool:
    """Whether LLVM's CPU ``mcpu`` (of this machine's triple) has ``feature``."""
    import tvm
    from tvm.target import codegen

    return bool(codegen.target_has_features(feature, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})))


def _parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise TargetSpecError(f"{source}: invalid YAML{where}: {' '.join(str(problem).split())}") from None


def _builtin_dir() -> Any:
    return resources.files("edgediff.targets") / "builtin"


def list_targets() -> list[str]:
    """Sorted names of the built-in target specs."""
    return sorted(p.name[: -len(".yaml")] for p in _builtin_dir().iterdir() if p.name.endswith(".yaml"))


def _load_file(path: str | os.PathLike[str]) -> TargetSpec:
    resolved = Path(path).expanduser().resolve()
    source = str(resolved)
    if resolved.suffix not in _YAML_SUFFIXES:
        raise TargetSpecError(f"{source}: expected a target YAML file ending in .yaml or .yml")
    try:
        text = resolved.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TargetSpecError(f"{source}: target file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TargetSpecError(f"{source}: cannot read target file ({exc})") from None
    data = _parse_yaml(text, source)
    sidecar = measured_sidecar(resolved)
    if isinstance(data, dict) and sidecar.is_file():
        # The sidecar is newer than any measured block in the YAML itself (calibrate-target wrote it).
        block = _parse_yaml(sidecar.read_text(encoding="utf-8"), str(sidecar))
        validate_measured(block, str(sidecar))
        data = {**data, "measured": block}
    return TargetSpec.from_dict(data, source)


def load_target(name_or_path: str | os.PathLike[str] | TargetSpec) -> TargetSpec:
    """Resolve what a user passed as ``--target``: a spec (returned as is), a built-in name, or a YAML path.

    A string is a built-in name when one by that name exists; otherwise it must look like a path (contain a
    separator or end in .yaml/.yml), so that a typo in a built-in name gets the list of built-ins.
    """
    if isinstance(name_or_path, TargetSpec):
        return name_or_path
    if isinstance(name_or_path, str):
        builtins = list_targets()
        if name_or_path in builtins:
            source = _BUILTIN_PREFIX + name_or_path
            text = (_builtin_dir() / f"{name_or_path}.yaml").read_text(encoding="utf-8")
            return TargetSpec.from_dict(_parse_yaml(text, source), source)
        if not (os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith(_YAML_SUFFIXES)):
            raise TargetSpecError(
                f"unknown target {name_or_path!r}; built-in targets: {', '.join(builtins)}; "
                "or pass a path to a target YAML"
            )
    return _load_file(name_or_path)


def validate_target_file(path: str | os.PathLike[str]) -> TargetSpec:
    """Load and fully validate the target YAML at ``path`` (for ``edgediff targets validate``).

    Unlike :func:`load_target` the argument is always a path, never a built-in name.
    """
    return _load_file(path)
