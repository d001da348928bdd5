#!/usr/bin/env python3
"""An emulated aarch64 Linux with Python, numpy and the TVM runtime, for running arm builds on an x86 host.

The root is Debian bookworm for arm64, made by ``debootstrap --foreign`` (the first stage only: it unpacks
the base system without running any arm64 code). Python is added by unpacking its .debs, not by a chroot
second stage, and the aarch64 wheels of apache-tvm, apache-tvm-ffi and numpy are unpacked onto a folder put
on ``PYTHONPATH``. Programs run under user-mode QEMU with the root as the library prefix::

    qemu-aarch64-static -L ROOT/rootfs ROOT/rootfs/usr/bin/python3.11 ...

so no binfmt registration, chroot or root privileges are needed to run (building the root needs root, or
sudo, for debootstrap). Everything is cached under the git-ignored ``.cache/``: a first build downloads
~40 MB of .debs and ~110 MB of wheels and takes about a minute or two; later calls reuse it.

    python scripts/arm64_root.py build                      # build (or check) the cached root
    python scripts/arm64_root.py run -- -c "import tvm"     # python3.11 args, in the emulator
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"
DEFAULT_ROOT = CACHE / "arm64-root"
DOWNLOADS = CACHE / "downloads"
SUITE = "bookworm"
MIRROR = os.environ.get("EDGEDIFF_DEBIAN_MIRROR", "http://deb.debian.org/debian")
PYTHON_VERSION = "3.11"  # bookworm's python3
# The interpreter and its standard library, plus the libraries of the stdlib modules the runtime uses that
# the debootstrap base lacks (expat: xml/plistlib; libssl3: hashlib's OpenSSL backend). Unpacking these is
# enough to run Python: their maintainer scripts only byte-compile and register alternatives.
PYTHON_DEBS = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libexpat1",
    "libssl3",
)
# apache-tvm publishes manylinux_2_28 aarch64 wheels (manylinux2014 finds none); bookworm has glibc 2.36.
WHEEL_PLATFORM = "manylinux_2_28_aarch64"
# The host's versions, so the emulated runtime is the one the artifacts were built and tested with.
WHEEL_PACKAGES = ("apache-tvm", "apache-tvm-ffi", "numpy")
LAYOUT_VERSION = 1
Log = Callable[[str], None]


class EmulatorError(RuntimeError):
    """A tool is missing or a build step failed; the message says which and how to fix it."""


@dataclass(frozen=True)
class Arm64Root:
    """A built root: ``rootfs`` (the Debian arm64 tree) and ``site`` (the unpacked wheels)."""

    path: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.rootfs / "usr" / "bin" / f"python{PYTHON_VERSION}"

    def command(self, args: Sequence[str]) -> list[str]:
        """The host command line that runs ``python3.11 args`` in the emulator."""
        return [_tool("qemu-aarch64-static"), "-L", str(self.rootfs), str(self.python), *args]

    def env(self, pythonpath: Sequence[str | os.PathLike] = ()) -> dict[str, str]:
        """A clean environment: host settings (LD_LIBRARY_PATH, PYTHONHOME, ...) would confuse the guest.

        Byte-code writing stays on: importing TVM under QEMU compiles ~1000 modules, and the cached .pyc
        files make later launches several times faster.
        """
        paths = [str(Path(p).resolve()) for p in pythonpath] + [str(self.site)]
        return {
            "PATH": "/usr/bin:/bin",
            "HOME": os.environ.get("HOME", "/tmp"),
            "LANG": "C.UTF-8",
            "PYTHONPATH": os.pathsep.join(paths),
            "PYTHONNOUSERSITE": "1",
            "PYTHONUNBUFFERED": "1",
        }

    def run(
        self,
        args: Sequence[str],
        *,
        pythonpath: Sequence[str | os.PathLike] = (),
        cwd: str | os.PathLike | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python3.11 args`` in the emulator; output is captured as text."""
        return subprocess.run(
            self.command(args),
            env=self.env(pythonpath),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _tool(name: str) -> str:
    # debootstrap lives in /usr/sbin, which is not on a normal user's PATH.
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if found is None:
        raise EmulatorError(
            f"{name} is not installed: run `make device-tools` (Debian: qemu-user-static, debootstrap)"
        )
    return found


def _run(cmd: Sequence[str], what: str, stdin: Any = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(cmd), stdin=stdin, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise EmulatorError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{tail}")
    return result


def _as_root(cmd: list[str]) -> list[str]:
    return cmd if os.geteuid() == 0 else ["sudo", *cmd]


def wheel_requirements() -> list[str]:
    """``name==version`` of the host's TVM and numpy, for the aarch64 download."""
    return [f"{name}=={metadata.version(name)}" for name in WHEEL_PACKAGES]


def _config() -> dict[str, object]:
    return {
        "layout": LAYOUT_VERSION,
        "suite": SUITE,
        "debs": list(PYTHON_DEBS),
        "wheels": wheel_requirements(),
        "platform": WHEEL_PLATFORM,
    }


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    # `make device-tools` and a test session may build at the same time; the second waits for the first.
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _debootstrap(rootfs: Path, log: Log) -> None:
    debs = DOWNLOADS / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap --foreign --arch=arm64 {SUITE} (base system + {len(PYTHON_DEBS)} python packages)")
    _run(
        _as_root(
            [
                _tool("debootstrap"),
                "--foreign",
                "--arch=arm64",
                "--variant=minbase",
                f"--include={','.join(PYTHON_DEBS)}",
                f"--cache-dir={debs.resolve()}",
                SUITE,
                str(rootfs),
                MIRROR,
            ]
        ),
        "debootstrap",
    )
    if os.geteuid() != 0:
        _run(["sudo", "chown", "-R", f"{os.getuid()}:{os.getgid()}", str(rootfs)], "chown of the arm64 root")


def _unpack_debs(rootfs: Path, log: Log) -> None:
    archives = rootfs / "var" / "cache" / "apt" / "archives"
    for package in PYTHON_DEBS:
        matches = sorted(archives.glob(f"{package}_*_arm64.deb"))
        if not matches:
            raise EmulatorError(f"debootstrap did not download {package} (looked in {archives})")
        log(f"unpack {matches[-1].name}")
        # `dpkg -x` would replace bookworm's merged-/usr symlinks (/lib -> usr/lib) with directories for
        # packages that still ship files under /lib, which breaks the dynamic loader; tar keeps them.
        deb = str(matches[-1])
        data = subprocess.Popen([_tool("dpkg-deb"), "--fsys-tarfile", deb], stdout=subprocess.PIPE)
        untar = ["tar", "-x", "--keep-directory-symlink", "-C", str(rootfs)]
        _run(untar, f"unpacking {package}", stdin=data.stdout)
        if data.wait() != 0:
            raise EmulatorError(f"dpkg-deb --fsys-tarfile {matches[-1]} failed")
    # The .debs stay in the download cache; the root does not need a second copy.
    for deb in archives.glob("*.deb"):
        deb.unlink()


def _install_wheels(site: Path, log: Log) -> None:
    requirements = wheel_requirements()
    # One folder per set of versions, so that wheels of an older TVM are never unpacked with newer ones.
    wheels = DOWNLOADS / "aarch64-wheels" / "-".join(r.replace("==", "-") for r in requirements)
    log(f"pip download ({WHEEL_PLATFORM}, cp{PYTHON_VERSION.replace('.', '')}): {' '.join(requirements)}")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--only-binary=:all:",
            f"--platform={WHEEL_PLATFORM}",
            f"--python-version={PYTHON_VERSION}",
            "--implementation=cp",
            f"--dest={wheels}",
            *requirements,
        ],
        "downloading the aarch64 wheels",
    )
    # pip downloads the dependencies too (ml_dtypes, typing_extensions).
    site.mkdir(parents=True)
    for wheel in sorted(wheels.glob("*.whl")):
        log(f"unpack {wheel.name}")
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(site)


