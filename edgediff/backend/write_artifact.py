"""Writing artifacts atomically: everything goes into a temporary sibling directory that replaces the
destination only once complete, so a failed or interrupted compile never leaves a half artifact."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.runtime.artifact import MANIFEST_FILE, WEIGHT_ALIGNMENT, WEIGHTS_FILE, sha256_file


@contextlib.contextmanager
def atomic_directory(destination: Path) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``destination`` when the block succeeds."""
    destination = destination.resolve()
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = destination.parent / f".{destination.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    retired = None
    if destination.exists():
        retired = destination.parent / f".{destination.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(destination, retired)
    os.replace(staging, destination)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)


def write_weights(directory: Path, weights: list[Any], names: list[str]) -> dict[str, Any]:
    """Write ``weights`` (numpy arrays or TVM tensors) into one aligned blob; return its manifest record."""
    path = directory / WEIGHTS_FILE
    tensors = []
    offset = 0
    with open(path, "wb") as handle:
        for index, (name, array) in enumerate(zip(names, weights, strict=True)):
            array = np.ascontiguousarray(array.numpy() if hasattr(array, "numpy") else array)
            padding = (-offset) % WEIGHT_ALIGNMENT
            handle.write(b"\0" * padding)
            offset += padding
            handle.write(array.tobytes())
            tensors.append(
                {
                    "index": index,
                    "name": name,
                    "shape": list(array.shape),
                    "dtype": str(array.dtype),
                    "offset": offset,
                    "nbytes": int(array.nbytes),
                }
            )
            offset += array.nbytes
    return {"file": WEIGHTS_FILE, "bytes": offset, "sha256": sha256_file(path), "tensors": tensors}


def file_record(directory: Path, file_name: str) -> dict[str, Any]:
    path = directory / file_name
    return {"file": file_name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    (directory / MANIFEST_FILE).write_text(
        json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n"
    )
