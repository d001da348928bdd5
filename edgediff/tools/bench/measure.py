"""How the benchmarks measure: call time (median wall or least CPU time), peak memory, the machine."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def reset_peak_rss() -> None:
    """Start a new peak for :func:`peak_rss_mb` (Linux)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then covers the whole process so far


def peak_rss_mb() -> float:
    """The process's peak resident memory in MB (since the last :func:`reset_peak_rss`)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(call: Callable[[], Any], runs: int, warmup: int, cpu_time: bool = False) -> float:
    """Median wall seconds of ``runs`` calls after ``warmup`` untimed calls; with ``cpu_time`` the least
    process CPU time of the calls instead (on one thread: the cost on a quiet core, even on a busy
    machine)."""
    for _ in range(warmup):
        call()
    clock = time.process_time if cpu_time else time.perf_counter
    times = []
    for _ in range(runs):
        start = clock()
        call()
        times.append(clock() - start)
    return min(times) if cpu_time else statistics.median(times)


def machine_line(threads: int) -> str:
    """Where the numbers come from."""
    from edgediff.targets import load_target

    spec = load_target("host")
    mattr = " ".join(spec.tvm_target.get("mattr") or [])  # features the flags add to LLVM's CPU name
    return (
        f"{platform.machine()}, {spec.compute.cores} cores ({threads} threads used), "
        f"{spec.compute.vector_bits}-bit vectors, LLVM mcpu {spec.tvm_target.get('mcpu', 'generic')}"
        + (f" {mattr}" if mattr else "")
        + f"; dtypes {', '.join(spec.dtypes)}"
    )


def time_alternating(
    calls: dict[str, Callable[[], Any]], runs: int, warmup: int, cpu_time: bool = False
) -> dict[str, list[float]]:
    """Seconds of each of ``calls`` over ``runs`` rounds in which every engine makes one call in turn, after
    ``warmup`` untimed rounds: a shared machine's drift then hits every engine alike. With ``cpu_time``
    the process CPU time of each call (one thread: the cost on a quiet core)."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    clock = time.process_time if cpu_time else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(runs):
        for name, call in calls.items():
            start = clock()
            call()
            times[name].append(clock() - start)
    return times


def median_alternating(calls: dict[str, Callable[[], Any]], runs: int, warmup: int) -> dict[str, float]:
    """Median wall seconds per call of each of ``calls``, timed in turns (see :func:`time_alternating`)."""
    return {name: statistics.median(t) for name, t in time_alternating(calls, runs, warmup).items()}
