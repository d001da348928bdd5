"""Bytes between host and device for one generation over TVM RPC, three ways.

1. host loop, every input sent at every model call (``edgediff generate --rpc ... --resend-inputs``);
2. host loop, inputs that did not change stay on the device (the default of ``generate --rpc``);
3. the whole loop on the device through the bundle's ``run.py``: the bundle goes over once, then only the
   conditioning up and the PNG down per image. This route is not driven over RPC (TVM's RPC runs compiled
   functions, not Python), so its bytes are the bundle's size plus those files, not a measured session.

Routes 1 and 2 are measured: payload bytes of every upload/download of a real session with a loopback TVM
RPC server (``python -m tvm.exec.rpc_server``; the counts do not depend on the device's architecture). The
library goes up once per device (cached by hash), the weights once per session.

    .venv/bin/python benchmarks/rpc_transfers.py SET_DIR --steps 20 --images 4
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", help="artifact set (denoiser/ + decoder/), compiled for this machine")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=4, help="images generated in one session")
    parser.add_argument("--guidance", type=float, default=7.5)
    args = parser.parse_args(argv)

    from tvm.rpc.tracker import Tracker

    from edgediff.tools.bundle import make_bundle
    from edgediff.tools.remote import list_devices, open_device, pipeline_transfers, remote_pipeline

    with tempfile.TemporaryDirectory(prefix="edgediff-rpc-") as tmp:
        port = _free_port()
        tracker = Tracker("127.0.0.1", port=port, port_end=port + 1, silent=True)
        server_port = _free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port)]
            + ["--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{tracker.port}", "--key", "dev"]
            + ["--silent"],
            env={**os.environ, "TMPDIR": tmp},
            start_new_session=True,
        )
        address = f"127.0.0.1:{tracker.port}"
        try:
            deadline = time.monotonic() + 300
            while not any(s.key == "dev" and s.total for s in list_devices(address, timeout=10)):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the RPC server did not register with the tracker")
                time.sleep(0.5)
            rows = []
            for resident in (False, True):
                with open_device(address, "dev") as device:
                    pipeline = remote_pipeline(device, args.artifacts, resident_inputs=resident)
                    shape = pipeline.conditioning[0].shape
                    rng = np.random.default_rng(0)
                    cond = rng.standard_normal((1, *shape[1:])).astype(np.float32)
                    negative = np.zeros_like(cond)
                    for seed in range(args.images):
                        pipeline.generate(
                            cond, negative=negative, steps=args.steps, guidance_scale=args.guidance, seed=seed
                        )
                    rows.append((resident, pipeline_transfers(pipeline)))
                    image_bytes = (
                        int(np.prod(pipeline.decoder.outputs[0].shape[1:])) if pipeline.decoder else 0
                    )
            bundle = make_bundle([args.artifacts], Path(tmp) / "set.tar")
            bundle_bytes = bundle.stat().st_size
        finally:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            tracker.terminate()

    print(f"{args.images} images x {args.steps} steps, guidance {args.guidance}, set {args.artifacts}")
    print(
        "| route | library (once per device) | weights (once per session) | up per image | down per image |"
    )
    print("|---|---|---|---|---|")
    for resident, t in rows:
        name = (
            "host loop, unchanged inputs kept on the device" if resident else "host loop, every input resent"
        )
        up, down = t.inputs // args.images, t.outputs // args.images
        print(f"| {name} | {t.library:,} | {t.weights:,} | {up:,} | {down:,} |")
    print(
        f"| whole loop on the device (bundle's run.py; computed) | {bundle_bytes:,} (the bundle) | - | "
        f"{2 * cond.nbytes:,} | {image_bytes:,} (8-bit pixels; the PNG is smaller) |"
    )
    print("(the library row differs between the two host-loop runs only because the second found it cached)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
