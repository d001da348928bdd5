"""Run, time and profile artifacts on real devices over TVM's RPC stack (``tvm.rpc``).

Each device runs TVM's RPC server and registers with a tracker under a key (``python -m tvm.exec.rpc_server
--tracker HOST:PORT --key KEY`` on a Linux board, TVM's RPC app on Android). Here the host asks the tracker
for a device, uploads the artifact's library (once per device: it is kept next to the server's session
folders under its sha256 and reused by later sessions), copies the weights into device tensors once per
session, and drives the Relax VM through the RPC-safe calls (``set_input`` / ``invoke_stateful`` /
``get_outputs``). Times are TVM's ``time_evaluator`` run on the device, so no network time is in them;
per-kernel times come from a small library (``device_profiler.cc``) that installs the VM's instrument on
the device, since TVM's RPC cannot pass a host callback there. :func:`time_kernels` times single kernels
the same way (for calibrating the cost model on a device).

Nothing here is a transport of its own: the tracker protocol (``tvm.rpc.base``), the sessions
(``tvm.rpc.connect``), file upload and module loading are TVM's.

    devices = list_devices("127.0.0.1:9190")
    with open_device("127.0.0.1:9190", "pixel7") as device:
        module = RemoteModule(device, "out/unet")
        noise = module(sample, timestep, embeddings)
        seconds = module.time_call(sample, timestep, embeddings, number=5, repeat=3)
        print(module.profile(sample, timestep, embeddings).table())
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import ArtifactError, EdgediffError
from edgediff.runtime.artifact import (
    CompiledModule,
    _check_file,
    manifest_entries,
    normalise_arch,
    read_manifest,
    target_arch,
)
from edgediff.runtime.tensor_info import TensorInfo

DEFAULT_TIMEOUT = 60.0  # seconds to reach the tracker and to wait for a free device
# The server runs each session in a fresh temporary folder it deletes afterwards; its parent (the system's
# temp folder on a Linux board, the app's folder on Android) outlives sessions, so libraries kept there are
# found again by the next session.
DEVICE_CACHE = ".."
# ELF e_machine -> architecture, for the library actually in the artifact (the truth, whatever the manifest)
ELF_MACHINES = {3: "i386", 40: "arm", 62: "x86_64", 183: "aarch64", 243: "riscv64"}


class DeviceError(EdgediffError):
    """A remote device could not do what was asked: no device under the key, an architecture or TVM version
    that does not fit the artifact, a timeout or a device that went away. Names the device and the step."""


def parse_address(text: str, what: str = "--rpc") -> tuple[str, int]:
    """``HOST:PORT`` as ``(host, port)``."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise DeviceError(f"{what} '{text}': expected HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def _last_line(err: BaseException) -> str:
    # TVM's RPC errors carry the remote traceback; the cause is on the last non-empty line
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(err).__name__


# ----------------------------------------------------------------------------------------------- tracker


@dataclass(frozen=True)
class KeyStatus:
    """The devices registered under one key at a tracker."""

    key: str
    total: int
    free: int
    pending: int  # requests waiting for a device of this key
    servers: tuple[str, ...] = ()  # HOST:PORT of each device's RPC server

    @property
    def busy(self) -> int:
        return max(0, self.total - self.free)


