"""Errors edgediff raises on bad input.

Every error a user can cause derives from :class:`EdgediffError`; the CLI prints such errors as one line
and exits non-zero, while anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class EdgediffError(Exception):
    """Base class of all user-facing errors."""


class TargetSpecError(EdgediffError):
    """An unknown target name or an invalid target-spec YAML (names the file, key and expected value)."""


class CaptureError(EdgediffError):
    """The model could not be captured with torch.export or imported from ONNX."""


class UnsupportedOpError(CaptureError):
    """An op of the captured graph has no lowering; names the op, fx node and module path."""


class ModelNotFoundError(EdgediffError):
    """An unknown zoo name or a path that holds no loadable model."""


class CrossCompilerNotFoundError(EdgediffError):
    """The target's cross compiler is not installed (the artifact falls back to a .tar of objects)."""


class BuildError(EdgediffError):
    """TVM failed to lower or build the module for the target."""


class ArtifactError(EdgediffError):
    """A missing, corrupted or mismatched artifact (hash or version check failed on load)."""


class InputError(EdgediffError):
    """Run-time inputs whose count, shape or dtype do not match the artifact's signature."""


class PassError(EdgediffError):
    """An unknown pass name, or a pass that cannot run on the given module or target."""


class PrecisionError(EdgediffError):
    """A precision request that cannot be met: an unknown format, a dtype the target lacks, a budget no
    assignment reaches, or a model the precision planner cannot measure."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (TVM and torch errors carry long tracebacks in them)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
