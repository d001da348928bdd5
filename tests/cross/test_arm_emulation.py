"""The arm-a78 builds run on an emulated aarch64 Linux (qemu-user + a Debian arm64 root, no torch there) and
match PyTorch on the host; the device bundle's run.py runs the sampler loop there and matches the host.

QEMU is slow to start Python + TVM (~10 s a launch once byte code is cached), so the checks are batched
into few emulator launches. The root is built by `make device-tools` (scripts/arm64_root.py).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from edgediff.runtime.pipeline import Pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
MODELS = ("tiny-sd15-unet", "tiny-dit", "tiny-vae-decoder")
EMULATOR_TIMEOUT = 900

# Runs in the emulator: load each artifact with the runtime, run it on the saved inputs, save the outputs.
RUN_JOBS = """
import json, platform, sys
import numpy as np
from edgediff.runtime.artifact import load

for job in json.load(open(sys.argv[1])):
    module = load(job["artifact"])
    np.save(job["output"], module(*[np.load(path) for path in job["inputs"]]))
foreign = sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)
print(json.dumps({"machine": platform.machine(), "foreign": foreign}))
"""


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"emulator run failed:\n{result.stdout}\n{result.stderr}"


def test_arm_a78_builds_match_torch_under_emulation(arm64, compiled, zoo_model, tmp_path):
    jobs, expected = [], {}
    for name in MODELS:
        artifact = compiled(name, "arm-a78")
        zm = zoo_model(name)
        inputs = []
        for i, tensor in enumerate(zm.example_inputs):
            inputs.append(str(tmp_path / f"{name}-in{i}.npy"))
            np.save(inputs[-1], tensor.numpy())
        with torch.no_grad():
            expected[name] = zm.module(*zm.example_inputs).numpy()
        jobs.append(
            {"artifact": str(artifact.path), "inputs": inputs, "output": str(tmp_path / f"{name}.npy")}
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))

    # the repo's runtime on PYTHONPATH: edgediff.runtime imports nothing of the compiler
    result = arm64.run(
        ["-c", RUN_JOBS, str(tmp_path / "jobs.json")], pythonpath=[REPO], timeout=EMULATOR_TIMEOUT
    )
    _check(result)
    assert json.loads(result.stdout.splitlines()[-1]) == {"machine": "aarch64", "foreign": []}
    for name in MODELS:
        got = np.load(tmp_path / f"{name}.npy")
        err = float(np.abs(got - expected[name]).max())
        scale = float(np.abs(expected[name]).max())
        print(f"{name} arm-a78 under qemu: max abs error {err:.2e} (output max {scale:.2e})")
        assert got.shape == expected[name].shape
        assert err <= 1e-4 * max(1.0, scale)


def read_png(path: Path) -> np.ndarray:
    """Decode the 8-bit RGB PNGs the runtime writes (one IDAT stream, filter type 0 on every row)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,), kind = struct.unpack(">I", data[pos : pos + 4]), data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert (depth, color) == (8, 2)
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(height, 1 + 3 * width)
    assert not rows[:, 0].any()
    return rows[:, 1:].reshape(height, width, 3)


def test_device_bundle_generates_the_host_latents_under_emulation(arm64, pipeline_set, tmp_path):
    bundle = tmp_path / "tiny-sd.tar"
    packed = subprocess.run(
        [sys.executable, "-m", "edgediff", "bundle", str(pipeline_set("arm-a78")), "-o", str(bundle)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert packed.returncode == 0, packed.stderr
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp_path / "device", filter="data")
    device = tmp_path / "device" / "tiny-sd"

    rng = np.random.default_rng(1)
    cond = rng.standard_normal((1, 8, 32)).astype(np.float32)
    uncond = rng.standard_normal((1, 8, 32)).astype(np.float32) * 0.1
    init = rng.standard_normal((1, 4, 16, 16)).astype(np.float32)
    for name, array in (("pe", cond), ("ne", uncond), ("init", init)):
        np.save(device / f"{name}.npy", array)
    settings = {"sampler": "dpmpp-2m", "steps": 3, "guidance": 5.0}
    flags = [f"--{key}={value}" for key, value in settings.items()]
    generate = ["run.py", "generate", "tiny-sd", "--prompt-embeds=pe.npy", "--negative-prompt-embeds=ne.npy"]
    generate += [*flags, "--latents=init.npy", "--save-latents=latents.npy", "-o", "out.png"]
    # only the bundle and the root's numpy + TVM: nothing of the repo is on the device's path
    result = arm64.run(generate, cwd=device, timeout=EMULATOR_TIMEOUT)
    _check(result)
    assert "wrote out.png" in result.stdout and "denoiser" in result.stdout
    # run.py run: one artifact on .npy inputs (the decoder on the final latents)
    decoded = arm64.run(
        ["run.py", "run", "tiny-sd/decoder", "latents.npy", "-o", "decoded"],
        cwd=device,
        timeout=EMULATOR_TIMEOUT,
    )
    _check(decoded)

    host_pipeline = Pipeline.from_directory(pipeline_set("host"))
    host = host_pipeline.generate(
        cond,
        negative=uncond,
        latents=init,
        sampler=settings["sampler"],
        steps=settings["steps"],
        guidance_scale=settings["guidance"],
    )
    latents = np.load(device / "latents.npy")
    rel = float(np.linalg.norm(latents - host.latents) / np.linalg.norm(host.latents))
    pixels = np.abs(read_png(device / "out.png").astype(int) - host.image.astype(int)).max()
    print(f"bundle on emulated aarch64 vs host runtime: latent rel err {rel:.2e}, max pixel diff {pixels}")
    assert rel < 1e-4
    assert pixels <= 1  # 8-bit rounding at .5 may differ by one level
    (output,) = host_pipeline.decoder.outputs
    image, expected = np.load(device / "decoded" / f"{output.name}.npy"), host_pipeline.decoder(latents)
    assert image.shape == expected.shape
    assert float(np.abs(image - expected).max()) <= 1e-4 * max(1.0, float(np.abs(expected).max()))