class Tracker:
    """A connection to a TVM RPC tracker, speaking its protocol through ``tvm.rpc.base``."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        from tvm.rpc import base

        self.address = address
        self._addr = parse_address(address, "--tracker")
        try:
            self._sock = base.connect_with_retry(self._addr, timeout=timeout, retry_period=0.5)
            self._sock.settimeout(timeout)
            self._sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(self._sock, 4))[0]
        except (OSError, RuntimeError) as err:
            raise DeviceError(f"tracker {address}: cannot connect ({_last_line(err)})") from err
        if magic != base.RPC_TRACKER_MAGIC:
            self.close()
            raise DeviceError(f"{address} is not a TVM RPC tracker")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def summary(self) -> list[KeyStatus]:
        """Every key with devices or waiting requests, sorted by key."""
        from tvm.rpc import base

        try:
            base.sendjson(self._sock, [base.TrackerCode.SUMMARY])
            code, data = base.recvjson(self._sock)
        except OSError as err:
            raise DeviceError(f"tracker {self.address}: summary failed ({_last_line(err)})") from err
        if code != base.TrackerCode.SUCCESS:
            raise DeviceError(f"tracker {self.address}: summary failed (code {code})")
        servers: dict[str, list[str]] = {}
        for item in data["server_info"]:
            key = item["key"].split(":", 1)[1]  # 'server:pixel7' -> 'pixel7'
            servers.setdefault(key, []).append(":".join(map(str, item["addr"])))
        keys = sorted(set(servers) | set(data["queue_info"]))
        statuses = []
        for key in keys:
            queue = data["queue_info"].get(key, {"free": 0, "pending": 0})
            status = KeyStatus(key, len(servers.get(key, [])), queue["free"], queue["pending"])
            if status.total or status.pending:
                statuses.append(KeyStatus(**{**status.__dict__, "servers": tuple(sorted(servers[key]))}))
        return statuses

    def request(self, key: str, timeout: float) -> tuple[str, int, str]:
        """``(host, port, match key)`` of a free device under ``key``, waiting up to ``timeout`` seconds."""
        from tvm.rpc import base

        known = {status.key: status for status in self.summary()}
        if key not in known or known[key].total == 0:
            have = ", ".join(f"{k} ({s.total})" for k, s in known.items() if s.total) or "none"
            raise DeviceError(f"no device under key '{key}' at tracker {self.address} (keys there: {have})")
        try:
            base.sendjson(self._sock, [base.TrackerCode.REQUEST, key, "", 1])
            self._sock.settimeout(timeout)
            code, value = base.recvjson(self._sock)
        except TimeoutError as err:
            # the tracker drops this connection's waiting request when it closes
            self.close()
            raise DeviceError(
                f"timeout: no device under key '{key}' at tracker {self.address} became free within "
                f"{timeout:g} s ({known[key].total} registered, all busy)"
            ) from err
        except OSError as err:
            raise DeviceError(f"tracker {self.address}: request for '{key}' failed ({err})") from err
        if code != base.TrackerCode.SUCCESS:
            raise DeviceError(f"tracker {self.address}: request for '{key}' failed (code {code})")
        host, port, match = value
        return str(host), int(port), str(match)


def list_devices(tracker: str, timeout: float = DEFAULT_TIMEOUT) -> list[KeyStatus]:
    """The keys at ``tracker`` (``HOST:PORT``) with their free and busy device counts."""
    with Tracker(tracker, timeout) as session:
        return session.summary()


def format_devices(statuses: Sequence[KeyStatus], tracker: str) -> str:
    """``edgediff devices``' table."""
    if not statuses:
        return f"tracker {tracker}: no devices registered"
    width = max(len("key"), *(len(s.key) for s in statuses))
    lines = [f"tracker {tracker}", f"{'key':<{width}}  total  free  busy  waiting  servers"]
    for s in statuses:
        lines.append(
            f"{s.key:<{width}}  {s.total:5d}  {s.free:4d}  {s.busy:4d}  {s.pending:7d}  "
            + ", ".join(s.servers)
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ device


@dataclass
class RemoteDevice:
    """An RPC session on one device (held until :meth:`close`: the tracker marks the device busy)."""

    session: Any
    key: str
    address: str  # HOST:PORT of the device's RPC server
    triple: str | None  # the device's LLVM triple, when its TVM has the compiler part (not the Android app)
    session_timeout: float = 0.0
    modules: weakref.WeakSet = field(default_factory=weakref.WeakSet)  # RemoteModules made on this device
    opened: float = field(default_factory=time.monotonic)
    _profiler: Any = None

    @property
    def arch(self) -> str | None:
        return normalise_arch(self.triple.split("-")[0]) if self.triple else None

    @property
    def name(self) -> str:
        return f"device '{self.key}' at {self.address}"

    @property
    def cpu(self) -> Any:
        return self.session.cpu(0)

    def close(self) -> None:
        """End the session now (the tracker then hands the device out again), even while modules made on it
        are still referenced: their device tensors are dropped first, while the connection is up."""
        import gc

        for module in list(self.modules):
            module.unload()
        self.modules.clear()
        self._profiler = None
        if self.session is not None:
            try:
                self.session._sess["CloseRPCConnection"]()
            except (RuntimeError, OSError, AttributeError):
                pass  # already gone
            self.session = None
        gc.collect()

    def profiler(self) -> Any:
        """The device profiler's module on this device (built for its architecture and uploaded once)."""
        if self._profiler is None:
            if self.arch is None:
                raise DeviceError(
                    f"{self.name}: its architecture is unknown, so no profiler can be built for it"
                )
            library = build_profiler(self.arch)
            with self.step("upload of the device profiler"):
                self.session.upload(str(library), library.name)
                self._profiler = self.session.load_module(library.name)
        return self._profiler

    def __enter__(self) -> RemoteDevice:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """Turn the RPC errors of ``what`` into one-line :class:`DeviceError`s naming this device."""
        try:
            yield
        except (RuntimeError, OSError) as err:
            raise self.error(err, what) from err

    def error(self, err: BaseException, what: str) -> DeviceError:
        text = str(err)
        if "RPCSessionTimeoutError" in text:
            return DeviceError(
                f"timeout: {self.name} ended the session during {what} (past its {self.session_timeout:g} s "
                "session limit; raise --session-timeout)"
            )
        gone = ("Connection reset", "Broken pipe", "SockChannel", "closed", "Connection refused")
        held = time.monotonic() - self.opened
        if any(marker in text for marker in gone) and self.session_timeout and held >= self.session_timeout:
            return DeviceError(
                f"timeout: {self.name} ended the session during {what}, {held:.0f} s in (past its "
                f"{self.session_timeout:g} s session limit; raise --session-timeout)"
            )
        if any(marker in text for marker in gone):
            return DeviceError(f"{self.name} disconnected during {what} ({_last_line(err)})")
        if "protocol version mismatch" in text.lower():
            return DeviceError(f"{self.name}: its TVM runtime speaks another RPC protocol version ({what})")
        return DeviceError(f"{self.name}: {what} failed: {_last_line(err)}")


def open_device(
    rpc: str,
    key: str | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    session_timeout: float = 0.0,
) -> RemoteDevice:
    """A session on a device: with ``key``, ``rpc`` is a tracker and any free device under the key is taken
    (waiting up to ``timeout`` s); without, ``rpc`` is one device's RPC server. ``session_timeout`` (s, 0 for
    none) makes the server end the session when it runs longer, so a hung device cannot hang the caller."""
    from tvm import rpc as tvm_rpc

    if key is not None:
        with Tracker(rpc, timeout) as tracker:
            host, port, match = tracker.request(key, timeout)
    else:
        host, port = parse_address(rpc)
        match, key = "", "direct"
    device = RemoteDevice(None, key, f"{host}:{port}", None, session_timeout)
    with device.step("connect"):
        device.session = tvm_rpc.connect(host, port, match, session_timeout=session_timeout)
    try:
        device.triple = str(device.session.get_function("target.llvm_get_system_triple")())
    except (RuntimeError, AttributeError):
        device.triple = None  # a runtime-only TVM (Android app): the architecture shows at library load
    return device


# ------------------------------------------------------------------------------------------------ module


def library_arch(path: Path) -> str | None:
    """The CPU architecture of an ELF shared library (None for anything else)."""
    with open(path, "rb") as handle:
        header = handle.read(20)
    if header[:4] != b"\x7fELF":
        return None
    order = "little" if header[5] == 1 else "big"
    return ELF_MACHINES.get(int.from_bytes(header[18:20], order))


@dataclass
class Transfers:
    """Payload bytes between host and device (the RPC framing adds a few bytes per call on top)."""

    library: int = 0
    weights: int = 0
    inputs: int = 0
    outputs: int = 0
    calls: int = 0

    @property
    def total(self) -> int:
        return self.library + self.weights + self.inputs + self.outputs


class RemoteModule(CompiledModule):
    """An artifact run on a remote device: a :class:`CompiledModule` whose VM, library and weights live on
    the device. Inputs go up and outputs come back on each call; the weights go up once per session.

    ``resident_inputs=True`` keeps each input's last value on the device and sends it again only when it
    changes (the conditioning of a sampler loop is the same at every step).
    """

    def __init__(
        self,
        device: RemoteDevice,
        path: str | Path,
        *,
        verify: bool = True,
        resident_inputs: bool = False,
        cache: str | None = DEVICE_CACHE,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.remote = device
        library = self.manifest["library"]
        if library["format"] != "shared":
            raise ArtifactError(
                f"{self.path}: library is {library['file']} (objects): install the target's cross compiler "
                "and recompile to get a .so the device can load"
            )
        self._library_path = _check_file(self.path, library, "library", hash_it=verify)
        self._check_arch()
        self.inputs = [TensorInfo.from_dict(d) for d in self.manifest["inputs"]]
        self.outputs = [TensorInfo.from_dict(d) for d in self.manifest["outputs"]]
        self.entries = manifest_entries(self.manifest)
        self._verify = verify
        self._vm: Any = None
        self._main: Any = None
        self._weights: list[Any] = []
        self._merged: dict[int, np.ndarray] = {}
        self.lora: dict[str, Any] | None = None
        self._functions: dict[str, Any] = {}
        self._resident = resident_inputs
        self._sent: dict[int, tuple[bytes, Any]] = {}  # input position -> (digest, device tensor)
        self._cache = cache
        self.transfers = Transfers()
        self.library_cached = False  # whether the device already had the library
        device.modules.add(self)
        self.load()

    def _check_arch(self) -> None:
        built = library_arch(self._library_path) or target_arch(self.manifest)
        device = self.remote.arch
        if built and device and built != device:
            raise DeviceError(
                f"{self.path}: built for {built} (target {self.manifest['target']['name']}), but "
                f"{self.remote.name} is {device} ({self.remote.triple}); compile for the device's target"
            )

    def _remote_library(self) -> str:
        """The library's path on the device, uploading it unless a previous session left it there."""
        sha = self.manifest["library"]["sha256"]
        name = f"edgediff-{sha[:24]}{self._library_path.suffix}"
        session = self.remote.session
        if self._cache is None:
            with self.remote.step(f"upload of {self._library_path.name}"):
                session.upload(str(self._library_path), name)
            self.transfers.library += self._library_path.stat().st_size
            return name
        path, stamp = f"{self._cache}/{name}", f"{self._cache}/{name}.sha256"
        try:
            # the stamp is written after the library, so a library cut off mid-upload is never trusted
            self.library_cached = bytes(session.download(stamp)).decode() == sha
        except UnicodeDecodeError:
            self.library_cached = False
        except RuntimeError as err:  # no stamp: not cached, unless the session itself failed
            problem = self.remote.error(err, "the library cache lookup")
            if str(problem).startswith("timeout") or "disconnected" in str(problem):
                raise problem from err
            self.library_cached = False
        if not self.library_cached:
            with self.remote.step(f"upload of {self._library_path.name}"):
                session.upload(str(self._library_path), path)
                session.upload(bytearray(sha.encode()), stamp)
            self.transfers.library += self._library_path.stat().st_size
        return path

    def load(self) -> None:
        """Upload the library (unless cached on the device), load it and copy the weights up."""
        if self.loaded:
            return
        if self.remote.session is None:
            raise DeviceError(
                f"{self.path}: the session on {self.remote.name} is closed; open the device again"
            )
        import tvm
        from tvm.runtime.vm import VirtualMachine

        from edgediff.runtime.artifact import iter_weights

        self.device = self.remote.cpu
        path = self._remote_library()
        with self.remote.step(f"load of {self.path.name}/{self._library_path.name}"):
            try:
                library = self.remote.session.load_module(path)
            except RuntimeError as err:
                raise self._load_error(err) from err
            self._vm = VirtualMachine(library, self.device)
        with self.remote.step(f"upload of {self.path.name}'s weights"):
            self._weights = []
            for i, weight in enumerate(iter_weights(self.path, self.manifest, verify=self._verify)):
                value = self._merged.get(i, weight)
                self._weights.append(tvm.runtime.tensor(value, self.device))
                self.transfers.weights += value.nbytes
        self._verify = False
        self._functions = {entry.function: entry.function for entry in self.entries}

    def _load_error(self, err: RuntimeError) -> EdgediffError:
        text = str(err)
        built = self.manifest.get("versions", {}).get("tvm", "?")
        if "version" in text and ("VM file" in text or "bytecode" in text.lower()):
            return DeviceError(
                f"{self.path}: the TVM runtime on {self.remote.name} cannot read this library's VM "
                f"bytecode (built with TVM {built}, another version is on the device): install apache-tvm "
                f"{built} there or rebuild the artifact with the device's TVM"
            )
        if "cannot open shared object" in text or "ELF" in text or "Exec format" in text:
            built_for = library_arch(self._library_path) or "?"
            return DeviceError(
                f"{self.path}: {self.remote.name} cannot load the library built for {built_for} "
                f"(target {self.manifest['target']['name']}): wrong architecture or missing system libraries "
                f"({_last_line(err)})"
            )
        return self.remote.error(err, f"load of {self.path}")

    def unload(self) -> None:
        self._weights = []
        self._sent = {}
        self._vm = None
        self._functions = {}
        import gc

        gc.collect()

    def _send(self, position: int, array: np.ndarray) -> Any:
        import hashlib

        import tvm

        if self._resident:
            digest = hashlib.sha1(array.view(np.uint8).reshape(-1)).digest() + str(array.shape).encode()
            kept = self._sent.get(position)
            if kept is not None and kept[0] == digest:
                return kept[1]
        tensor = tvm.runtime.tensor(array, self.device)
        self.transfers.inputs += array.nbytes
        if self._resident:
            self._sent[position] = (digest, tensor)
        return tensor

    def _set_inputs(self, inputs: tuple[Any, ...]) -> str:
        if len(inputs) == 1 and isinstance(inputs[0], dict):
            inputs = tuple(inputs[0][info.name] for info in self.inputs)
        if len(inputs) != len(self.inputs):
            from edgediff.errors import InputError

            expected = ", ".join(info.describe() for info in self.inputs)
            raise InputError(
                f"{self.name}: got {len(inputs)} inputs, expected {len(self.inputs)} ({expected})"
            )
        entry = self._select(inputs)
        self.load()
        with self.remote.step(f"upload of {self.name}'s inputs"):
            args = [
                self._send(i, self._to_array(v, info))
                for i, (v, info) in enumerate(zip(inputs, entry.inputs, strict=True))
            ]
            self._vm.set_input(entry.function, *args, *self._weights)
        return entry.function

    def __call__(self, *inputs: Any) -> np.ndarray | tuple[np.ndarray, ...]:
        function = self._set_inputs(inputs)
        with self.remote.step(f"run of {self.name}"):
            self._vm.invoke_stateful(function)
            result = self._vm.get_outputs(function)
            items = result if isinstance(result, tuple) else (result,)
            arrays = tuple(item.numpy() for item in items)
        self.transfers.outputs += sum(a.nbytes for a in arrays)
        self.transfers.calls += 1
        return arrays[0] if len(arrays) == 1 else arrays

    def time_call(
        self, *inputs: Any, number: int = 3, repeat: int = 3, min_repeat_ms: int = 0
    ) -> list[float]:
        """Seconds per call measured on the device by TVM's ``time_evaluator``: ``repeat`` figures, each the
        mean of ``number`` calls, after one untimed call."""
        function = self._set_inputs(inputs)
        with self.remote.step(f"timing of {self.name}"):
            timer = self._vm.time_evaluator(
                "invoke_stateful", self.device, number=number, repeat=repeat, min_repeat_ms=min_repeat_ms
            )
            return [float(x) for x in timer(function).results]

    def profile(self, *inputs: Any, runs: int = 1) -> Any:
        """Per-kernel times of ``runs`` calls, measured on the device (see ``device_profiler.cc``): a
        :class:`~edgediff.backend.profile.KernelProfile`, the host bench's."""
        import json

        from edgediff.backend.profile import KernelProfile

        profiler = self.remote.profiler()
        function = self._set_inputs(inputs)
        with self.remote.step(f"profile of {self.name}"):
            self._vm.invoke_stateful(function)  # warm: the first call also starts the thread pool
            profiler["edgediff_profile_attach"](self._vm.module)
            try:
                for _ in range(runs):
                    self._vm.invoke_stateful(function)
                report = json.loads(str(profiler["edgediff_profile_report"]()))
            finally:
                profiler["edgediff_profile_detach"](self._vm.module)
        profile = KernelProfile(runs=runs)
        for symbol, (seconds, calls) in report.items():
            if not symbol.startswith("vm.builtin."):  # allocations and shape checks, not kernels
                profile.seconds[symbol] += float(seconds)
                profile.calls[symbol] += int(calls)
        return profile

    def __repr__(self) -> str:
        return f"RemoteModule({self.name} @ {self.path} on {self.remote.name})"


PROFILER_SOURCE = Path(__file__).with_name("device_profiler.cc")
# device architecture -> C++ compiler that builds the profiler for it (besides the host's own g++)
CROSS_COMPILERS = {"aarch64": "aarch64-linux-gnu-g++", "arm": "arm-linux-gnueabihf-g++"}


def build_profiler(arch: str, output_dir: Path | None = None) -> Path:
    """``device_profiler.cc`` compiled for ``arch`` (cached by source, tvm-ffi version and architecture)."""
    import hashlib
    import shutil
    import subprocess
    import tempfile

    import tvm_ffi

    native = normalise_arch(platform.machine())
    compiler = "g++" if arch == native else CROSS_COMPILERS.get(arch)
    if compiler is None or shutil.which(compiler) is None:
        raise DeviceError(
            f"the device profiler for {arch} needs a C++ compiler for it ({compiler or 'none known'}), "
            "not installed here (Debian: g++-aarch64-linux-gnu; `make cross-toolchain`)"
        )
    source = PROFILER_SOURCE.read_bytes()
    tag = hashlib.sha256(source + tvm_ffi.__version__.encode() + arch.encode()).hexdigest()[:16]
    folder = output_dir or Path(tempfile.gettempdir()) / "edgediff-profiler"
    library = folder / f"device_profiler-{arch}-{tag}.so"
    if library.is_file():
        return library
    folder.mkdir(parents=True, exist_ok=True)
    include = Path(tvm_ffi.__file__).parent / "include"
    dlpack = Path(tvm_ffi.__file__).parent / "3rdparty" / "dlpack" / "include"
    partial = library.with_name(f".{library.name}.{os.getpid()}")
    # no -ltvm_ffi: the RPC server process has libtvm_ffi loaded globally, and linking would need the
    # device's copy of it here
    command = [compiler, "-std=c++17", "-O2", "-shared", "-fPIC", f"-I{include}", f"-I{dlpack}"]
    result = subprocess.run(
        [*command, str(PROFILER_SOURCE), "-o", str(partial)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        tail = (result.stderr.strip().splitlines() or ["?"])[-1]
        raise DeviceError(f"building the device profiler for {arch} with {compiler} failed: {tail}")
    os.replace(partial, library)
    return library


def example_inputs(module: CompiledModule, seed: int = 0) -> list[np.ndarray]:
    """Seeded inputs of the artifact's signature (normal floats; zeros for integer ids and labels)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for info in module.inputs:
        dtype = np.dtype(info.dtype)
        if dtype.kind == "f":
            arrays.append(rng.standard_normal(info.shape).astype(dtype))
        else:
            arrays.append(np.zeros(info.shape, dtype))
    return arrays


def time_kernels(
    device: RemoteDevice,
    library: str | Path,
    kernels: Sequence[tuple[str, Sequence[tuple[Sequence[int], str]]]],
    *,
    number: int = 10,
    repeat: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Seconds per call of each kernel of ``library`` (a .so exported from a TVM module) on the device: the
    least of ``repeat`` means of ``number`` calls on seeded device tensors of the given ``(shape, dtype)``s.
    For the cost model's calibration: the same upload-once and ``time_evaluator`` path as the models."""
    import tvm

    library = Path(library)
    name = f"edgediff-kernels-{_sha256(library)[:24]}{library.suffix}"
    rng = np.random.default_rng(seed)
    timings = {}
    with device.step(f"upload of {library.name}"):
        device.session.upload(str(library), name)
        module = device.session.load_module(name)
    for kernel, args in kernels:
        with device.step(f"timing of kernel {kernel}"):
            tensors = [
                tvm.runtime.tensor(rng.standard_normal(tuple(shape)).astype(dtype), device.cpu)
                for shape, dtype in args
            ]
            timer = module.time_evaluator(kernel, device.cpu, number=number, repeat=repeat)
            timings[kernel] = min(timer(*tensors).results)
    return timings


def _sha256(path: Path) -> str:
    from edgediff.runtime.artifact import sha256_file

    return sha256_file(path)


# ------------------------------------------------------------------------------------------------- bench


@dataclass
class RemoteRow:
    """One artifact timed on one device (or the error that stopped it)."""

    artifact: str
    model: str = ""
    latent: int = 0
    target: str = ""
    key: str = ""
    device: str = ""
    arch: str = ""
    seconds: list[float] = field(default_factory=list)
    library_cached: bool = False
    transfers: Transfers = field(default_factory=Transfers)
    profile: Any = None  # KernelProfile measured on the device, with --profile
    error: str | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds) if self.seconds else float("nan")


def _latent(module: CompiledModule) -> int:
    meta = module.manifest["model"].get("meta") or {}
    if meta.get("latent_size"):
        return int(meta["latent_size"])
    shape = module.inputs[0].shape if module.inputs else ()
    return int(shape[-1]) if len(shape) == 4 else 0


def bench_on_device(
    device: RemoteDevice, artifact: str | Path, *, number: int = 3, repeat: int = 3, profile: bool = False
) -> RemoteRow:
    """Time one artifact on ``device`` with seeded inputs, and with ``profile`` its kernels one by one
    (errors are raised, not recorded)."""
    module = RemoteModule(device, artifact)
    row = RemoteRow(str(artifact), module.name, _latent(module), module.manifest["target"]["name"])
    row.key, row.device, row.arch = device.key, device.address, device.arch or "?"
    inputs = example_inputs(module)
    row.seconds = module.time_call(*inputs, number=number, repeat=repeat)
    if profile:
        row.profile = module.profile(*inputs)
    row.library_cached, row.transfers = module.library_cached, module.transfers
    module.unload()
    return row


def bench_remote(
    artifacts: Sequence[str | Path],
    rpc: str,
    keys: Sequence[str],
    *,
    number: int = 3,
    repeat: int = 3,
    timeout: float = DEFAULT_TIMEOUT,
    session_timeout: float = 0.0,
    profile: bool = False,
    on_event: Callable[[str, RemoteDevice, str], None] | None = None,
) -> list[RemoteRow]:
    """Time ``artifacts`` on the devices under ``keys`` at tracker ``rpc``, one job per device at a time, all
    devices in parallel. A device takes only artifacts of its architecture. A job whose device fails is
    recorded with its error; the other jobs go on. Rows come back in the order of ``artifacts``.

    ``on_event(event, device, artifact)`` is called with ``"start"`` before each job (tests use it)."""
    with Tracker(rpc, timeout) as tracker:
        statuses = {s.key: s for s in tracker.summary()}
    missing = [key for key in keys if key not in statuses or statuses[key].total == 0]
    if missing:
        have = ", ".join(f"{k} ({s.total})" for k, s in statuses.items() if s.total) or "none"
        raise DeviceError(f"no device under key '{missing[0]}' at tracker {rpc} (keys there: {have})")
    archs = {}
    for artifact in artifacts:
        module_manifest = read_manifest(artifact)
        library = Path(artifact) / module_manifest["library"]["file"]
        archs[str(artifact)] = (library_arch(library) if library.is_file() else None) or target_arch(
            module_manifest
        )
    pending = [str(a) for a in artifacts]
    rows: dict[str, RemoteRow] = {}
    bugs: list[BaseException] = []  # anything but an EdgediffError is a bug: re-raised after the join
    lock = threading.Lock()

    def take(arch: str | None) -> str | None:
        with lock:
            for artifact in pending:
                if arch is None or archs[artifact] in (None, arch):
                    pending.remove(artifact)
                    return artifact
        return None

    def worker(key: str) -> None:
        with lock:
            if not pending:
                return
        try:
            device = open_device(rpc, key, timeout=timeout, session_timeout=session_timeout)
        except DeviceError as err:
            with lock:
                for artifact in list(pending):
                    rows.setdefault(artifact, RemoteRow(artifact, key=key, error=str(err)))
            return
        try:
            while (artifact := take(device.arch)) is not None:
                if on_event is not None:
                    on_event("start", device, artifact)
                try:
                    rows[artifact] = bench_on_device(
                        device, artifact, number=number, repeat=repeat, profile=profile
                    )
                    rows[artifact].error = None
                except EdgediffError as err:
                    rows[artifact] = RemoteRow(
                        artifact, key=key, device=device.address, arch=device.arch or "?", error=str(err)
                    )
                    if "disconnected" in str(err) or "timeout" in str(err):
                        return  # this device is gone; the others take what is left
        except Exception as err:  # noqa: BLE001 - handed to the caller's thread below
            bugs.append(err)
        finally:
            device.close()

    threads = [
        threading.Thread(target=worker, args=(key,), name=f"bench-{key}-{i}")
        for key in dict.fromkeys(keys)
        for i in range(statuses[key].total)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if bugs:
        raise bugs[0]
    for artifact in pending:  # no device of its architecture took it
        rows.setdefault(
            artifact,
            RemoteRow(
                artifact,
                error=f"no device of architecture {archs[artifact]} under key(s) {', '.join(keys)} "
                "(or every such device failed)",
            ),
        )
    return [rows[str(a)] for a in artifacts]


def format_remote_table(rows: Sequence[RemoteRow]) -> str:
    """The remote results as a Markdown table, in the style of the host bench's."""
    lines = [
        "| model | latent | target | device (key @ server, arch) | edgediff s | runs | library | bytes up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        where = f"{r.key} @ {r.device}, {r.arch}" if r.device else r.key or "-"
        if r.error is not None:
            lines.append(
                f"| {r.model or Path(r.artifact).name} | - | {r.target or '-'} | {where} | error: "
                f"{r.error} | - | - | - |"
            )
            continue
        lines.append(
            f"| {r.model} | {r.latent} | {r.target} | {where} | {r.median:.4g} | {len(r.seconds)} | "
            f"{'cached' if r.library_cached else 'uploaded'} | {r.transfers.total - r.transfers.outputs:,} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- generate


def remote_pipeline(device: RemoteDevice, path: str | Path, *, resident_inputs: bool = True) -> Any:
    """The artifact set at ``path`` as a :class:`~edgediff.runtime.pipeline.Pipeline` whose models run on
    ``device``: the sampler loop stays on the host, each model call goes to the device."""
    from edgediff.runtime.pipeline import ARTIFACT_SET_ROLES, TOKENIZER_DIR, Pipeline
    from edgediff.runtime.tokenizer import CLIPTokenizer

    root = Path(path)
    if not (root / "denoiser").is_dir():
        raise EdgediffError(f"'{root}' is not an artifact set: it needs a denoiser/ artifact")
    modules = {
        role: RemoteModule(device, root / role, resident_inputs=resident_inputs)
        if (root / role).is_dir()
        else None
        for role in ARTIFACT_SET_ROLES
    }
    tokenizer = (
        CLIPTokenizer.from_directory(root / TOKENIZER_DIR) if (root / TOKENIZER_DIR).is_dir() else None
    )
    return Pipeline(modules["denoiser"], modules["decoder"], modules["text_encoder"], tokenizer)


def pipeline_transfers(pipeline: Any) -> Transfers:
    """The bytes every remote model of ``pipeline`` moved, summed."""
    total = Transfers()
    for module in (pipeline.denoiser, pipeline.decoder, pipeline.text_encoder):
        if isinstance(module, RemoteModule):
            for name in ("library", "weights", "inputs", "outputs", "calls"):
                setattr(total, name, getattr(total, name) + getattr(module.transfers, name))
    return total


# --------------------------------------------------------------------------------------------------- CLI


def add_remote_arguments(
    parser: argparse.ArgumentParser, *, keys: bool = False, required: bool = True
) -> None:
    """``--rpc``, ``--key``, ``--timeout``, ``--session-timeout`` (``run``, ``bench`` and ``generate``)."""
    parser.add_argument(
        "--rpc", required=required, help="tracker HOST:PORT (with --key), or one device's RPC server"
    )
    if keys:
        parser.add_argument("--key", action="append", help="device key at the tracker (repeatable)")
    else:
        parser.add_argument("--key", help="device key at the tracker")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"--rpc: seconds to reach the tracker and wait for a free device (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--session-timeout",
        type=float,
        default=0.0,
        help="--rpc: the device ends a session running longer than this many seconds (default: no limit)",
    )


def add_bench_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``bench``'s remote options; ``--runs``, ``--profile`` and ``--markdown`` are the host bench's."""
    parser.add_argument(
        "artifacts", nargs="+" if required else "*", help="--rpc: artifact directories to time on devices"
    )
    add_remote_arguments(parser, keys=True, required=required)
    parser.add_argument("--number", type=int, default=3, help="--rpc: calls averaged per timed run")


def add_generate_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """``generate``'s remote options."""
    add_remote_arguments(parser, required=required)
    parser.add_argument(
        "--resend-inputs",
        action="store_true",
        help="--rpc: send every input at every call (default: inputs that did not change stay on the device)",
    )


def cmd_devices(args: argparse.Namespace) -> int:
    print(format_devices(list_devices(args.tracker, args.timeout), args.tracker))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from edgediff.runtime.run import load_array

    with open_device(
        args.rpc, args.key, timeout=args.timeout, session_timeout=args.session_timeout
    ) as device:
        module = RemoteModule(device, args.artifact)
        inputs = [load_array(path, f"input {i}") for i, path in enumerate(args.inputs)] or example_inputs(
            module
        )
        outputs = module(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        out_dir = Path(args.output)
        out_dir.mkdir(parents=True, exist_ok=True)
        for info, value in zip(module.outputs, outputs, strict=True):
            np.save(out_dir / f"{info.name}.npy", value)
            print(f"wrote {out_dir / info.name}.npy: {value.dtype}{list(value.shape)}")
        t = module.transfers
        print(
            f"{module.name} on {device.name} ({device.arch or 'arch unknown'}): library "
            f"{'already on the device' if module.library_cached else f'uploaded ({t.library:,} bytes)'}, "
            f"weights {t.weights:,} bytes, inputs {t.inputs:,}, outputs {t.outputs:,}"
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if not args.artifacts or not args.key:
        raise DeviceError("bench --rpc needs artifact directories and at least one --key")
    rows = bench_remote(
        args.artifacts,
        args.rpc,
        args.key,
        number=args.number,
        repeat=args.runs,
        timeout=args.timeout,
        session_timeout=args.session_timeout,
        profile=args.profile,
    )
    print(f"time_evaluator on the device: median of {args.runs} means of {args.number} calls")
    table = format_remote_table(rows)
    print(table)
    for row in rows:
        if row.profile is not None:
            print(f"\n{row.model} ({row.target}) on {row.key} @ {row.device}: kernels timed on the device")
            print(row.profile.table(top=25))
            families = ", ".join(f"{k} {1e3 * v:.2f} ms" for k, v in row.profile.by_family().items())
            print(f"  by op family: {families}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 1 if any(r.error for r in rows) else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from edgediff.runtime.image import write_png
    from edgediff.runtime.run import load_array

    conditioning: Any = None
    if args.class_label is not None:
        conditioning = {"class_labels": np.array([args.class_label], dtype=np.int64)}
    elif args.prompt_embeds is not None:
        conditioning = load_array(args.prompt_embeds, "--prompt-embeds")
    negative = None
    if args.negative_prompt_embeds is not None:
        negative = load_array(args.negative_prompt_embeds, "--negative-prompt-embeds")
    with open_device(
        args.rpc, args.key, timeout=args.timeout, session_timeout=args.session_timeout
    ) as device:
        pipeline = remote_pipeline(device, args.artifacts, resident_inputs=not args.resend_inputs)
        if getattr(args, "max_memory", None):
            raise EdgediffError(
                "--max-memory caps this process's memory; with --rpc the models live on the device"
            )
        if getattr(args, "lora", None):
            print(pipeline.set_lora(args.lora, args.lora_scale))  # merged on the host, the tensors go up
        result = pipeline.generate(
            conditioning,
            negative=negative,
            prompt=args.prompt,
            negative_prompt=args.negative_prompt,
            sampler=args.sampler,
            steps=args.steps,
            guidance_scale=args.guidance,
            seed=args.seed,
            height=args.height,
            width=args.width,
        )
        t = pipeline_transfers(pipeline)
    if args.save_latents:
        np.save(args.save_latents, result.latents)
    if result.image is not None:
        write_png(args.output, result.image)
        print(f"wrote {args.output}")
    print(result.timings.summary())
    print(
        f"transfers on {device.name}: {t.calls} model calls, library {t.library:,} B, "
        f"weights {t.weights:,} B, inputs {t.inputs:,} B, outputs {t.outputs:,} B"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    from edgediff.runtime.run import add_generation_arguments

    parser = argparse.ArgumentParser(prog="edgediff-remote", description=__doc__.split("\n\n")[0])
    parser.add_argument("--traceback", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    devices = commands.add_parser("devices", help="keys at a tracker with free/busy device counts")
    devices.add_argument("--tracker", required=True, help="tracker HOST:PORT")
    devices.add_argument("--timeout", type=float, default=10.0, help="seconds to reach the tracker")
    devices.set_defaults(run=cmd_devices)

    run = commands.add_parser("run", help="run one artifact on a device; outputs saved as .npy")
    run.add_argument("artifact", help="artifact directory")
    run.add_argument("inputs", nargs="*", help="one .npy per input (default: seeded random inputs)")
    run.add_argument("-o", "--output", default="outputs", help="folder for <output name>.npy")
    add_remote_arguments(run)
    run.set_defaults(run=cmd_run)

    bench = commands.add_parser("bench", help="time artifacts on devices, in parallel, one table")
    add_bench_arguments(bench)
    bench.add_argument("--runs", type=int, default=3, help="timed runs (the median is reported)")
    bench.add_argument("--profile", action="store_true", help="per-kernel profile measured on the device")
    bench.add_argument("--markdown", help="also write the table to this file")
    bench.set_defaults(run=cmd_bench)

    generate = commands.add_parser("generate", help="sampler loop on the host, model calls on a device")
    generate.add_argument("artifacts", help="artifact set directory (denoiser/, decoder/, ...)")
    add_generation_arguments(generate)
    add_generate_arguments(generate)
    generate.set_defaults(run=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from edgediff.runtime.run import run_command

    return run_command("edgediff", build_parser().parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
