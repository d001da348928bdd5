"""Artifacts run, timed and driven over TVM RPC against the loopback farm of conftest.py: a tracker, a host
server and an arm64 server under qemu. The arm-a78 build run remotely equals the host build; every failure
(no key, wrong architecture, other TVM version, timeout, a device going away) is one line naming it."""

from __future__ import annotations

import json
import shutil
import threading
import time

import numpy as np
import pytest

from edgediff.cli import main as cli_main
from edgediff.runtime.artifact import CompiledModule, sha256_file
from edgediff.runtime.pipeline import Pipeline
from edgediff.tools.remote import (
    DeviceError,
    RemoteModule,
    bench_remote,
    example_inputs,
    format_remote_table,
    list_devices,
    open_device,
    pipeline_transfers,
    remote_pipeline,
    time_kernels,
)

pytestmark = pytest.mark.slow
MODEL = "tiny-sd15-unet"


def test_devices_lists_keys_free_and_busy(farm, capsys):
    statuses = {s.key: s for s in list_devices(farm.tracker)}
    assert {key: (s.total, s.free) for key, s in statuses.items()} == {
        "x86": (1, 1),
        "x86-flaky": (1, 1),
        "arm64": (1, 1),
    }
    with open_device(farm.tracker, "x86") as device:
        assert device.arch == "x86_64"
        busy = {s.key: s for s in list_devices(farm.tracker)}["x86"]
        assert (busy.free, busy.busy) == (0, 1)
        assert cli_main(["devices", "--tracker", farm.tracker]) == 0
    table = capsys.readouterr().out
    assert "arm64" in table and "x86-flaky" in table
    assert any(line.split()[:5] == ["x86", "1", "0", "1", "0"] for line in table.splitlines())


def test_arm_a78_build_on_the_arm_device_equals_the_host_build(farm, compiled):
    host = CompiledModule(compiled(MODEL, "host").path)
    inputs = example_inputs(host, seed=3)
    expected = host(*inputs)
    with open_device(farm.tracker, "arm64") as device:
        assert device.arch == "aarch64"
        module = RemoteModule(device, compiled(MODEL, "arm-a78").path)
        got = module(*inputs)
        assert not module.library_cached
        assert module.transfers.library == module._library_path.stat().st_size
        assert module.transfers.weights == module.manifest["weights"]["bytes"]
    err = float(np.abs(got - expected).max())
    assert got.shape == expected.shape
    assert err <= 1e-4 * max(1.0, float(np.abs(expected).max())), err

    # a later session finds the library on the device by its hash: only the weights go up again
    with open_device(farm.tracker, "arm64") as device:
        again = RemoteModule(device, compiled(MODEL, "arm-a78").path)
        assert again.library_cached and again.transfers.library == 0
        np.testing.assert_array_equal(again(*inputs), got)


def test_cli_run_saves_the_host_build_outputs(farm, compiled, tmp_path, capsys):
    artifact = compiled(MODEL, "host").path
    host = CompiledModule(artifact)
    paths = []
    for i, array in enumerate(example_inputs(host, seed=5)):
        paths.append(str(tmp_path / f"in{i}.npy"))
        np.save(paths[-1], array)
    argv = ["run", str(artifact), *paths, "--rpc", farm.tracker, "--key", "x86", "-o", str(tmp_path / "out")]
    assert cli_main(argv) == 0
    (output,) = host.outputs
    got = np.load(tmp_path / "out" / f"{output.name}.npy")
    np.testing.assert_allclose(got, host(*[np.load(p) for p in paths]), rtol=0, atol=1e-6)
    assert "device 'x86'" in capsys.readouterr().out


def one_line_error(argv: list[str], capsys) -> str:
    assert cli_main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_errors_name_the_key_the_architecture_and_the_version(farm, compiled, tmp_path, capsys):
    arm = str(compiled(MODEL, "arm-a78").path)
    common = ["--rpc", farm.tracker, "-o", str(tmp_path / "out")]
    err = one_line_error(["run", arm, *common, "--key", "pixel7"], capsys)
    assert "no device under key 'pixel7'" in err and "arm64 (1)" in err
    err = one_line_error(["run", arm, *common, "--key", "x86"], capsys)
    assert "built for aarch64" in err and "device 'x86'" in err and "x86_64" in err

    # A library whose VM bytecode says another version, as one built by another TVM release does: the
    # device's runtime refuses it, and the error says so.
    other = tmp_path / "other-tvm"
    shutil.copytree(compiled(MODEL, "host").path, other)
    library = other / "model.so"
    data = library.read_bytes()
    marker = b"relax.VMExecutable"
    at = data.index(marker)
    version = data.index(b"0.14", at)  # the VM format version after the executable's header
    assert version - at < 64
    library.write_bytes(data[:version] + b"0.13" + data[version + 4 :])
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["library"]["sha256"] = sha256_file(library)
    (other / "manifest.json").write_text(json.dumps(manifest))
    err = one_line_error(["run", str(other), *common, "--key", "x86"], capsys)
    assert "cannot read this library's VM bytecode" in err and "TVM 0.27" in err


