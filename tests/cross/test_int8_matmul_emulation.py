"""The arm-a78 int8 GEMM kernel (``sdot``) runs exactly under emulation (edgediff/kernels/int8_matmul.py)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from edgediff.kernels.int8_matmul import Int8Tile, build_int8_matmul, pack_int8_weight
from tests.compile.test_int8_matmul import _operands
from tests.precision.helpers import A78

# Runs in the emulator: load the aarch64 kernel with the root's TVM runtime, run it, save the output.
RUN_KERNEL = """
import sys, numpy as np, tvm
lib = tvm.runtime.load_module(sys.argv[1])
args = [tvm.runtime.tensor(np.load(p)) for p in sys.argv[2:]]
lib["int8_matmul"](*args)
np.save(sys.argv[-1], args[-1].numpy())
print("ran")
"""


@pytest.mark.slow
def test_sdot_kernel_exact_under_emulation(arm64, tmp_path):
    from tvm.support import cc

    rows, depth, columns = 12, 128, 64
    mod, dot, tile = build_int8_matmul(rows, depth, columns, A78, tile=Int8Tile(4, 2, 4))
    lib = tmp_path / "int8.so"
    tvm.compile(mod, tvm.target.Target(A78)).export_library(
        str(lib), fcompile=cc.cross_compiler("aarch64-linux-gnu-g++")
    )
    q, w, a_scale, w_scale, bias = _operands(rows, depth, columns, seed=2)
    packed, _ = pack_int8_weight(w, tile.panel, dot.compensated)
    arrays = [
        q,
        packed,
        np.zeros(columns, np.int32),
        a_scale,
        w_scale,
        bias,
        np.zeros((rows, columns), np.int32),
    ]
    paths = []
    for i, array in enumerate(arrays):
        paths.append(str(tmp_path / f"arg{i}.npy"))
        np.save(paths[-1], array)
    result = arm64.run(["-c", RUN_KERNEL, str(lib), *paths], timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    got = np.load(paths[-1])
    np.testing.assert_array_equal(got, q.astype(np.int32) @ w.astype(np.int32))
    assert result.stdout.split()[-1] == "ran"
