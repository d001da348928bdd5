"""``bf16`` Linear layers on the bfloat16 GEMM kernel (edgediff/kernels/bf16_linear.py, bf16_matmul.py).

A tiny model of four Linear layers (3-D and 2-D activations, with and without bias, one whose input is a
relu the bfloat16 cast fuses into, one with 12 output columns that the kernel does not take) compiled with
``--precision bf16`` for this host with bfloat16 listed: three layers call the kernel (its portable path on
a CPU without AVX512-BF16, ``vdpbf16ps`` on one with it), weights.bin holds their packed weights, and the
artifact computes a float64 product of the bfloat16-rounded inputs and weights up to float32 summation.
The AVX512-BF16 build (mcpu znver4) is checked by its machine code: it is built here on any CPU, and runs
only where the CPU has AVX512-BF16.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

import edgediff
from edgediff.kernels.bf16_linear import DPBF16_NAME, PORTABLE_NAME, BF16LinearEmitter
from edgediff.kernels.bf16_matmul import KERNEL_NAME, has_avx512bf16, pack_bf16_weight
from edgediff.passes.mixed_precision import _bf16_emitter
from edgediff.runtime.artifact import load_weights
from edgediff.targets import TargetSpec
from tests.conftest import pinned_host, pinned_host_with
from tests.precision.helpers import ZNVER3, ZNVER4, compile_at, plan_of, rewrite_counts, with_target
from tests.precision.test_compile import _calls

# ZNVER4 has AVX512-BF16 (vdpbf16ps), ZNVER3 only AVX2
KERNEL_LAYERS = ("tokens", "down", "vector")  # the layers whose shapes the kernel takes


class FourLinears(nn.Module):
    """``x [B, 8, 32]``, ``y [B, 24]`` -> ``[B, 8 * 48 + 8 * 16 + 16 + 12]``."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.tokens = nn.Linear(32, 48)  # 3-D input, bias: fused into the kernel's epilogue
        self.down = nn.Linear(32, 16)  # 3-D input produced by a relu (the bfloat16 cast fuses into it)
        self.vector = nn.Linear(24, 16, bias=False)  # 2-D input, no bias
        self.odd = nn.Linear(24, 12)  # 12 columns: not whole vectors of lanes, the Relax bf16 matmul
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.3
        self.eval().requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        parts = [
            self.tokens(x).reshape(batch, -1),
            self.down(torch.relu(x)).reshape(batch, -1),
            self.vector(y),
            self.odd(y),
        ]
        return torch.cat(parts, dim=1)


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 8, 32, generator=gen), torch.randn(2, 24, generator=gen)


def _bf16(t: torch.Tensor) -> torch.Tensor:
    """Rounded to bfloat16 (nearest even, as the artifact's cast and the weight storage) and widened."""
    return t.to(torch.bfloat16).to(torch.float64)


def _reference(model: FourLinears, x: torch.Tensor, y: torch.Tensor, rounded: bool = True):
    """``(output, bound)``: each Linear in float64 on bfloat16-rounded inputs and weights (``rounded``),
    float64 bias; ``bound`` per element is the float32 summation error of a sum of ``K + 1`` terms,
    ``(K + 1) 2^-24 sum |terms|``, the only difference float32 accumulation of the same products makes."""
    r = _bf16 if rounded else (lambda t: t.to(torch.float64))
    outs, bounds = [], []
    relu = torch.relu(x)
    for layer, inp in ((model.tokens, x), (model.down, relu), (model.vector, y), (model.odd, y)):
        a, w = r(inp), r(layer.weight)
        bias = torch.zeros(w.shape[0], dtype=a.dtype) if layer.bias is None else layer.bias.double()
        outs.append((a @ w.T + bias).reshape(x.shape[0], -1))
        terms = a.abs() @ w.abs().T + bias.abs()
        bounds.append(((w.shape[1] + 1) * 2.0**-24 * terms).reshape(x.shape[0], -1))
    return torch.cat(outs, dim=1).numpy(), torch.cat(bounds, dim=1).numpy()


def host_bf16(target: dict | None = None) -> TargetSpec:
    """This machine with bfloat16 listed (a host with AVX512-BF16 lists it; the portable kernels run
    anywhere), machine-dependent values pinned; built for the LLVM ``target`` when one is given."""
    spec = pinned_host_with("bfloat16")
    return spec if target is None else with_target(spec, target)


