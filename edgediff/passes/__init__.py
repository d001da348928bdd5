"""Graph and kernel passes. One pass per file; ``pipeline.py`` lists them in order."""

from edgediff.passes.pipeline import PASS_ORDER, default_pipeline, instantiate, resolve_pipeline
from edgediff.passes.registry import PASSES, PassEntry, get_pass_entry, register_pass

__all__ = [
    "PASSES",
    "PASS_ORDER",
    "PassEntry",
    "default_pipeline",
    "get_pass_entry",
    "instantiate",
    "register_pass",
    "resolve_pipeline",
]