def ensure_root(path: str | os.PathLike = DEFAULT_ROOT, *, log: Log = print) -> Arm64Root:
    """Build the arm64 root at ``path`` unless a complete one with the same configuration is there."""
    root = Arm64Root(Path(path).resolve())
    stamp = root.path / "complete.json"
    config = _config()
    with _locked(root.path.with_name(root.path.name + ".lock")):
        if stamp.is_file() and json.loads(stamp.read_text()) == config:
            return root
        for tool in ("qemu-aarch64-static", "debootstrap", "dpkg-deb"):
            _tool(tool)
        start = time.perf_counter()
        if root.path.exists():  # a partial or outdated root
            _run(_as_root(["rm", "-rf", str(root.path)]), "removing the old arm64 root")
        root.path.mkdir(parents=True)
        _debootstrap(root.rootfs, log)
        _unpack_debs(root.rootfs, log)
        _install_wheels(root.site, log)
        # One import writes the .pyc files of the stdlib, numpy and TVM, and proves the root works.
        log("first import of numpy and tvm under qemu (compiles their byte code; about a minute)")
        check = root.run(["-c", "import platform, numpy, tvm; print(platform.machine(), tvm.__version__)"])
        if check.returncode != 0 or not check.stdout.startswith("aarch64"):
            raise EmulatorError(f"the arm64 root does not run Python + TVM:\n{check.stdout}{check.stderr}")
        stamp.write_text(json.dumps(config, indent=2))
        log(f"arm64 root ready in {root.path} ({time.perf_counter() - start:.0f} s): {check.stdout.strip()}")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(DEFAULT_ROOT), help="the root's folder (.cache/arm64-root)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("build", help="build the root (no-op when it is complete)")
    run = commands.add_parser("run", help="run python3.11 with the given arguments in the emulator")
    run.add_argument("--pythonpath", action="append", default=[], help="extra PYTHONPATH entry (repeatable)")
    run.add_argument("args", nargs=argparse.REMAINDER, help="arguments of python3.11 (after --)")
    args = parser.parse_args(argv)
    try:
        root = ensure_root(args.root)
    except EmulatorError as err:
        print(f"arm64_root: error: {err}", file=sys.stderr)
        return 1
    if args.command == "build":
        print(root.path)
        return 0
    python_args = args.args[1:] if args.args[:1] == ["--"] else args.args
    return subprocess.run(root.command(python_args), env=root.env(args.pythonpath), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
