"""The pass registry: every edgediff pass registers here under the name users switch it off by."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgediff.errors import PassError


@dataclass(frozen=True)
class PassEntry:
    """A registered pass: its constructor (taking the target spec) and what it is for."""

    name: str
    factory: Callable[[Any], Any]
    summary: str
    required: bool = False  # a pass without which no build is possible (cannot be switched off)


PASSES: dict[str, PassEntry] = {}


def register_pass(name: str, *, required: bool = False) -> Callable[[type], type]:
    """Class decorator registering a ``@tvm.transform.module_pass`` class under ``name``."""

    def wrap(cls: type) -> type:
        doc = (cls.__doc__ or "").strip().splitlines()
        PASSES[name] = PassEntry(name, cls, doc[0] if doc else "", required)
        return cls

    return wrap


def get_pass_entry(name: str) -> PassEntry:
    """Look a pass up by name; unknown names get a suggestion."""
    if name not in PASSES:
        close = difflib.get_close_matches(name, PASSES, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise PassError(f"unknown pass '{name}'{hint} (passes: {', '.join(sorted(PASSES))})")
    return PASSES[name]
