"""The adreno-740 build's OpenCL kernels, run on PoCL (OpenCL on this CPU), equal the host (llvm) build of the
same PrimFuncs on random inputs.

The artifact's ``kernels/opencl.cl`` is what an Adreno would run. Launching a kernel needs what the aarch64
host code knows: its work-group geometry and which buffer goes to which argument. Both come from the TIR:
the pass pipeline the build ran (its names are in the manifest) is run again to get the scheduled
IRModule, and TVM's TIR lowering splits each scheduled PrimFunc into its device kernel(s) (one PrimFunc may
become several, ``<func>_kernel``, ``<func>_kernel_1``, ... launched in that order), whose
``blockIdx``/``threadIdx`` thread extents give the launch geometry. Each PrimFunc's kernels then run on
PoCL, and every buffer of the PrimFunc (inputs and outputs) must equal what the llvm build of the
unscheduled PrimFunc leaves in it.

Only buffer kernels are covered: TVM 0.27's texture (image2d) lowering crashes on conv2d, so the build
emits none (the manifest's notes say so); the test fails if an image2d kernel ever appears.
"""

from __future__ import annotations

import importlib
import re
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pytest

pytestmark = pytest.mark.slow

MODELS = ("tiny-sd15-unet", "tiny-dit", "tiny-vae-decoder")
KERNEL_NAME = re.compile(r"(?P<func>\w+?)_kernel(?:_(?P<index>\d+))?")
SIGNATURE = re.compile(r"__kernel\s+void\s+(\w+)\s*\(([^)]*)\)")
TOLERANCE = 1e-4  # relative to the buffer's largest magnitude (GPU reductions sum in another order)


@dataclass(frozen=True)
class Kernel:
    """One device kernel of a lowered PrimFunc: argument names and thread extents (x, y, z)."""

    params: tuple[str, ...]
    groups: tuple[int, ...]  # blockIdx extents: work-groups per dimension
    local: tuple[int, ...]  # threadIdx extents: work-items per work-group

    @property
    def global_size(self) -> tuple[int, ...]:
        return tuple(g * n for g, n in zip(self.groups, self.local, strict=True))


def kernel_signatures(source: str) -> dict[str, tuple[str, ...]]:
    """Kernel name -> parameter names, from the OpenCL C source (every parameter must be a buffer)."""
    signatures = {}
    for name, params in SIGNATURE.findall(source):
        names = []
        for param in params.split(","):
            if "image2d" in param or "*" not in param:
                raise AssertionError(f"{name}: parameter '{param.strip()}' is not a buffer; extend this test")
            names.append(re.findall(r"\w+", param)[-1])
        signatures[name] = tuple(names)
    return signatures


def prim_funcs(mod, *, unique_names: bool = False):
    """The TIR functions of a Relax module, with the global symbols the build gives them.

    With ``unique_names``, a function whose parameters share a name (``split`` has six ``T_split``
    outputs) is re-parsed from its TVMScript, which numbers them (``T_split_1``, ...): kernel arguments
    are matched to parameters by name.
    """
    import tvm

    funcs = {}
    for gv, func in mod.functions.items():
        if isinstance(func, tvm.tirx.PrimFunc):
            names = [p.name for p in func.params]
            if unique_names and len(set(names)) < len(names):
                func = tvm.script.from_source(func.script())
            funcs[gv] = func
    return tvm.relax.transform.AttachGlobalSymbol()(tvm.IRModule(funcs))


def lower_kernels(funcs, spec) -> dict[str, Kernel]:
    """Lower scheduled PrimFuncs as ``tvm.compile`` does for the target; return the device kernels."""
    import tvm
    import tvm_ffi

    # `tvm.tirx.build` is shadowed by the function of that name; the module holds the host/device split
    split_host_device_mods = importlib.import_module("tvm.tirx.build").split_host_device_mods
    target = spec.build_target()
    pipeline = tvm.tirx.get_tir_pipeline("default")[0]
    with target:
        lowered = pipeline(tvm.tirx.transform.BindTarget(target)(funcs))
    _, device_mods = split_host_device_mods(lowered)
    (device,) = device_mods.values()
    kernels = {}
    for gv, func in device.functions.items():
        extents: dict[str, int] = {}

        def visit(stmt, extents=extents):
            if stmt.attr_key == "thread_extent":
                extents[stmt.node.thread_tag] = int(stmt.value)

        tvm_ffi.structural_walk(func.body, (tvm.tirx.AttrStmt, visit))
        kernels[gv.name_hint] = Kernel(
            tuple(p.name for p in func.params),
            tuple(extents.get(f"blockIdx.{axis}", 1) for axis in "xyz"),
            tuple(extents.get(f"threadIdx.{axis}", 1) for axis in "xyz"),
        )
    return kernels


