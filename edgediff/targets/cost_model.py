"""A roofline cost model over a :class:`TargetSpec`.

Passes use it to make target-aware decisions without running anything: whether an op is compute- or
memory-bound, whether a tile fits a memory level, how many lanes a vector holds. A roofline is coarse,
but it only has to rank alternatives on the same target, and it needs nothing beyond the spec's figures.

When the spec has a ``measured`` block (``edgediff calibrate-target``), the compute side of a precision
format's estimate uses the throughput its kernels were measured at instead of the dtype's peak: peaks say
what the hardware could do, the measurement what edgediff's kernels do (int8 kernels without a dot-product
schedule can be slower than fp32 although int8's peak is 4x).
"""

from __future__ import annotations

import platform
from typing import Literal

from edgediff.errors import TargetSpecError
from edgediff.targets.schema import DTYPE_BITS
from edgediff.targets.spec import TargetSpec

MemoryLevel = Literal["sram", "l1", "l2"]


class CostModel:
    """Roofline estimates for one target: time = max(compute time at peak, DRAM traffic time)."""

    def __init__(self, spec: TargetSpec) -> None:
        self.spec = spec

    def peak_flops(self, dtype: str = "float32") -> float:
        """Peak throughput in FLOP/s (OP/s for integer dtypes); raises if the target lacks ``dtype``."""
        gflops = self.spec.compute.peak_gflops.get(dtype)
        if gflops is None:
            raise TargetSpecError(
                f"target {self.spec.name!r} does not support dtype {dtype!r}; "
                f"it supports {', '.join(self.spec.dtypes)}"
            )
        return gflops * 1e9

    @property
    def dram_bytes_per_second(self) -> float:
        """Peak DRAM bandwidth in bytes/s (the spec gives GB/s, decimal)."""
        return self.spec.memory.dram_bandwidth_gbps * 1e9

    def measured_flops(self, fmt: str | None) -> float | None:
        """Measured throughput (FLOP/s) of precision format ``fmt``'s kernels, or None if not measured."""
        measured = self.spec.measured
        if fmt is None or measured is None or fmt not in measured.gflops:
            return None
        return measured.gflops[fmt] * 1e9

    def figure_source(self, fmt: str) -> str:
        """``"measured"`` when format ``fmt``'s estimates use a measured throughput, else ``"spec"``."""
        return "measured" if self.measured_flops(fmt) is not None else "spec"

    def sources_note(self, formats: list[str] | tuple[str, ...]) -> str:
        """One line saying which formats' latency figures are measured (where, when) and which are spec."""
        measured = [f for f in formats if self.figure_source(f) == "measured"]
        spec = [f for f in formats if f not in measured]
        parts = []
        if measured:
            m = self.spec.measured
            assert m is not None
            parts.append(f"measured for {', '.join(measured)} ({m.cpu}, {m.threads} threads, {m.date})")
        if spec:
            parts.append(f"spec peak_gflops roofline for {', '.join(spec)} (not measured)")
        return f"latency figures on target '{self.spec.name}': " + "; ".join(parts)

    def estimate_seconds(
        self, flops: float, dram_bytes: float, dtype: str = "float32", fmt: str | None = None
    ) -> float:
        """Lower-bound run time of work doing ``flops`` operations and moving ``dram_bytes`` through DRAM.

        Compute and memory traffic are assumed to overlap perfectly, so the slower of the two dominates.
        The compute side runs at precision format ``fmt``'s measured throughput when the spec has one,
        else at ``dtype``'s peak.
        """
        if flops < 0 or dram_bytes < 0:
            raise ValueError(f"flops and dram_bytes must be non-negative, got {flops} and {dram_bytes}")
        rate = self.measured_flops(fmt) or self.peak_flops(dtype)
        return max(flops / rate, dram_bytes / self.dram_bytes_per_second)

    def arithmetic_intensity_ridge(self, dtype: str = "float32") -> float:
        """FLOP per DRAM byte above which work is compute-bound here: the roofline's ridge point."""
        return self.peak_flops(dtype) / self.dram_bytes_per_second

    def fits(self, nbytes: int, level: MemoryLevel) -> bool:
        """Whether ``nbytes`` fit in one memory level; a level the target lacks (size 0) holds nothing."""
        capacities = {
            "sram": self.spec.memory.sram_bytes,
            "l1": self.spec.memory.l1_bytes,
            "l2": self.spec.memory.l2_bytes,
        }
        if level not in capacities:
            raise ValueError(f"unknown memory level {level!r}; expected one of {', '.join(capacities)}")
        capacity = capacities[level]
        return capacity > 0 and 0 <= nbytes <= capacity

    def vector_lanes(self, dtype: str = "float32") -> int:
        """Elements of ``dtype`` per SIMD register (vector_bits / dtype bits), e.g. 4 float32 in 128 bits."""
        if dtype not in DTYPE_BITS:
            raise TargetSpecError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPE_BITS)}")
        return max(1, self.spec.compute.vector_bits // DTYPE_BITS[dtype])

    # --- CPU kernel tiling (used by the schedule rules in edgediff/schedules/) -------------------

    def vector_registers(self) -> int:
        """SIMD registers the ISA names: 32 on aarch64 (NEON/SVE) and AVX-512, 16 on AVX2/SSE and others.

        Register tiles of GEMM/convolution kernels are sized to about half of these, so accumulators stay in
        registers while the other half holds the operands being broadcast or loaded.
        """
        target = self.spec.tvm_target
        triple = target.get("mtriple", "") if isinstance(target, dict) else ""
        arch = (triple.split("-")[0] if triple else platform.machine()).lower()
        if arch in ("aarch64", "arm64") or self.spec.compute.vector_bits >= 512:
            return 32
        return 16

    def accumulator_vectors(self) -> int:
        """Vector registers a register-tiled kernel may keep as accumulators (half the register file)."""
        return self.vector_registers() // 2

    def cache_block(self, bytes_per_unit: int, level: MemoryLevel = "l1", share: float = 0.5) -> int:
        """How many units of ``bytes_per_unit`` fit in ``share`` of one cache level (at least 1).

        Reduction loops are split so that one chunk's working set stays in L1 while the rest of the
        tile is streamed; the other half of the cache is left to the output tile and to prefetching.
        """
        capacities = {"sram": self.spec.memory.sram_bytes, "l1": self.spec.memory.l1_bytes}
        capacities["l2"] = self.spec.memory.l2_bytes
        capacity = capacities[level] or self.spec.memory.l1_bytes or 32768
        return max(1, int(capacity * share) // max(1, bytes_per_unit))

    def parallel_threshold(self, dtype: str = "float32") -> int:
        """Elements a kernel must produce before splitting it over the cores pays for the thread wake-up.

        A fork/join in TVM's thread pool costs a few microseconds; below about one L1-full of output per
        core the kernel is done sooner on one core.
        """
        per_core = max(1, self.spec.memory.l1_bytes * 8 // DTYPE_BITS.get(dtype, 32))
        return per_core * max(1, self.spec.compute.cores) if self.spec.compute.cores > 1 else 1 << 62