def _compile(spec: TargetSpec, out) -> edgediff.Artifact:
    return compile_at(FourLinears(), _inputs(), ("x", "y"), spec, out, "bf16")


@pytest.fixture(scope="module")
def host_artifact(tmp_path_factory):
    return _compile(host_bf16(), tmp_path_factory.mktemp("bf16-host"))


def _host_instruction() -> str:
    return DPBF16_NAME if has_avx512bf16(host_bf16().build_target()) else PORTABLE_NAME


def test_bf16_linear_layers_run_on_the_kernel(host_artifact):
    rewritten = rewrite_counts(host_artifact)
    assert rewritten["linear bf16"] == 4
    assert rewritten[f"bf16 kernel ({_host_instruction()})"] == 3
    assert rewritten["bf16 kernel bias fused"] == 2  # tokens and down; vector has none
    assert rewritten["linear bf16 Relax (shape the kernel does not take)"] == 1  # odd


def test_weights_bin_holds_the_packed_bf16_weights(host_artifact):
    """The kernel layers' stored tensors are the packed ``[N / P, K / 2, P, 2]`` bfloat16 weight, computed at
    compile time (nothing of the float32 or unpacked weight stays)."""
    model = FourLinears()
    tensors = host_artifact.manifest["weights"]["tensors"]
    arrays = load_weights(host_artifact.path, host_artifact.manifest)
    by_name = {t["name"]: (t, a) for t, a in zip(tensors, arrays, strict=True)}
    for layer in KERNEL_LAYERS:
        (entry, stored), *others = [v for k, v in by_name.items() if k.startswith(f"{layer}.weight")]
        assert not others and entry["dtype"] == "bfloat16" and len(entry["shape"]) == 4
        weight = getattr(model, layer).weight.numpy().astype(ml_dtypes.bfloat16)
        packed = pack_bf16_weight(np.ascontiguousarray(weight.T), int(entry["shape"][2]))
        assert stored.shape == packed.shape and np.array_equal(stored.view(np.uint16), packed.view(np.uint16))
    assert not [t for t in tensors if t["name"].endswith(".weight") and t["dtype"] == "float32"]


def test_artifact_matches_a_bf16_torch_reference(host_artifact):
    """Products of bfloat16 values are exact in float32: the artifact differs from the float64 product of
    the rounded operands by float32 summation only (the same bound holds for the Relax-path layer)."""
    model, (x, y) = FourLinears(), _inputs()
    got = host_artifact.load()(x, y)
    want, bound = _reference(model, x, y)
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound), float((np.abs(got - want) - bound).max())
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    # the bound is tight enough to see the bfloat16 rounding: unrounded operands are far off it
    unrounded, _ = _reference(model, x, y, rounded=False)
    assert np.abs(got - unrounded).max() > 100 * bound.max()


@pytest.mark.parametrize(("target", "instruction"), [(ZNVER4, DPBF16_NAME), (ZNVER3, PORTABLE_NAME)])
def test_kernel_calls_in_the_compiled_module(host_artifact, target, instruction):
    """After the whole pipeline (fusion and scheduling included), main calls the GEMM once per kernel
    layer, on bfloat16 activations and a packed bfloat16 weight that is a parameter of main (packed at
    compile time); the layers' biases are main's parameters too, read by the kernel's epilogue."""
    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.pipeline import default_pipeline, resolve_pipeline
    from edgediff.passes.runner import run_passes

    spec = host_bf16(target)
    imported = import_to_relax(capture(FourLinears(), _inputs(), input_names=("x", "y")))
    options = {"mixed-precision": {"plan": plan_of(host_artifact), "weight_names": imported.weight_names}}
    names = resolve_pipeline(spec, [*default_pipeline(spec), "mixed-precision"])
    mod, results = run_passes(imported.mod, spec, names, options=options)
    rewritten = next(r.report for r in results if r.name == "mixed-precision").rewritten
    assert rewritten[f"bf16 kernel ({instruction})"] == 3
    params = set(mod["main"].params)
    calls = [c for c in _calls(mod["main"]) if c.args[0].name_hint.startswith(KERNEL_NAME)]
    assert len(calls) == 3
    lanes = 16 if instruction == DPBF16_NAME else 8
    biases = 0
    for call in calls:
        a, w, bias = call.args[1].fields
        assert str(a.ty.dtype) == "bfloat16" and len(a.ty.shape) == 2
        assert w in params and str(w.ty.dtype) == "bfloat16"
        assert len(w.ty.shape) == 4 and int(w.ty.shape[3]) == 2 and int(w.ty.shape[2]) % lanes == 0
        biases += bias in params
    assert biases == 2
    functions = {gv.name_hint: f for gv, f in mod.functions_items()}
    kernels = sorted(n for n in functions if n.startswith(KERNEL_NAME))
    assert kernels == [f"{KERNEL_NAME}_16x32x16", f"{KERNEL_NAME}_16x32x48", f"{KERNEL_NAME}_2x24x16"]
    # the relu and the cast of its output to bfloat16 are one kernel (FuseOps), not a relu then a cast
    fused = [n for n, f in functions.items() if "relu" in n or "maximum" in n]
    assert fused and all("astype" in n or "cast" in n for n in fused), fused


