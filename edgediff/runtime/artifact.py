"""Reading edgediff artifacts: manifest, weights and the compiled library. Torch-free.

An artifact is a directory::

    manifest.json   model, target spec, passes and their reports, inputs/outputs, versions, file hashes
    model.so        the compiled library (or model.tar of objects when no cross compiler was installed)
    weights.bin     every weight, 64-byte aligned, in the order the compiled ``main`` takes them
    kernels/        generated device source (OpenCL C for GPU targets), for inspection

Weights live apart from the library so that a multi-GB model never goes through the linker, and so that
weights can be swapped (LoRA, re-quantisation) without a rebuild.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import ArtifactError, InputError
from edgediff.runtime.arch import machine_arch, normalise_arch
from edgediff.runtime.tensor_info import TensorInfo
from edgediff.runtime.threads import use_target_cores

FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
WEIGHTS_FILE = "weights.bin"
WEIGHT_ALIGNMENT = 64


# Spellings of the same architecture in platform.machine() and LLVM triples.
def sha256_file(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and sanity-check ``manifest.json`` of the artifact at ``path``."""
    root = Path(path)
    manifest_path = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"artifact '{root}' does not exist or is not a directory")
    if not manifest_path.is_file():
        raise ArtifactError(f"'{root}' is not an edgediff artifact: {MANIFEST_FILE} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ArtifactError(f"{manifest_path}: corrupted manifest ({err})") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: artifact format version {version}, "
            f"this edgediff reads version {FORMAT_VERSION}"
        )
    return manifest


def _check_file(root: Path, record: dict[str, Any], what: str, *, hash_it: bool) -> Path:
    path = root / record["file"]
    if not path.is_file():
        raise ArtifactError(f"{root}: {what} file '{record['file']}' is missing")
    if path.stat().st_size != record["bytes"]:
        raise ArtifactError(
            f"{root}: {what} file '{record['file']}' has {path.stat().st_size} bytes, "
            f"manifest says {record['bytes']} (corrupted or replaced)"
        )
    if hash_it and sha256_file(path) != record["sha256"]:
        raise ArtifactError(f"{root}: {what} file '{record['file']}' fails its sha256 check (corrupted)")
    return path


def target_arch(manifest: dict[str, Any]) -> str | None:
    """The CPU architecture an artifact's code was built for, from its llvm target's ``mtriple``.

    None for a target that names no triple (``host``: it was built for the machine that compiled it) and for
    device targets (OpenCL, ...), whose code needs more than a CPU.
    """
    target = manifest["target"]["tvm"]["target"]
    if not isinstance(target, dict) or target.get("kind") != "llvm" or not target.get("mtriple"):
        return None
    return normalise_arch(str(target["mtriple"]).split("-")[0])


def runs_here(manifest: dict[str, Any]) -> bool:
    """Whether this machine can run the artifact's code with the CPU runtime.

    Decided where the artifact is loaded, not where it was compiled: an arm-a78 build does not run on the x86
    machine that compiled it but does on the aarch64 device it is copied to. A target without a triple
    (``host``) keeps the compile-time answer.
    """
    arch = target_arch(manifest)
    if arch is None:
        return bool(manifest.get("runs_on_host"))
    return arch == machine_arch()


def _check_tvm_version(root: Path, manifest: dict[str, Any]) -> None:
    import tvm

    built = str(manifest.get("versions", {}).get("tvm", ""))
    # The VM bytecode and kernel ABI change between TVM minor releases.
    if built.split(".")[:2] != tvm.__version__.split(".")[:2]:
        raise ArtifactError(
            f"{root}: built with TVM {built}, but this runtime has TVM {tvm.__version__}; "
            "rebuild the artifact"
        )


def iter_weights(root: Path, manifest: dict[str, Any], *, verify: bool = True) -> Iterator[np.ndarray]:
    """Read ``weights.bin`` one tensor at a time, in call order, each into its own fresh array.

    For copying the weights into device tensors: unlike the memory map of :func:`load_weights`, whose
    pages stay resident while mapped, only one tensor is held twice at any moment, so loading an artifact
    peaks at its weights plus the largest tensor instead of twice its weights."""
    record = manifest["weights"]
    path = _check_file(root, record, "weights", hash_it=verify)
    with open(path, "rb") as handle:
        for entry in record["tensors"]:
            handle.seek(entry["offset"])
            array = np.fromfile(handle, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])))
            yield array.reshape(entry["shape"])