def test_waiting_for_a_busy_device_times_out(farm):
    with open_device(farm.tracker, "x86"):
        with pytest.raises(DeviceError, match=r"timeout: no device under key 'x86'.*became free within 1 s"):
            open_device(farm.tracker, "x86", timeout=1)
    with open_device(farm.tracker, "x86", timeout=30) as device:  # freed again
        assert device.arch == "x86_64"


def test_a_session_past_its_limit_ends_with_a_timeout(farm, compiled):
    device = open_device(farm.tracker, "x86", session_timeout=2)
    # the server ends the session after 2 s and offers the device again: wait for that (bounded)
    for _ in range(240):
        if {s.key: s.free for s in list_devices(farm.tracker)}["x86"] == 1:
            break
        time.sleep(0.5)
    with pytest.raises(
        DeviceError, match=r"^timeout: device 'x86' at .* ended the session .*2 s session limit"
    ):
        RemoteModule(device, compiled(MODEL, "host").path)
    device.close()


def test_parallel_bench_over_the_two_servers_with_device_profiles(farm, compiled):
    artifacts = [compiled(MODEL, "host").path, compiled(MODEL, "arm-a78").path]
    # each job waits at the barrier until the other has started: a serial run breaks it
    barrier = threading.Barrier(2, timeout=120)
    rows = bench_remote(
        artifacts,
        farm.tracker,
        ["x86", "arm64"],
        number=1,
        repeat=2,
        profile=True,
        on_event=lambda *_: barrier.wait(),
    )
    assert [r.error for r in rows] == [None, None]
    assert [(r.target, r.key, r.arch) for r in rows] == [
        ("host", "x86", "x86_64"),
        ("arm-a78", "arm64", "aarch64"),
    ]
    assert all(len(r.seconds) == 2 and all(s > 0 for s in r.seconds) for r in rows)
    table = format_remote_table(rows)
    assert table.count("| tiny-sd15-unet | 16 |") == 2
    for row in rows:  # kernels timed by the instrument the profiler library installed in the device's VM
        kernels = row.profile.calls
        assert row.profile.runs == 1 and row.profile.total > 0
        assert any("conv2d" in name for name in kernels) and any("attention" in name for name in kernels)
        assert not any(name.startswith("vm.builtin.") for name in kernels)


def test_a_device_disconnecting_mid_run_fails_its_job_only(farm, compiled):
    artifacts = [compiled(MODEL, "host").path, compiled(MODEL, "arm-a78").path]

    def pull_the_plug(event, device, artifact):
        if device.key == "x86-flaky":
            farm.kill("x86-flaky")  # the session is open; every call after this finds the device gone

    rows = bench_remote(
        artifacts, farm.tracker, ["x86-flaky", "arm64"], number=1, repeat=1, on_event=pull_the_plug
    )
    flaky, arm = rows
    assert flaky.error is not None and "device 'x86-flaky'" in flaky.error and "disconnected" in flaky.error
    assert len(flaky.error.splitlines()) == 1
    assert arm.error is None and arm.arch == "aarch64" and len(arm.seconds) == 1
    assert "x86-flaky" not in {s.key for s in list_devices(farm.tracker) if s.total}


def test_generate_runs_the_sampler_on_the_host_and_the_model_on_the_device(farm, compiled, tmp_path):
    artifact = compiled(MODEL, "host").path
    artifact_set = tmp_path / "set"  # an artifact set of one denoiser: latents only
    artifact_set.mkdir()
    (artifact_set / "denoiser").symlink_to(artifact)
    local = Pipeline(CompiledModule(artifact))
    embeds = np.random.default_rng(2).standard_normal(local.conditioning[0].shape).astype(np.float32)
    settings = {"sampler": "euler", "steps": 3, "guidance_scale": 1.0, "seed": 1}
    expected = local.generate(embeds, **settings).latents
    sent = {}
    for resident in (False, True):
        with open_device(farm.tracker, "x86") as device:
            pipeline = remote_pipeline(device, artifact_set, resident_inputs=resident)
            assert isinstance(pipeline.denoiser, RemoteModule) and pipeline.decoder is None
            got = pipeline.generate(embeds, **settings).latents
            sent[resident] = pipeline_transfers(pipeline)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert sent[True].calls == sent[False].calls == 3
    # the prompt embeddings go up once instead of at every step
    assert sent[False].inputs - sent[True].inputs == 2 * embeds.nbytes


def test_kernel_timings_from_the_device(farm, tmp_path):
    import tvm
    from tvm import te

    n = 4096
    a = te.placeholder((n,), name="a")
    b = te.compute((n,), lambda i: a[i] * 2.0 + 1.0, name="b")
    library = tmp_path / "kernels.so"
    tvm.compile(
        te.create_prim_func([a, b]).with_attr("global_symbol", "scale_add"), target="llvm"
    ).export_library(str(library))
    with open_device(farm.tracker, "x86") as device:
        timings = time_kernels(device, library, [("scale_add", [((n,), "float32"), ((n,), "float32")])])
        with pytest.raises(DeviceError, match="timing of kernel missing"):
            time_kernels(device, library, [("missing", [((n,), "float32")])])
    assert set(timings) == {"scale_add"} and 0 < timings["scale_add"] < 1
