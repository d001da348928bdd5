"""Typed pass reports: what a pass did (serialised into the manifest) and what it hands to later stages.

Each pass defines a ``<Name>Report(PassReport)`` dataclass next to it. ``to_dict()`` is the manifest's
``report`` entry for the pass; fields made with :func:`handoff` (the weight transform, the NPU program...)
are for later compile stages and never serialised, and fields made with :func:`optional` are left out
while None (a skipped pass reports only its summary).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

_MANIFEST = "manifest"  # metadata key: False keeps a field out of to_dict()
_OMIT_NONE = "omit_none"  # metadata key: True leaves the field out of to_dict() while it is None


def optional(default: Any = None) -> Any:
    """A field that a report leaves out of the manifest while it is None (e.g. in a skipped pass's
    report, which says only why it skipped)."""
    return dataclasses.field(default=default, metadata={_OMIT_NONE: True})


def handoff(default: Any = None) -> Any:
    """A field for later compile stages (a plan, a transform), never written into the manifest."""
    return dataclasses.field(default=default, repr=False, compare=False, metadata={_MANIFEST: False})


def plain(value: Any) -> Any:
    """``value`` as JSON-ready data: nested reports and records by their own ``to_dict`` (else their
    fields), containers copied, so that the manifest does not alias a report's state."""
    to_dict = getattr(value, "to_dict", None)
    if callable(to_dict) and not isinstance(value, type):
        return to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _fields(value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


@dataclass
class PassReport:
    """What every pass reports: a one-line ``summary`` (shown by the CLI and in the manifest)."""

    summary: str

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record of this report: its fields in declaration order, without hand-offs and
        without optional fields that are None."""
        return _fields(self)


def _fields(record: Any) -> dict[str, Any]:
    """A dataclass's fields as plain data, in declaration order, honouring :func:`handoff` and
    :func:`optional` (also in records nested in a report, e.g. one site's optional tiles)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(record):
        if not f.metadata.get(_MANIFEST, True):
            continue
        value = getattr(record, f.name)
        if value is None and f.metadata.get(_OMIT_NONE, False):
            continue
        out[f.name] = plain(value)
    return out


def find_report(results: list[Any], kind: type[PassReport]) -> Any | None:
    """The report of type ``kind`` among run_passes' results (the first such run), if any."""
    return next((r.report for r in results if isinstance(r.report, kind)), None)