def read_weight(root: Path, manifest: dict[str, Any], index: int) -> np.ndarray:
    """Tensor ``index`` of ``weights.bin`` as stored (no hash check: for re-reading after a verified load)."""
    entry = manifest["weights"]["tensors"][index]
    with open(root / manifest["weights"]["file"], "rb") as handle:
        handle.seek(entry["offset"])
        array = np.fromfile(handle, dtype=np.dtype(entry["dtype"]), count=int(np.prod(entry["shape"])))
    return array.reshape(entry["shape"])


def load_weights(root: Path, manifest: dict[str, Any], *, verify: bool = True) -> list[np.ndarray]:
    """Memory-map ``weights.bin`` and return one read-only array per weight, in call order."""
    record = manifest["weights"]
    path = _check_file(root, record, "weights", hash_it=verify)
    if record["bytes"] == 0:
        return []
    blob = np.memmap(path, dtype=np.uint8, mode="r")
    arrays = []
    for entry in record["tensors"]:
        raw = blob[entry["offset"] : entry["offset"] + entry["nbytes"]]
        arrays.append(raw.view(np.dtype(entry["dtype"])).reshape(entry["shape"]))
    return arrays


@dataclass(frozen=True)
class Entry:
    """One entry function of an artifact: a multi-resolution artifact has one per compiled resolution
    (``main`` is the first, the default), any other artifact just ``main``."""

    function: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    resolution: tuple[int, int] | None  # (height, width) in pixels, when known

    def describe(self) -> str:
        size = f"{self.resolution[0]}x{self.resolution[1]}" if self.resolution else "?"
        return f"{size} ({', '.join(info.describe() for info in self.inputs[:1])})"


def manifest_entries(manifest: dict[str, Any]) -> list[Entry]:
    """The entry functions of an artifact, default first. A single-resolution artifact's resolution comes
    from its latent input and the model's VAE scale factor, when the model has one."""
    records = manifest.get("resolutions")
    if records:
        return [
            Entry(
                r["function"],
                [TensorInfo.from_dict(d) for d in r["inputs"]],
                [TensorInfo.from_dict(d) for d in r["outputs"]],
                (int(r["height"]), int(r["width"])),
            )
            for r in records
        ]
    inputs = [TensorInfo.from_dict(d) for d in manifest["inputs"]]
    scale = (manifest["model"].get("meta") or {}).get("vae_scale_factor")
    resolution = None
    if scale and inputs and len(inputs[0].shape) == 4:
        resolution = (int(inputs[0].shape[2]) * int(scale), int(inputs[0].shape[3]) * int(scale))
    return [Entry("main", inputs, [TensorInfo.from_dict(d) for d in manifest["outputs"]], resolution)]


def resolutions_text(entries: list[Entry]) -> str:
    """``512x512, 768x512`` (height x width) of the entries whose resolution is known."""
    return ", ".join(f"{e.resolution[0]}x{e.resolution[1]}" for e in entries if e.resolution) or "unknown"


# library path -> sha256 of the library first loaded from it in this process
_LOADED_LIBRARIES: dict[str, str] = {}


def _distinct_library_path(path: Path, sha256: str) -> Path:
    """``path``, or a copy named after its hash when this process already loaded a different library there.

    The dynamic loader keeps a library open by path: loading a recompiled artifact from the same directory
    again would silently run the old code (with the old shapes) instead."""
    key = str(path.resolve())
    first = _LOADED_LIBRARIES.setdefault(key, sha256)
    if first == sha256:
        return path
    import shutil
    import tempfile

    copy = Path(tempfile.gettempdir()) / "edgediff-libraries" / f"{sha256}{path.suffix}"
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_name(f".{copy.name}.{os.getpid()}")
        shutil.copyfile(path, partial)
        os.replace(partial, copy)
    return copy


