"""Device bundles: compiled artifacts, the torch-free runtime and a ``run.py`` entry point in one tar.

A device (a phone or board with Python and numpy) has neither PyTorch nor the compiler, so a bundle carries
only what runs there::

    <name>/
      run.py                  entry point: python3 run.py list | run | generate (see its --help)
      README.md               what the device needs, how to run, which artifacts are inside
      edgediff/__init__.py    a minimal package file: nothing of the compiler is bundled
      edgediff/errors.py
      edgediff/runtime/...    artifact loading, samplers, pipeline, PNG writing
      artifacts/<name>/       each artifact or artifact set given, as compiled

Artifacts are verified (sha256) before they are packed, and the tar is written atomically.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import edgediff
from edgediff.errors import ArtifactError, EdgediffError
from edgediff.runtime.artifact import MANIFEST_FILE, check_artifact, target_arch

PACKAGE_DIR = Path(edgediff.__file__).resolve().parent
# What of the package a device needs (relative to the package folder); everything else is the compiler.
RUNTIME_SOURCES = ("errors.py", "runtime")
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")

_BUNDLE_INIT = '''"""The edgediff runtime bundled for a device: artifacts, samplers, pipeline, PNG writing.

The compiler is not part of a bundle; run the artifacts with run.py (see README.md next to it).
"""

__version__ = "{version}"
'''

_RUN_PY = '''#!/usr/bin/env python3
"""Run the bundled edgediff artifacts on this device: python3 run.py --help (see README.md)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # the bundled runtime, ahead of any edgediff installed on the device

