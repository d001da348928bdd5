"""`edgediff bench` runs end to end on a tiny model and prints its table (no speed assertions here)."""

from __future__ import annotations

import re
import subprocess
import sys


def test_bench_prints_the_table_with_ratios_and_error():
    result = subprocess.run(
        [sys.executable, "-m", "edgediff", "bench", "--models", "tiny-dit", "--runs", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| tiny-dit |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    eager, ort, edgediff_s, vs_ort, vs_eager = (float(c) for c in cells[2:7])
    assert min(eager, ort, edgediff_s) > 0
    assert abs(vs_ort - edgediff_s / ort) <= 0.01 * vs_ort + 0.01
    assert abs(vs_eager - edgediff_s / eager) <= 0.01 * vs_eager + 0.01
    error = re.search(r"max \|err\| vs eager ([0-9.e+-]+)", result.stdout)
    assert error and float(error.group(1)) < 1e-4