def _objdump(library) -> str:
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, which g++ needs to link the artifact) is not on PATH"
    return subprocess.run([objdump, "-d", str(library)], capture_output=True, text=True, check=True).stdout


def test_avx512bf16_build_has_vdpbf16ps(tmp_path):
    """Built for znver4 on any CPU (not run: this checks the machine code, whatever this CPU has)."""
    artifact = _compile(host_bf16(ZNVER4), tmp_path / "znver4")
    assert rewrite_counts(artifact)[f"bf16 kernel ({DPBF16_NAME})"] == 3
    asm = _objdump(artifact.path / artifact.manifest["library"]["file"])
    steps = re.findall(r"vdpbf16ps\s+%zmm\d+,\s*%zmm\d+,\s*%zmm\d+", asm)
    # the smallest kernel's register tile alone is >= 2 accumulator vectors, one step each per k pair
    assert len(steps) >= 3 * 2
    assert "edgediff_dpbf16ps" not in asm  # the imported helper is inlined, no call per step


def test_avx2_build_has_no_vdpbf16ps(tmp_path):
    artifact = _compile(host_bf16(ZNVER3), tmp_path / "znver3")
    assert rewrite_counts(artifact)[f"bf16 kernel ({PORTABLE_NAME})"] == 3
    asm = _objdump(artifact.path / artifact.manifest["library"]["file"])
    assert "vdpbf16ps" not in asm and "vfmadd" in asm


def test_vdpbf16ps_artifact_runs_where_the_cpu_has_it(host_artifact):
    if _host_instruction() != DPBF16_NAME:
        pytest.skip("this CPU lacks AVX512-BF16: the vdpbf16ps build is checked by its machine code only")
    # the host artifact is the vdpbf16ps one here: test_artifact_matches_a_bf16_torch_reference ran it
    assert rewrite_counts(host_artifact)[f"bf16 kernel ({DPBF16_NAME})"] == 3
    model, (x, y) = FourLinears(), _inputs()
    want, bound = _reference(model, x, y)
    assert np.all(np.abs(host_artifact.load()(x, y) - want) <= bound)


def test_which_targets_get_the_kernel():
    """vdpbf16ps from the LLVM target's CPU or mattr, the portable path on other CPUs that list bfloat16,
    and no kernel where bfloat16 is not listed (a bf16 build is then refused before the passes)."""
    assert _bf16_emitter(host_bf16(ZNVER4)).use_dpbf16
    mattr = {"kind": "llvm", "mcpu": "skylake-avx512", "mattr": ["+avx512bf16"]}
    assert _bf16_emitter(host_bf16(mattr)).use_dpbf16
    assert not _bf16_emitter(host_bf16(ZNVER3)).use_dpbf16
    assert _bf16_emitter(pinned_host()) is None
    emitter = BF16LinearEmitter(use_dpbf16=True)
    assert emitter.fits(16, 32, 48) and not emitter.fits(16, 33, 48) and not emitter.fits(16, 32, 24)
    assert not emitter.fits(None, 32, 48)