from edgediff.runtime.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(artifacts_dir=HERE / "artifacts"))
'''


@dataclass
class BundledArtifact:
    """One command-line argument of ``edgediff bundle``: an artifact, or an artifact set of several."""

    name: str
    path: Path
    manifests: dict[str, dict[str, Any]]  # role ("" for a single artifact) -> manifest


def _check_runnable(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse what the bundled CPU runtime cannot load on any device, before it is shipped."""
    target = manifest["target"]["name"]
    if manifest["library"]["format"] != "shared":
        raise ArtifactError(
            f"{path}: the library is {manifest['library']['file']} (object files, the cross compiler was "
            "missing when it was compiled); link it or recompile before bundling"
        )
    if target_arch(manifest) is None and not manifest.get("runs_on_host"):
        raise ArtifactError(
            f"{path}: target {target} ({manifest['target']['kind']}) needs a device runtime the bundle does "
            "not have; the bundled runtime runs CPU (llvm) artifacts"
        )


def collect(paths: Sequence[str | os.PathLike]) -> list[BundledArtifact]:
    """Verify the artifacts (and artifact sets) to bundle and read their manifests."""
    if not paths:
        raise EdgediffError("give at least one artifact directory to bundle")
    found: list[BundledArtifact] = []
    for raw in paths:
        path = Path(raw)
        if (path / MANIFEST_FILE).is_file():
            manifests = {"": check_artifact(path)}
        elif path.is_dir():
            roles = sorted(p for p in path.iterdir() if (p / MANIFEST_FILE).is_file())
            if not roles:
                raise ArtifactError(f"'{path}' holds no {MANIFEST_FILE}: not an artifact or artifact set")
            manifests = {role.name: check_artifact(role) for role in roles}
        else:
            raise ArtifactError(f"artifact '{path}' does not exist or is not a directory")
        for role, manifest in manifests.items():
            _check_runnable(path / role, manifest)
        name = path.resolve().name
        if any(item.name == name for item in found):
            raise EdgediffError(f"two artifacts named '{name}': rename one directory")
        found.append(BundledArtifact(name, path, manifests))
    return found


def runtime_files() -> list[tuple[Path, str]]:
    """The runtime's source files as ``(file, path inside the bundle)``."""
    files = []
    for entry in RUNTIME_SOURCES:
        source = PACKAGE_DIR / entry
        for path in sorted(source.rglob("*.py")) if source.is_dir() else [source]:
            files.append((path, f"edgediff/{path.relative_to(PACKAGE_DIR).as_posix()}"))
    return files


def bundle_readme(archive: str, artifacts: Sequence[BundledArtifact]) -> str:
    """The README of bundle file ``archive``: what the device needs, how to run, what is inside."""
    name = bundle_name(Path(archive))
    manifests = [m for item in artifacts for m in item.manifests.values()]
    tvm_versions = sorted({str(m["versions"].get("tvm", "?")) for m in manifests})
    arches = sorted({target_arch(m) or "the machine that compiled it" for m in manifests})
    # PixArt-alpha and SANA sets tokenize with tokenizer.json through the tokenizers library
    json_tokenizers = any(
        (item.path / "tokenizer" / "tokenizer.json").is_file() and (item.path / "conditioning.json").is_file()
        for item in artifacts
    )
    pip = "numpy tokenizers" if json_tokenizers else "numpy"
    lines = [
        f"# edgediff device bundle `{name}`",
        "",
        "Compiled artifacts and the torch-free edgediff runtime. Nothing of the compiler is inside: no",
        "PyTorch, no diffusers, no TVM compiler passes are needed on the device.",
        "",
        "## What the device needs",
        "",
        f"- Linux on {', '.join(arches)} (the apache-tvm wheels need glibc 2.28 or newer)",
        f"- python3 (3.10 or newer) with {' and '.join(pip.split())}",
        f"- the Apache TVM runtime of the version the artifacts were built with: "
        f"`python3 -m pip install {' '.join('apache-tvm==' + v for v in tvm_versions)} {pip}` "
        "(PyPI has manylinux aarch64 wheels; only TVM's runtime is used)",
        "",
        "## Running",
        "",
        "```sh",
        f"tar xf {archive} && cd {name}",
        "python3 run.py list                                   # the artifacts, targets, inputs, outputs",
        "python3 run.py run NAME in0.npy in1.npy -o outputs/   # one artifact; outputs/<output>.npy",
        "python3 run.py generate SET --prompt-embeds pe.npy --negative-prompt-embeds ne.npy \\",
        "    --sampler dpmpp-2m --steps 20 --guidance 7.5 --seed 0 --save-latents latents.npy -o out.png",
        "```",
        "",
        "`run` takes one `.npy` file per input, in the order `list` shows. `generate` runs the sampler",
        "loop of an artifact set (denoiser/, optionally decoder/, text_encoder/ + tokenizer/, SDXL's",
        "text_encoder_2/ + tokenizer_2/, conditioning.json) from prompt",
        "embeddings (batch 1), prompt text (`--prompt`, with a text encoder) or `--class-label N`",
        "(class-conditional models); it writes the final latents and, with a decoder, the PNG.",
        "Every artifact's sha256 is checked when it is loaded (`--no-verify` before the command skips it).",
        "",
        "## Artifacts",
        "",
    ]
    for item in artifacts:
        for role, manifest in item.manifests.items():
            label = f"{item.name}/{role}" if role else item.name
            lines.append(
                f"- `{label}`: {manifest['model']['name']} for {manifest['target']['name']} "
                f"(TVM {manifest['versions'].get('tvm', '?')})"
            )
    return "\n".join(lines) + "\n"


def bundle_name(output: Path) -> str:
    """The bundle's top folder: the output file's name without its tar suffix."""
    for suffix in _TAR_SUFFIXES:
        if output.name.endswith(suffix) and len(output.name) > len(suffix):
            return output.name[: -len(suffix)]
    raise EdgediffError(f"bundle '{output}': the output must end in {', '.join(_TAR_SUFFIXES)}")


def _normalise(info: tarfile.TarInfo) -> tarfile.TarInfo:
    # The device's user owns the files it unpacks; the build machine's user and group names mean nothing.
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_text(tar: tarfile.TarFile, arcname: str, text: str, mode: int = 0o644) -> None:
    data = text.encode()
    info = tarfile.TarInfo(arcname)
    info.size, info.mode, info.mtime = len(data), mode, int(time.time())
    tar.addfile(_normalise(info), io.BytesIO(data))


def make_bundle(artifacts: Sequence[str | os.PathLike], output: str | os.PathLike) -> Path:
    """Pack ``artifacts`` (artifact or artifact-set directories) with the runtime and ``run.py`` into
    ``output`` (``.tar``, or ``.tar.gz``/``.tgz`` compressed); return the path written."""
    output = Path(output)
    name = bundle_name(output)
    items = collect(artifacts)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.partial")
    mode = "w:gz" if output.name.endswith((".tar.gz", ".tgz")) else "w"
    try:
        with tarfile.open(partial, mode) as tar:
            _add_text(tar, f"{name}/run.py", _RUN_PY, mode=0o755)
            _add_text(tar, f"{name}/README.md", bundle_readme(output.name, items))
            _add_text(tar, f"{name}/edgediff/__init__.py", _BUNDLE_INIT.format(version=edgediff.__version__))
            for path, arcname in runtime_files():
                tar.add(path, f"{name}/{arcname}", filter=_normalise)
            for item in items:
                tar.add(item.path, f"{name}/artifacts/{item.name}", filter=_skip_caches)
        os.replace(partial, output)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return output


def _skip_caches(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    return None if "__pycache__" in info.name.split("/") else _normalise(info)
