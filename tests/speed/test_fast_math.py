"""Fast exp/erf/tanh/sigmoid (edgediff/backend/fast_math.py): accuracy over a wide range including -inf and
overflow, no libm calls left in vectorized code, softmax computing exp once per element, GroupNorm statistics
computed once per group, numerics against torch, and builds for arm-a78."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import edgediff
from edgediff.backend.fast_math import EXP_HI, EXP_LO, fast_math
from edgediff.targets import CostModel, load_target

LANES = 16


def _kernel(name: str, n: int, enabled: bool):
    import tvm
    from tvm import s_tir, te, tirx

    a = te.placeholder((n,), "float32", name="A")
    b = te.compute((n,), lambda i: getattr(tirx, name)(a[i]), name="B")
    sch = s_tir.Schedule(te.create_prim_func([a, b]))
    (loop,) = sch.get_loops(sch.get_sblock("B"))
    sch.vectorize(sch.split(loop, [None, LANES])[1])
    with fast_math(enabled):
        lib = tvm.compile(sch.mod, target=tvm.target.Target({"kind": "llvm"}))
    return lib


def _run(name: str, x: np.ndarray, enabled: bool = True) -> tuple[np.ndarray, str]:
    import tvm

    n = len(x) + (-len(x)) % LANES
    padded = np.zeros(n, np.float32)
    padded[: len(x)] = x
    lib = _kernel(name, n, enabled)
    out = tvm.runtime.tensor(np.zeros(n, np.float32))
    lib(tvm.runtime.tensor(padded), out)
    return out.numpy()[: len(x)], lib.mod.inspect_source("asm")


WIDE = np.concatenate(
    [
        np.linspace(-200, 200, 400_001, dtype=np.float32),
        np.linspace(-1, 1, 100_001, dtype=np.float32),
        np.float32([-np.inf, np.inf, 0.0, -0.0, 1e-30, -1e-30, EXP_LO - 1e-3, EXP_HI + 1e-3]),
    ]
)
REFERENCE = {
    "exp": torch.exp,
    "erf": torch.special.erf,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@pytest.mark.parametrize("name", ["exp", "erf", "tanh", "sigmoid"])
def test_accuracy_and_no_libm_calls(name):
    got, asm = _run(name, WIDE)
    expected = REFERENCE[name](torch.from_numpy(WIDE).double()).numpy()
    assert not [line for line in asm.splitlines() if "call" in line and f"{name}f" in line]
    assert not [line for line in asm.splitlines() if "call" in line and "expf" in line]
    if name == "exp":
        # normal float range: relative error (Cody-Waite + degree-6 polynomial: about 1 ulp)
        normal = (WIDE > EXP_LO) & (WIDE < EXP_HI)
        rel = np.abs(got[normal] - expected[normal]) / expected[normal]
        assert rel.max() < 2.5e-7, rel.max()
        assert np.all(got[WIDE < EXP_LO] == 0.0)  # includes -inf: masked softmax scores give exact zeros
        assert np.all(np.isposinf(got[WIDE > EXP_HI]))
        assert np.all(got[WIDE == 0.0] == 1.0)
    else:
        err = np.abs(got - expected)
        assert err.max() < 1e-6, (err.max(), WIDE[err.argmax()])
        small = (np.abs(WIDE) < 0.06) & (WIDE != 0)  # tanh, erf ~ x near 0: relative error too
        assert (err[small] / np.abs(expected[small])).max() < 2e-6
        assert np.all(np.isfinite(got))


def test_switched_off_is_tvm_lowering():
    got, asm = _run("exp", np.float32([0.5, -1.0]), enabled=False)
    assert "expf" in asm
    np.testing.assert_allclose(got, np.exp(np.float32([0.5, -1.0])), rtol=1e-7)


def _scheduled(model: torch.nn.Module, x: torch.Tensor):
    import tvm

    from edgediff.frontend.capture import capture
    from edgediff.frontend.relax_import import import_to_relax
    from edgediff.passes.runner import run_passes

    mod, _ = run_passes(
        import_to_relax(capture(model, (x,))).mod, load_target("host"), ["legalize", "fuse-ops", "schedule"]
    )
    return [f for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc)]


def test_softmax_computes_exp_once_per_element():
    (func,) = _scheduled(torch.nn.Softmax(dim=-1), torch.randn(2, 8, 64))
    script = func.script()
    assert script.count("T.exp(") == 1, script  # one exp block; the sum and the normalisation read it
    assert "T.vectorized" in script


def test_group_norm_statistics_once_per_group():
    model = torch.nn.Sequential(torch.nn.GroupNorm(4, 16), torch.nn.SiLU())
    (func,) = _scheduled(model, torch.randn(1, 16, 8, 8))
    script = func.script()
    # the statistics loop runs over the 4 groups, not under a loop over the 16 channels
    assert "T.parallel(T.int64(16))" not in script, script
    assert "T.vectorized" in script


class Activations(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.GroupNorm(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.softmax(x * 8, dim=-1)
        b = torch.nn.functional.gelu(x * 4) + torch.nn.functional.gelu(x * 4, approximate="tanh")
        c = torch.nn.functional.silu(self.norm(x) * 30)
        masked = torch.softmax(x.masked_fill(x > 1, float("-inf")), dim=-1)
        return torch.cat([a, b, c, masked, torch.tanh(x * 3)], dim=-1)


@pytest.mark.parametrize("target", ["host", "arm-a78"])
def test_activations_match_torch(target, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 16, 40)
    model = Activations().eval()
    artifact = edgediff.compile_model(model, (x,), target=target, output_dir=tmp_path / "a", progress=False)
    if target != "host":
        assert artifact.manifest["library"]["format"] == "shared"
        assert CostModel(load_target(target)).vector_lanes("float32") == 4
        return
    with torch.no_grad():
        expected = model(x).numpy()
    got = edgediff.load(artifact.path)(x)
    assert np.abs(got - expected).max() < 2e-5 * max(1.0, float(np.abs(expected).max()))
