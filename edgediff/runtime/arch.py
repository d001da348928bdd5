"""CPU architecture names: one spelling per architecture, and this machine's."""

from __future__ import annotations

import platform

ARCH_ALIASES = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}


def normalise_arch(arch: str) -> str:
    """One spelling per CPU architecture (``arm64`` -> ``aarch64``, ``amd64`` -> ``x86_64``)."""
    arch = arch.lower()
    return ARCH_ALIASES.get(arch, arch)


def machine_arch() -> str:
    """The architecture of the machine this runs on, normalised."""
    return normalise_arch(platform.machine())