class CompiledModule:
    """A host-runnable artifact as a callable: numpy (or torch) inputs in, numpy outputs out.

    ``lazy=True`` reads only the manifest: the library and the weights are loaded by the first call (or
    :meth:`load`) and dropped again by :meth:`unload`, so a pipeline under a memory cap holds one stage's
    model at a time. :meth:`set_lora` merges a LoRA into the weights (see ``runtime/lora.py``).
    """

    def __init__(self, path: str | os.PathLike, *, verify: bool = True, lazy: bool = False) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        _check_tvm_version(self.path, self.manifest)
        library = self.manifest["library"]
        if not runs_here(self.manifest):
            built_for = target_arch(self.manifest) or self.manifest["target"]["kind"]
            raise ArtifactError(
                f"{self.path}: built for target {self.manifest['target']['name']} ({built_for}), "
                f"which does not run on this machine ({platform.machine()}); copy it to the device "
                "(see `edgediff bundle`) or compile for 'host'"
            )
        if library["format"] != "shared":
            raise ArtifactError(f"{self.path}: library is {library['file']} (objects), not a loadable .so")
        self._library_path = _check_file(self.path, library, "library", hash_it=True)
        self.inputs = [TensorInfo.from_dict(d) for d in self.manifest["inputs"]]
        self.outputs = [TensorInfo.from_dict(d) for d in self.manifest["outputs"]]
        self._verify = verify
        self._vm: Any = None
        self._main: Any = None
        self._weights: list[Any] = []
        self._merged: dict[int, np.ndarray] = {}  # weights.bin index -> tensor with the LoRA merged
        self.lora: dict[str, Any] | None = None  # what set_lora merged (for reports)
        self.entries = manifest_entries(self.manifest)
        self._functions: dict[str, Any] = {}
        if not lazy:
            self.load()

    @property
    def loaded(self) -> bool:
        return self._vm is not None

    def load(self) -> None:
        """Load the library and copy the weights in (a no-op when loaded)."""
        if self.loaded:
            return
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.device = tvm.cpu()
        use_target_cores(self.manifest)  # before the first kernel starts TVM's thread pool
        library_path = _distinct_library_path(self._library_path, self.manifest["library"]["sha256"])
        self._vm = VirtualMachine(tvm.runtime.load_module(str(library_path)), self.device)
        self._main = self._vm["main"]
        self._functions = {entry.function: self._vm[entry.function] for entry in self.entries}
        weights = iter_weights(self.path, self.manifest, verify=self._verify)
        self._weights = [
            tvm.runtime.tensor(self._merged.get(i, w), self.device) for i, w in enumerate(weights)
        ]
        self._verify = False  # hashed once: a reload under a memory cap does not hash again

    def unload(self) -> None:
        """Drop the weights and the library (the next call loads them again)."""
        self._weights = []
        self._main = self._vm = None
        self._functions = {}
        import gc

        gc.collect()  # the VM and its tensors hold each other: free them now, not at the next collection

    def set_lora(self, lora: Any, role: str = "denoiser") -> dict[str, Any] | None:
        """Merge ``lora`` (a :class:`~edgediff.runtime.lora.Lora`, its layers of ``role``) into the weights,
        replacing any LoRA merged before; ``None`` restores the stored weights. Returns what was merged."""
        from edgediff.runtime.lora import merged_tensors, plan_merge

        layers = lora.for_role(role) if lora is not None else []
        targets = plan_merge(self.manifest, layers, f"{self.path}") if layers else []
        merged = merged_tensors(targets, lora.scale, self.read_weight) if targets else {}
        if self.loaded:
            import tvm

            # tensors the old LoRA touched come back from weights.bin: an exact un-merge
            for index in set(self._merged) | set(merged):
                value = merged[index] if index in merged else self.read_weight(index)
                self._weights[index] = tvm.runtime.tensor(value, self.device)
        self._merged = merged
        self.lora = None
        if targets:
            self.lora = {
                "file": lora.path,
                "scale": lora.scale,
                "layers": len(targets),
                "requantized": sum(t.format is not None for t in targets),
                "tensors": len(merged),
            }
        return self.lora

    def read_weight(self, index: int) -> np.ndarray:
        """Tensor ``index`` of weights.bin as stored (without any LoRA)."""
        return read_weight(self.path, self.manifest, index)

    @property
    def name(self) -> str:
        return str(self.manifest["model"]["name"])

    @property
    def resolutions(self) -> list[tuple[int, int]]:
        """The (height, width) pixel resolutions the artifact runs, default first (empty when unknown)."""
        return [entry.resolution for entry in self.entries if entry.resolution is not None]

    def entry_for(self, height: int | None = None, width: int | None = None) -> Entry:
        """The entry compiled for ``height`` x ``width`` pixels (a missing one: the default's); an error
        listing the compiled resolutions when there is none."""
        default = self.entries[0]
        if height is None and width is None:
            return default
        if default.resolution is None:
            raise InputError(f"{self.name}: its resolution is not known, so height/width cannot choose one")
        wanted = (height or default.resolution[0], width or default.resolution[1])
        for entry in self.entries:
            if entry.resolution == wanted:
                return entry
        raise InputError(
            f"{self.name}: not compiled for {wanted[0]}x{wanted[1]} (height x width); compiled for "
            f"{resolutions_text(self.entries)}: recompile with --resolutions to add it"
        )

    def entry_for_shape(self, shape: tuple[int, ...], index: int = 0) -> Entry | None:
        """The entry whose input ``index`` has ``shape``, if any."""
        return next((e for e in self.entries if tuple(e.inputs[index].shape) == tuple(shape)), None)

    def _select(self, inputs: tuple[Any, ...]) -> Entry:
        """The entry whose input shapes the call's inputs have (the only one, for most artifacts)."""
        if len(self.entries) == 1:
            return self.entries[0]
        shapes = [tuple(v.shape) if hasattr(v, "shape") else np.shape(v) for v in inputs]
        for entry in self.entries:
            if [info.shape for info in entry.inputs] == shapes:
                return entry
        first = self.entries[0].inputs[0]
        got = list(shapes[0]) if shapes else []
        raise InputError(
            f"{self.name}: inputs of shapes {[list(s) for s in shapes]} match no compiled resolution "
            f"('{first.name}' {got}); compiled for " + ", ".join(entry.describe() for entry in self.entries)
        )

    def _to_array(self, value: Any, info: TensorInfo) -> np.ndarray:
        if hasattr(value, "detach"):  # a torch tensor, converted without importing torch
            value = value.detach().cpu().numpy()
        array = np.asarray(value)
        if tuple(array.shape) != info.shape:
            raise InputError(
                f"{self.name}: input '{info.name}' has shape {list(array.shape)}, expected {list(info.shape)}"
            )
        if array.dtype != np.dtype(info.dtype):
            if np.can_cast(array.dtype, info.dtype, casting="same_kind"):
                array = array.astype(info.dtype)
            else:
                raise InputError(f"{self.name}: input '{info.name}' is {array.dtype}, expected {info.dtype}")
        return np.ascontiguousarray(array)

    def __call__(self, *inputs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            inputs = tuple(inputs[0][info.name] for info in self.inputs)
        if len(inputs) != len(self.inputs):
            expected = ", ".join(info.describe() for info in self.inputs)
            raise InputError(
                f"{self.name}: got {len(inputs)} inputs, expected {len(self.inputs)} ({expected})"
            )
        import tvm

        entry = self._select(inputs)  # by the input shapes: one entry per compiled resolution
        self.load()
        args = [
            tvm.runtime.tensor(self._to_array(v, info), self.device)
            for v, info in zip(inputs, entry.inputs, strict=True)
        ]
        result = self._functions[entry.function](*args, *self._weights)
        if len(self.outputs) == 1:
            return result.numpy()
        return tuple(item.numpy() for item in result)

    def __repr__(self) -> str:
        sig = ", ".join(info.describe() for info in self.inputs)
        return f"CompiledModule({self.name} @ {self.path}: ({sig}))"


def check_artifact(path: str | os.PathLike, *, verify: bool = True) -> dict[str, Any]:
    """Verify an artifact's files against its manifest without loading the library; return the manifest."""
    root = Path(path)
    manifest = read_manifest(root)
    _check_file(root, manifest["library"], "library", hash_it=verify)
    _check_file(root, manifest["weights"], "weights", hash_it=verify)
    return manifest


def load(path: str | os.PathLike, *, verify: bool = True) -> CompiledModule:
    """Load a host-runnable artifact as a callable module (checks hashes and the TVM version)."""
    return CompiledModule(path, verify=verify)


def describe_manifest(manifest: dict[str, Any], path: str | os.PathLike | None = None) -> str:
    """A readable summary of an artifact, as printed by ``edgediff inspect``."""
    model, target, library = manifest["model"], manifest["target"], manifest["library"]
    weights = manifest["weights"]
    lines = [
        f"edgediff artifact{f' {path}' if path else ''}",
        f"  model     {model['name']}" + (f" ({model['family']})" if model.get("family") else ""),
        f"  target    {target['name']} ({target['kind']}): {target.get('description', '')}",
        f"  library   {library['file']} [{library['format']}], {library['bytes']:,} bytes"
        + (f", linked with {library['compiler']}" if library.get("compiler") else ""),
        f"  weights   {weights['file']}: {len(weights['tensors'])} tensors, {weights['bytes']:,} bytes",
        "  inputs    " + "; ".join(TensorInfo.from_dict(d).describe() for d in manifest["inputs"]),
        "  outputs   " + "; ".join(TensorInfo.from_dict(d).describe() for d in manifest["outputs"]),
        *_resolution_lines(manifest),
        f"  runs here {'yes' if runs_here(manifest) else 'no (built for another machine)'}",
        f"  built     {manifest['created']} in {manifest['compile_seconds']:.1f} s with "
        + ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()),
        *_stage_lines(manifest),
        "  passes",
    ]
    for item in manifest["passes"]:
        lines.append(f"    {item['name']:<24} {item['report'].get('summary', '')}  [{item['seconds']:.2f} s]")
    lines += _memory_and_lora_lines(manifest)
    for note in manifest.get("notes", []):
        lines.append(f"  note      {note}")
    if manifest.get("device_code"):
        for kind, record in manifest["device_code"].items():
            lines.append(f"  device    {kind}: {record['kernels']} kernels in {record['file']}")
    return "\n".join(lines)


