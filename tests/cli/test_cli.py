"""The edgediff command line: compile, inspect, targets, passes; errors are one line with exit status 1."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgediff", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 1, result.stderr
    # split on newlines only: a progress bar redraws its line with carriage returns
    lines = [line.strip("\r ") for line in result.stderr.split("\n") if line.strip("\r ")]
    assert len(lines) == 1 and lines[0].startswith("edgediff: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_compile_then_inspect(tmp_path):
    out = tmp_path / "vae"
    result = run_cli("compile", "--model", "tiny-vae-decoder", "--target", "host", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert (
        (out / "manifest.json").is_file() and (out / "model.so").is_file() and (out / "weights.bin").is_file()
    )
    inspected = run_cli("inspect", str(out))
    assert inspected.returncode == 0, inspected.stderr
    for fragment in ("tiny-vae-decoder", "host (cpu)", "weights.bin", "fuse-ops", "kernel launches"):
        assert fragment in inspected.stdout
    as_json = run_cli("inspect", "--json", str(out))
    assert '"format_version": 1' in as_json.stdout


def test_progress_bar_on_a_terminal(tmp_path):
    out = tmp_path / "vae"
    command = f"{sys.executable} -m edgediff compile --model tiny-vae-decoder -o {out}"
    # `script` gives the command a pseudo-terminal (progress bars are drawn only on terminals); a fresh pty
    # is 0 columns wide, which tqdm draws as nothing
    result = subprocess.run(
        ["script", "-qec", f"stty cols 120 rows 40; {command}", "/dev/null"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout
    assert "tiny-vae-decoder -> host" in result.stdout and "6/6" in result.stdout


def test_compile_with_disabled_pass(tmp_path):
    out = tmp_path / "vae"
    result = run_cli(
        "compile", "--model", "tiny-vae-decoder", "-o", str(out), "-q", "--disable-pass", "fuse-ops"
    )
    assert result.returncode == 0, result.stderr
    ran = [line.split()[0] for line in result.stdout.split("passes", 1)[1].splitlines() if line.strip()]
    assert "fuse-ops" not in ran and "legalize" in ran


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            ("compile", "--model", "tiny-vae-decoder", "--target", "nope", "-o", "x"),
            ("unknown target 'nope'",),
        ),
        (("compile", "--model", "no-such-model", "-o", "x"), ("no-such-model",)),
        (("inspect", "does-not-exist"), ("does-not-exist", "does not exist")),
        (("targets", "show", "nope"), ("unknown target 'nope'",)),
        (("compile", "--model", "tiny-vae-decoder", "-o", "x", "--disable-pass", "legalize"), ("required",)),
    ],
)
def test_errors_are_one_line(tmp_path, args, fragments):
    assert_one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_corrupted_artifact_is_reported(tmp_path):
    out = tmp_path / "vae"
    assert run_cli("compile", "--model", "tiny-vae-decoder", "-o", str(out), "-q").returncode == 0
    (out / "weights.bin").write_bytes(b"\0" * (out / "weights.bin").stat().st_size)
    assert_one_line_error(run_cli("inspect", str(out)), "sha256")


def test_traceback_flag_shows_the_traceback(tmp_path):
    result = run_cli("--traceback", "inspect", str(tmp_path / "missing"))
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_targets_list_show_validate(tmp_path):
    listed = run_cli("targets", "list")
    assert listed.returncode == 0
    for name in ("host", "arm-a78", "arm-a55", "adreno-740", "ane-like"):
        assert name in listed.stdout
    shown = run_cli("targets", "show", "arm-a78")
    assert shown.returncode == 0 and "aarch64" in shown.stdout
    good = tmp_path / "good.yaml"
    from importlib import resources

    good.write_text(resources.files("edgediff.targets").joinpath("builtin/arm-a55.yaml").read_text())
    assert run_cli("targets", "validate", str(good)).returncode == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("dtypes:", "dtypez:"))
    assert_one_line_error(run_cli("targets", "validate", str(bad)), "bad.yaml", "dtypez")


def test_passes_listing_marks_target_defaults():
    result = run_cli("passes", "--target", "ane-like")
    assert result.returncode == 0
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines["cast-to-fp16"] == "on" and lines["npu-op-coverage"] == "on"
    host = run_cli("passes", "--target", "host")
    host_lines = {line.split()[1]: line.split()[0] for line in host.stdout.splitlines()}
    assert host_lines["cast-to-fp16"] == "off"