def same_argument(built: str, lowered: str) -> bool:
    """Whether the artifact's kernel argument is the re-run lowering's (up to the numbering above)."""
    return (
        built == lowered
        or re.fullmatch(re.escape(built.removesuffix("_ptr")) + r"_\d+_ptr", lowered) is not None
    )


@pytest.fixture(scope="module")
def pocl():
    """A PoCL context and queue (`make device-tools` installs PoCL; the test fails without it)."""
    import pyopencl as cl

    devices = [
        device
        for platform in cl.get_platforms()
        if "Portable Computing Language" in platform.name
        for device in platform.get_devices()
    ]
    assert devices, "no PoCL OpenCL device: run `make device-tools` (Debian pocl-opencl-icd)"
    context = cl.Context(devices[:1])
    return cl, context, cl.CommandQueue(context)


def _random(shape: tuple[int, ...], dtype: str, rng: np.random.Generator) -> np.ndarray:
    if "float" in dtype:
        return rng.uniform(-1.0, 1.0, shape).astype(dtype)
    # 0/1 fit every integer role in these models: masks, class labels and gather indices alike
    return rng.integers(0, 2, shape).astype(dtype)


@pytest.mark.parametrize("name", MODELS)
def test_adreno_kernels_on_pocl_equal_the_host_build(name, compiled, pocl):
    import tvm

    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes
    from edgediff.targets import load_target

    cl, context, queue = pocl
    artifact = compiled(name, "adreno-740")
    source = (artifact.path / artifact.manifest["device_code"]["opencl"]["file"]).read_text()
    signatures = kernel_signatures(source)
    spec = load_target("adreno-740")
    passes = [p["name"] for p in artifact.manifest["passes"]]
    assert passes[-1] == "schedule"

    unscheduled, _ = run_passes(import_to_relax(capture(name, None)).mod, spec, passes[:-1])
    plain = prim_funcs(unscheduled)
    # one library per function: building them all in one module trips an internal check in TVM's lowering
    reference = {
        gv.name_hint: tvm.tirx.build(tvm.IRModule({gv: f}), target="llvm")
        for gv, f in plain.functions.items()
    }
    scheduled = prim_funcs(run_passes(unscheduled, spec, ["schedule"])[0], unique_names=True)
    lowered = lower_kernels(scheduled, spec)
    # kernel argument (buffer name + "_ptr") -> position among its PrimFunc's parameters
    positions = {
        gv.name_hint: {f"{p.name}_ptr": i for i, p in enumerate(f.params)}
        for gv, f in scheduled.functions.items()
    }

    launches: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for kernel, params in signatures.items():
        assert kernel in lowered, f"{kernel} is in the artifact but not in the re-run lowering"
        mine = lowered[kernel].params
        assert len(mine) == len(params) and all(map(same_argument, params, mine)), (
            f"{kernel}: the artifact's arguments {params} are not the re-run lowering's {mine}"
        )
        match = KERNEL_NAME.fullmatch(kernel)
        launches[match["func"]].append((int(match["index"] or 0), kernel))

    program = cl.Program(context, source).build()
    rng = np.random.default_rng(0)
    worst, failures = 0.0, []
    for func_name, kernels in sorted(launches.items()):
        params = plain[func_name].params
        arrays = [_random(tuple(int(d) for d in p.ty.shape), str(p.ty.dtype), rng) for p in params]
        expected = [tvm.runtime.tensor(a.copy(), tvm.cpu()) for a in arrays]
        reference[func_name][func_name](*expected)
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.COPY_HOST_PTR
        buffers = [cl.Buffer(context, flags, hostbuf=a) for a in arrays]
        for _, kernel in sorted(kernels):
            launch = lowered[kernel]
            missing = [arg for arg in launch.params if arg not in positions[func_name]]
            assert not missing, f"{kernel}: arguments {missing} are no parameters of {func_name}"
            args = [buffers[positions[func_name][arg]] for arg in launch.params]
            getattr(program, kernel)(queue, launch.global_size, launch.local, *args)
        for param, initial, buffer, want in zip(params, arrays, buffers, expected, strict=True):
            got = np.empty_like(initial)
            cl.enqueue_copy(queue, got, buffer)
            want = want.numpy()
            error = float(np.abs(got.astype(np.float64) - want).max()) / max(1.0, float(np.abs(want).max()))
            worst = max(worst, error)
            if not error <= TOLERANCE:
                failures.append(
                    f"{func_name}: buffer {param.name} differs by {error:.2e} (relative to its max)"
                )
    launched = sum(len(k) for k in launches.values())
    print(f"{name}: {launched} OpenCL kernels on PoCL, worst error {worst:.2e} relative to the buffer's max")
    assert launched == len(signatures) > 5
    assert failures == []
