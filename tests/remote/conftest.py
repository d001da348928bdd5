"""A device farm on loopback for the RPC tests: a TVM tracker and three RPC servers registered with it.

- ``x86``: this machine, started the way a Linux board runs it (``python -m tvm.exec.rpc_server --tracker``);
- ``arm64``: TVM's server inside the emulated arm64 root (qemu-user, the aarch64 TVM wheel, no edgediff);
- ``x86-flaky``: a second host server that a test kills mid-run.

Only 127.0.0.1, every wait bounded, every process killed (by its process group) at the end of the session.
Each server's temp folder is the test's, so the device-side library cache starts empty.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HOST = "127.0.0.1"
START_TIMEOUT = 300  # seconds for every server to register (importing TVM under qemu is the slow part)

# TVM's own server loop (tvm.rpc.server), without rpc_server's helper process: qemu-user cannot start a
# second aarch64 process without binfmt registration, and the session processes are forks, which it can.
ARM_SERVER = """
import sys
from tvm.rpc.server import PopenRPCServerState
state = PopenRPCServerState(sys.argv[1], int(sys.argv[2]), int(sys.argv[2]) + 1, False,
                            (sys.argv[1], int(sys.argv[3])), sys.argv[4], None, None, True, True, None)
print("serving on", state.port, flush=True)
state.thread.join()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Farm:
    tracker: str  # HOST:PORT
    folder: Path
    servers: dict[str, subprocess.Popen] = field(default_factory=dict)

    def kill(self, key: str) -> None:
        """Kill a device's server and its session processes (all in the server's process group)."""
        process = self.servers[key]
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)

    def log(self, key: str) -> str:
        return (self.folder / f"{key}.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="session")
def farm(tmp_path_factory: pytest.TempPathFactory):
    from tvm.rpc.tracker import Tracker

    from edgediff.tools.remote import list_devices
    from scripts.arm64_root import ensure_root

    folder = tmp_path_factory.mktemp("farm")
    port = free_port()
    tracker = Tracker(HOST, port=port, port_end=port + 1, silent=True)
    farm = Farm(f"{HOST}:{tracker.port}", folder)
    env = {**os.environ, "TMPDIR": str(folder)}
    try:
        for key in ("x86", "x86-flaky"):
            port = free_port()
            command = [sys.executable, "-m", "tvm.exec.rpc_server", "--host", HOST, "--port", str(port)]
            command += ["--port-end", str(port + 1), "--tracker", farm.tracker, "--key", key, "--silent"]
            farm.servers[key] = subprocess.Popen(
                command,
                env=env,
                start_new_session=True,
                stdout=open(folder / f"{key}.log", "wb"),
                stderr=subprocess.STDOUT,
            )
        root = ensure_root(log=lambda _message: None)
        arm = [ARM_SERVER, HOST, str(free_port()), str(tracker.port), "arm64"]
        farm.servers["arm64"] = subprocess.Popen(
            root.command(["-c", *arm]),
            env={**root.env(), "TMPDIR": str(folder)},
            start_new_session=True,
            stdout=open(folder / "arm64.log", "wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            registered = {s.key for s in list_devices(farm.tracker, timeout=10) if s.total}
            if registered >= set(farm.servers):
                break
            for key, process in farm.servers.items():
                assert process.poll() is None, f"RPC server {key} exited:\n{farm.log(key)}"
            assert time.monotonic() < deadline, f"servers not registered in {START_TIMEOUT} s: {registered}"
            time.sleep(0.5)
        yield farm
    finally:
        for key in list(farm.servers):
            farm.kill(key)
        tracker.terminate()
