"""Fixtures of the cross tests: the emulated arm64 root, and tiny pipeline artifact sets per target."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

LATENT = 16  # the tiny UNet's latent size; the decoder is compiled for the same


@pytest.fixture(scope="session")
def arm64():
    """The cached arm64 root (built on first use; `make device-tools` builds it ahead of the tests)."""
    from scripts.arm64_root import ensure_root

    return ensure_root(log=lambda _message: None)


@pytest.fixture(scope="session")
def pipeline_set(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``pipeline_set(target)`` -> artifact set: denoiser/ (tiny UNet, batch 2 = one-call CFG) + decoder/."""
    from edgediff import compile_model

    cache: dict[str, Path] = {}

    def get(target: str) -> Path:
        if target not in cache:
            root = tmp_path_factory.mktemp(f"set-{target}") / "tiny-sd"
            compile_model(
                "tiny-sd15-unet", target=target, batch=2, output_dir=root / "denoiser", progress=False
            )
            compile_model(
                "tiny-vae-decoder",
                target=target,
                latent_size=LATENT,
                output_dir=root / "decoder",
                progress=False,
            )
            cache[target] = root
        return cache[target]

    return get
