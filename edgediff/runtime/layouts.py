"""Weight layouts the compiler stores for its kernels, in numpy: the way from a model's weight to the stored
tensor and back, for code that edits stored weights without a rebuild (LoRA merges). Torch-free.

The manifest's ``weights.layouts`` names each weight stored in a kernel's layout:
``{"layout": "column_panels", "panel": P, "groups": g, "transposed": t}`` (``pack-matmul-weights``): the
matrix ``B`` the matmul multiplies by (``W.T`` of an ``nn.Linear`` weight ``W`` when ``transposed``),
``[K, g * N]``, stored as ``[g, N / P, K, P]`` (``[N / P, K, P]`` when ``g`` is 1) with
``stored[h, j // P, k, j % P] = B[k, h * N + j]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np


def to_stored_layout(weight: np.ndarray, layout: Mapping[str, Any]) -> np.ndarray:
    """The model's ``weight`` (any leading unit axes) in the stored layout."""
    if layout.get("layout") != "column_panels":
        raise ValueError(f"unknown weight layout {dict(layout)}")
    matrix = weight.reshape(weight.shape[-2:])
    if layout["transposed"]:
        matrix = matrix.T
    depth, columns = matrix.shape
    groups, panel = int(layout["groups"]), int(layout["panel"])
    panels = matrix.reshape(depth, groups, columns // (groups * panel), panel).transpose(1, 2, 0, 3)
    if groups == 1:
        panels = panels[0]
    return np.ascontiguousarray(panels)


def from_stored_layout(stored: np.ndarray, layout: Mapping[str, Any], shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`to_stored_layout`: the model's weight of ``shape`` from the stored tensor."""
    groups = int(layout["groups"])
    panels = stored.reshape(groups, *stored.shape[-3:])
    _, count, depth, panel = panels.shape
    matrix = panels.transpose(2, 0, 1, 3).reshape(depth, groups * count * panel)
    if layout["transposed"]:
        matrix = matrix.T
    return np.ascontiguousarray(matrix).reshape(shape)
