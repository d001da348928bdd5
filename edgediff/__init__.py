"""edgediff: a hardware-aware compiler for diffusion models (PyTorch -> TVM modules for edge targets).

Public API: :func:`compile_model`, :func:`compile_pipeline`, :func:`load`, :class:`Artifact`, and the error
types in :mod:`edgediff.errors`. Attributes are imported lazily so that ``import edgediff.runtime`` stays
light (and torch-free) on a device.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "compile_model": ("edgediff.api", "compile_model"),
    "compile_pipeline": ("edgediff.api", "compile_pipeline"),
    "load": ("edgediff.runtime.artifact", "load"),
    "Artifact": ("edgediff.runtime.artifact", "Artifact"),
    "CompiledModule": ("edgediff.runtime.artifact", "CompiledModule"),
    "load_target": ("edgediff.targets", "load_target"),
    "EdgediffError": ("edgediff.errors", "EdgediffError"),
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edgediff' has no attribute '{name}'")
