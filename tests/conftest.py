"""Shared fixtures: compiled artifacts are cached per test session (compiling is the slow part)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from edgediff.runtime.artifact import Artifact
from edgediff.targets import load_target
from edgediff.targets.spec import TargetSpec

TINY_MODELS = ("tiny-sd15-unet", "tiny-sdxl-unet", "tiny-dit", "tiny-pixart", "tiny-sana", "tiny-vae-decoder")


@pytest.fixture(scope="session")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Artifact]:
    """``compiled(model, target)`` -> Artifact, compiled once per session for each (model, target)."""
    from edgediff import compile_model

    cache: dict[tuple[str, str], Artifact] = {}
    root = tmp_path_factory.mktemp("artifacts")

    def get(model: str, target: str) -> Artifact:
        key = (model, target)
        if key not in cache:
            cache[key] = compile_model(
                model, target=target, output_dir=root / f"{model}-{target}", progress=False
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def zoo_model() -> Callable:
    """``zoo_model(name)`` -> the ZooModel the compiled artifacts were built from (same seed)."""
    from edgediff import zoo

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = zoo.build(name)
        return cache[name]

    return get


def elf_machine(path: Path) -> int:
    """The ELF e_machine field of a shared object (183 = AArch64, 62 = x86-64)."""
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


AARCH64 = 183


# What the `host` spec reads from this machine (vector width, cores), fixed for tests whose expectations
# follow from the spec - tile and panel widths, cost-model estimates, plans - so that they hold on any
# machine. The LLVM target stays this machine's, so the artifacts still run here (LLVM splits a 512-bit
# vector into what the CPU has; only speed would differ).
PINNED_HOST = {"vector_bits": 512, "cores": 2}
# ... and the dtypes `host` detects from CPU flags: those of a CPU without VNNI, BF16 or fp16 arithmetic.
PINNED_HOST_DTYPES = {"float32": 150.0, "float16": 75.0}


def pinned_host(name: str = "host-pinned", **compute: int) -> TargetSpec:
    """The host spec with :data:`PINNED_HOST` (or ``compute`` overrides) and :data:`PINNED_HOST_DTYPES`
    instead of this machine's values."""
    data = load_target("host").to_dict()
    data["name"] = name
    data["compute"].update(PINNED_HOST, **compute)
    data["compute"]["peak_gflops"] = dict(PINNED_HOST_DTYPES)
    data["dtypes"] = list(PINNED_HOST_DTYPES)
    data["features"] = {}
    data["measured"] = None
    return TargetSpec.from_dict(data)


def pinned_host_with(dtype: str) -> TargetSpec:
    """:func:`pinned_host` with ``dtype`` (int8, bfloat16) added at 300 GFLOP/s, named ``host-<dtype>``
    (``host-int8``, ``host-bf16``): artifacts of that format that run here, with plans that do not depend
    on the machine."""
    data = pinned_host().to_dict()
    data["name"] = "host-" + {"bfloat16": "bf16"}.get(dtype, dtype)
    data["dtypes"] = [*PINNED_HOST_DTYPES, dtype]
    data["compute"]["peak_gflops"][dtype] = 300
    return TargetSpec.from_dict(data)


@pytest.fixture(scope="session")
def host_int8() -> TargetSpec:
    """This machine with int8 in its dtypes (x86 has VNNI / pmaddubsw): int8 artifacts that run here."""
    return pinned_host_with("int8")


@pytest.fixture(scope="module")
def one_torch_thread():
    """The torch references are tiny; on 2 cores their intra-op threads only fight TVM's thread pool. The
    thread count is restored after the module."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
