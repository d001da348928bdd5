"""Which dtypes a CPU computes in, read from its feature flags.

:func:`detect_dtypes` is a pure function of a flag set (``/proc/cpuinfo`` spelling or LLVM's), so it is
tested with made-up flag sets; :mod:`edgediff.targets.spec` feeds it this machine's flags when a spec says
``dtypes: auto`` (the built-in ``host``). What counts as "has it" is what makes the format *faster*, not
merely possible: LLVM can run int8 and fp16 anywhere through widening, which is slower than fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

# Each capability: the flags that grant it, in /proc/cpuinfo spelling and in LLVM's (the fallback reader).
INT8_DOT_FLAGS: dict[str, tuple[str, ...]] = {
    "x86_64": ("avx512_vnni", "avx512vnni", "avx_vnni", "avxvnni"),
    "aarch64": ("asimddp", "dotprod"),
}
BF16_FLAGS: dict[str, tuple[str, ...]] = {"x86_64": ("avx512_bf16", "avx512bf16")}
FP16_COMPUTE_FLAGS: dict[str, tuple[str, ...]] = {
    "x86_64": ("avx512_fp16", "avx512fp16"),
    "aarch64": ("asimdhp", "fullfp16", "fphp"),
}
# The /proc/cpuinfo flags of those capabilities and the LLVM feature that makes LLVM emit their instructions.
LLVM_FEATURES: dict[str, dict[str, str]] = {
    "x86_64": {
        "avx512_vnni": "avx512vnni",
        "avx_vnni": "avxvnni",
        "avx512_bf16": "avx512bf16",
        "avx512_fp16": "avx512fp16",
    },
    "aarch64": {"asimddp": "dotprod", "asimdhp": "fullfp16"},
}
# Peak throughput of each dtype relative to float32 on one vector unit, for `peak_gflops: auto` entries:
# VNNI/sdot do 4 int8 MACs per 32-bit lane per instruction, vdpbf16ps and fp16 FMA 2 per lane; float16
# without fp16 arithmetic is converted to fp32 and back around every op (about half fp32's speed).
PEAK_RATIO: dict[str, float] = {"int8": 4.0, "bfloat16": 2.0, "float16": 2.0}
FP16_CONVERTED_RATIO = 0.5


@dataclass(frozen=True)
class Detected:
    """What :func:`detect_dtypes` found: the dtypes, the flag behind each capability, and what is missing."""

    arch: str
    dtypes: tuple[str, ...]
    int8_dot: str | None  # the flag that grants it, or None
    bf16: str | None
    fp16_compute: str | None

    @property
    def features(self) -> dict[str, bool]:
        """The spec ``features`` entries recording the detection (passes and kernels may consult them)."""
        return {
            "int8_dot": self.int8_dot is not None,
            "bf16_dot": self.bf16 is not None,
            "fp16_compute": self.fp16_compute is not None,
        }

    def peak_ratio(self, dtype: str) -> float:
        """Peak of ``dtype`` relative to float32 on this CPU (for ``peak_gflops: auto``)."""
        if dtype == "float32":
            return 1.0
        if dtype == "float16" and self.fp16_compute is None:
            return FP16_CONVERTED_RATIO
        return PEAK_RATIO.get(dtype, 1.0)

    def summary(self) -> str:
        """One line for reports and ``edgediff targets show``: what was found and why each dtype is in/out."""

        def part(name: str, flag: str | None, wanted: dict[str, tuple[str, ...]], absent: str) -> str:
            if flag is not None:
                return f"{name} ({flag})"
            needs = "/".join(wanted.get(self.arch, ())[::2])
            why = f"no {needs}" if needs else f"not detected on {self.arch}"
            return f"no {name} ({why}{absent})"

        parts = [
            part("int8", self.int8_dot, INT8_DOT_FLAGS, ""),
            part("bfloat16", self.bf16, BF16_FLAGS, ""),
            part("fp16 compute", self.fp16_compute, FP16_COMPUTE_FLAGS, "; float16 runs via fp32 conversion"),
        ]
        return f"{self.arch}: " + ", ".join(parts)


def _first(flags: set[str], wanted: Iterable[str]) -> str | None:
    return next((flag for flag in wanted if flag in flags), None)


def detect_dtypes(flags: Iterable[str], arch: str) -> Detected:
    """The dtypes a CPU of ``arch`` (``x86_64``/``aarch64``) with feature ``flags`` computes in.

    Always float32 and float16 (float16 storage with fp32 arithmetic works on every CPU LLVM targets; the
    ``fp16_compute`` feature says whether it is also native arithmetic); int8 with an int8 dot-product
    instruction (AVX512-VNNI / AVX-VNNI, Arm dotprod); bfloat16 with AVX512-BF16.
    """
    flags = {str(f).lower().lstrip("+") for f in flags}
    int8 = _first(flags, INT8_DOT_FLAGS.get(arch, ()))
    bf16 = _first(flags, BF16_FLAGS.get(arch, ()))
    fp16 = _first(flags, FP16_COMPUTE_FLAGS.get(arch, ()))
    dtypes = ["float32", "float16"]
    if int8 is not None:
        dtypes.append("int8")
    if bf16 is not None:
        dtypes.append("bfloat16")
    return Detected(arch=arch, dtypes=tuple(dtypes), int8_dot=int8, bf16=bf16, fp16_compute=fp16)


def missing_llvm_features(flags: Iterable[str], arch: str, cpu_has: Callable[[str], bool]) -> list[str]:
    """``+feature`` entries for an LLVM ``mattr``: the dot-product / half-precision capabilities the CPU
    reports in ``flags`` that LLVM's CPU name lacks (``cpu_has(feature)``). A virtual machine may report an
    older CPU model than the flags it passes through (LLVM named this Xeon ``rocketlake``, which has no
    AVX512-BF16, while the flags list ``avx512_bf16``); without the entry the kernels never use it."""
    flags = {str(f).lower() for f in flags}
    wanted = LLVM_FEATURES.get(arch, {})
    return [f"+{feature}" for flag, feature in wanted.items() if flag in flags and not cpu_has(feature)]