def _stage_lines(manifest: dict[str, Any]) -> list[str]:
    """Where the compile spent its time, stage by stage (artifacts before 2026-12 do not record it)."""
    stages = manifest.get("stage_seconds") or {}
    if not stages:
        return []
    return ["  stages    " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stages.items())]


def _memory_and_lora_lines(manifest: dict[str, Any]) -> list[str]:
    """``inspect``'s memory line (what loading and calling the model holds) and LoRA line."""
    from edgediff.runtime.lora import mergeable_summary
    from edgediff.runtime.memory import Footprint, format_bytes

    footprint = Footprint.of(manifest)
    lines = [f"  memory    {footprint.describe()}" + ("" if footprint.measured else " (no recorded plan)")]
    attention = (manifest.get("memory") or {}).get("attention") or {}
    if attention.get("fused_sites") or attention.get("unfused_sites"):
        lines.append(
            f"            attention: {attention.get('fused_sites', 0)} sites fused (N x N scores never held, "
            f"no slicing needed), {attention.get('unfused_sites', 0)} unfused "
            f"({format_bytes(attention.get('unfused_score_bytes', 0))} of scores, in the workspace)"
        )
    lines.append(f"  lora      {mergeable_summary(manifest)}")
    return lines


def _resolution_lines(manifest: dict[str, Any]) -> list[str]:
    """``edgediff inspect``'s resolution lines: each compiled resolution with its entry and latent input
    for a multi-resolution artifact; the one resolution, when known, for any other."""
    entries = manifest_entries(manifest)
    if "resolutions" not in manifest:
        known = resolutions_text(entries)
        return [] if known == "unknown" else [f"  resolution {known} (height x width)"]
    records = manifest["resolutions"]
    merged = manifest["library"].get("kernels")
    shared = ""
    if merged is not None and all("kernels" in r for r in records):
        shared = f"; {sum(r['kernels'] for r in records) - merged} kernels shared by entries"
    lines = [f"  resolutions {len(entries)} (height x width), default first; weights stored once{shared}:"]
    for entry, record in zip(entries, records, strict=True):
        kernels = f", {record['kernels']} kernels" if "kernels" in record else ""
        lines.append(f"    {entry.describe():<40} entry {entry.function}{kernels}")
    return lines


class Artifact:
    """A compiled artifact on disk: what :func:`edgediff.compile_model` returns."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)

    @property
    def library_path(self) -> Path:
        return self.path / self.manifest["library"]["file"]

    @property
    def runs_on_host(self) -> bool:
        """Whether this machine can load and run the artifact (see :func:`runs_here`)."""
        return runs_here(self.manifest)

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo.from_dict(d) for d in self.manifest["inputs"]]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo.from_dict(d) for d in self.manifest["outputs"]]

    def load(self, *, verify: bool = True) -> CompiledModule:
        return CompiledModule(self.path, verify=verify)

    def describe(self) -> str:
        return describe_manifest(self.manifest, self.path)

    def __repr__(self) -> str:
        model, target = self.manifest["model"]["name"], self.manifest["target"]["name"]
        return f"Artifact({self.path}, model={model}, target={target})"
