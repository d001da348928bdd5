"""Per-kernel timing of a Relax VM run (TVM 0.27's VM has no profiler; this uses its instrument hook).

The hook is called before and after every VM call instruction; the time between the two calls of one
kernel is that kernel's wall time (the VM runs calls one after another on the host thread, and parallel
kernels join before returning, so the intervals do not overlap).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

# first match wins: "fused_attention_..." is attention even though it contains matmuls
FAMILIES = ("attention", "geglu", "winograd", "conv2d", "matmul", "group_norm", "layer_norm", "softmax")


@dataclass
class KernelProfile:
    """Seconds and call counts per kernel symbol for one or more runs."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    runs: int = 0

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def table(self, top: int = 25) -> str:
        """The ``top`` kernels by time per run, with their share of the kernel time."""
        total = self.total or 1.0
        runs = max(1, self.runs)
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])[:top]
        width = max([len("kernel")] + [len(name) for name, _ in rows])
        lines = [f"{'kernel':<{width}}  {'ms/run':>9}  {'calls':>5}  {'share':>6}"]
        for name, seconds in rows:
            lines.append(
                f"{name:<{width}}  {1e3 * seconds / runs:9.2f}  {self.calls[name] // runs:5d}  "
                f"{100 * seconds / total:5.1f}%"
            )
        lines.append(f"{'all kernels':<{width}}  {1e3 * self.total / runs:9.2f}")
        return "\n".join(lines)

    def by_family(self) -> dict[str, float]:
        """Seconds per run grouped by op family (attention, geglu, winograd, conv2d, matmul, norms, softmax,
        other); the fused kernels of edgediff's passes are named after what they compute."""
        families: dict[str, float] = defaultdict(float)
        for name, seconds in self.seconds.items():
            family = next((f for f in FAMILIES if f in name), "other")
            families[family] += seconds / max(1, self.runs)
        return dict(sorted(families.items(), key=lambda kv: -kv[1]))


def profile_vm(vm: Any, args: list[Any], runs: int = 1, func: str = "main") -> KernelProfile:
    """Run ``vm[func](*args)`` ``runs`` times with per-kernel timing; the VM's instrument is reset after."""
    import tvm_ffi

    profile = KernelProfile()
    starts: dict[str, float] = {}

    def instrument(_func: Any, symbol: str, before: bool, _ret: Any, *_args: Any) -> int:
        now = time.perf_counter()
        if before:
            starts[symbol] = now
        elif symbol in starts:
            profile.seconds[symbol] += now - starts.pop(symbol)
            profile.calls[symbol] += 1
        return 0  # VMInstrumentReturnKind.NO_OP: run the call normally

    vm.set_instrument(tvm_ffi.convert(instrument))
    try:
        for _ in range(runs):
            vm[func](*args)
            profile.runs += 1
    finally:
        vm.set_instrument(tvm_ffi.convert(lambda *_: 0))
    return profile
