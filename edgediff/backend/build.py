"""Build the scheduled module with TVM and export the library for the target (cross-compiling if needed)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgediff.errors import BuildError, CrossCompilerNotFoundError, first_line

if TYPE_CHECKING:
    from edgediff.targets import TargetSpec


def _finalize_passes(target: Any, kind: str, stats: dict[str, Any] | None = None) -> Any:
    """The lowering after edgediff's passes: memory planning and VM codegen preparation of TVM's backend
    (``stats`` receives the planned activation workspace, see ``backend/workspace.py``)."""
    import tvm
    from tvm import relax

    if kind == "gpu":
        backend = relax.backend.gpu_generic
    else:
        backend = relax.backend.cpu_generic.pipeline  # its package does not re-export dataflow_lower_passes
    finalize = list(backend.finalize_passes(target))
    if stats is not None:
        from edgediff.backend.workspace import workspace_pass

        # right after LowerAllocTensor: every allocation is then one planned alloc_storage
        at = next((i for i, p in enumerate(finalize) if "LowerAllocTensor" in p.info.name), None)
        if at is not None:
            finalize.insert(at + 1, workspace_pass(stats))
    return tvm.transform.Sequential(backend.dataflow_lower_passes(target) + finalize)


def build(mod: Any, spec: TargetSpec, stats: dict[str, Any] | None = None) -> Any:
    """Lower the scheduled module to a VM executable (memory planning, VM codegen, LLVM/OpenCL codegen);
    ``stats`` (optional) receives the planned activation workspace."""
    import tvm

    target = spec.build_target()
    from edgediff.backend.fast_math import fast_math

    try:
        # CPU kernels get vectorizable exp/erf/tanh/sigmoid instead of scalar libm calls
        with target, fast_math(spec.kind in ("cpu", "npu")):
            return tvm.compile(mod, target=target, relax_pipeline=_finalize_passes(target, spec.kind, stats))
    except Exception as err:
        hint = ""
        if spec.kind == "gpu" and "schedule" not in str(err):
            hint = " (GPU kernels need the 'schedule' pass to bind threads)"
        raise BuildError(f"TVM build for target {spec.name} failed: {first_line(err)}{hint}") from err


def build_for_host(mod: Any) -> Any:
    """Build a Relax module to run here, at compile time (the weight transform of ``lift-weight-transforms``).

    Its kernels run once per compile, so they get TVM's default lowering without target schedules."""
    import tvm
    from tvm import relax

    from edgediff.targets import load_target

    target = load_target("host").build_target()
    passes = tvm.transform.Sequential([relax.transform.LegalizeOps(), _finalize_passes(target, "cpu")])
    # The lifted module carries every kernel of the model, the target's own (an Arm `sdot` kernel) among
    # them: only what ``main`` calls may be compiled for this machine.
    called = {gv.name_hint for gv in relax.analysis.all_global_vars(mod["main"])}
    mod = tvm.IRModule(
        {gv: func for gv, func in mod.functions.items() if gv.name_hint == "main" or gv.name_hint in called},
        attrs=mod.attrs,
    )
    try:
        with target:
            return tvm.compile(mod, target=target, relax_pipeline=passes)
    except Exception as err:
        raise BuildError(f"building the compile-time weight transform failed: {first_line(err)}") from err


@dataclass
class ExportedLibrary:
    """The library file written for the artifact and how it was produced."""

    file: str  # file name inside the artifact
    format: str  # "shared" (a loadable .so) or "objects" (a .tar of object files to link on the device)
    compiler: str | None
    note: str | None = None


def export_library(
    executable: Any, spec: TargetSpec, directory: Path, *, require_compiler: bool = False
) -> ExportedLibrary:
    """Write the compiled library into ``directory``.

    A host target gets a ``.so`` linked by the host compiler. A cross target gets a ``.so`` linked by its
    cross compiler when that is installed; otherwise a ``.tar`` of object files and a note saying how to
    link it (or, with ``require_compiler``, an error).
    """
    from tvm.support import cc

    compiler = spec.cross_compiler
    if compiler is None:
        path = directory / "model.so"
        executable.export_library(str(path))
        return ExportedLibrary(path.name, "shared", "host")
    if shutil.which(compiler):
        path = directory / "model.so"
        try:
            executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
        except Exception as err:
            raise BuildError(f"linking with {compiler} failed: {first_line(err)}") from err
        return ExportedLibrary(path.name, "shared", compiler)
    message = (
        f"cross compiler '{compiler}' for target {spec.name} is not installed "
        "(Debian: apt-get install g++-aarch64-linux-gnu)"
    )
    if require_compiler:
        raise CrossCompilerNotFoundError(message)
    path = directory / "model.tar"
    executable.export_library(str(path))
    note = (
        f"{message}; wrote model.tar (object files). Link it on a machine that has the compiler: "
        f"tar xf model.tar && {compiler} -shared -fPIC -o model.so *.o, then set library.file to model.so "
        "in manifest.json (and its sha256)"
    )
    return ExportedLibrary(path.name, "objects", None, note)


def device_sources(executable: Any) -> dict[str, str]:
    """Generated device code (e.g. OpenCL C) by module kind, for inspection and kernel tests."""
    sources: dict[str, str] = {}

    def walk(module: Any) -> None:
        for imported in module.imports:
            if imported.kind not in ("llvm", "c", "static_library"):
                sources[imported.kind] = sources.get(imported.kind, "") + imported.inspect_source()
            walk(imported)

    walk(executable.mod)
    return sources
