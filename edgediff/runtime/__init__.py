"""The edgediff runtime: load artifacts, run the sampler loop, decode images.

Torch-free by design (numpy, the TVM runtime and the standard library), so it runs on a device that has no
PyTorch. Submodules are imported lazily to keep ``import edgediff.runtime`` cheap.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Artifact": "edgediff.runtime.artifact",
    "CompiledModule": "edgediff.runtime.artifact",
    "load": "edgediff.runtime.artifact",
    "Pipeline": "edgediff.runtime.pipeline",
    "Generation": "edgediff.runtime.pipeline",
    "Timings": "edgediff.runtime.pipeline",
    "Sampler": "edgediff.runtime.samplers",
    "SamplerError": "edgediff.runtime.samplers",
    "get_sampler": "edgediff.runtime.samplers",
    "list_samplers": "edgediff.runtime.samplers",
    "write_png": "edgediff.runtime.image",
    "CLIPTokenizer": "edgediff.runtime.tokenizer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'edgediff.runtime' has no attribute '{name}'")
