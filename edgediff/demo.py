"""``make demo``: compile the built-in tiny UNet and VAE decoder, check them against PyTorch, report.

Run as ``python -m edgediff.demo --output demo-out``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np

DEMO_MODELS = {"denoiser": "tiny-sd15-unet", "decoder": "tiny-vae-decoder"}
CROSS_TARGET = "arm-a78"


def _compare_with_torch(name: str, artifact_path: Path) -> tuple[float, float, float]:
    """Run the compiled host module and eager PyTorch on the same inputs: (max abs error, ms, torch ms)."""
    import torch

    from edgediff import load, zoo

    model = zoo.build(name)
    module = load(artifact_path)
    with torch.no_grad():
        model.module(*model.example_inputs)  # warm-up
        start = time.perf_counter()
        expected = model.module(*model.example_inputs).numpy()
        torch_ms = 1e3 * (time.perf_counter() - start)
    module(*model.example_inputs)  # warm-up
    start = time.perf_counter()
    got = module(*model.example_inputs)
    ms = 1e3 * (time.perf_counter() - start)
    return float(np.abs(got - expected).max()), ms, torch_ms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo-out", help="directory for the artifacts and the report")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from edgediff import compile_model

    out = Path(args.output)
    lines = ["edgediff demo report", "===================="]
    for role, name in DEMO_MODELS.items():
        host = compile_model(name, target="host", output_dir=out / "host" / role)
        cross = compile_model(name, target=CROSS_TARGET, output_dir=out / CROSS_TARGET / role)
        err, ms, torch_ms = _compare_with_torch(name, host.path)
        lines += [
            "",
            f"{role}: {name}",
            f"  host build      {host.path}  ({host.manifest['compile_seconds']:.1f} s to compile)",
            f"  max abs error   {err:.2e} vs PyTorch eager (same weights, same inputs)",
            f"  one call        {ms:.2f} ms compiled (untuned), {torch_ms:.2f} ms PyTorch eager",
            f"  {CROSS_TARGET} build  {cross.path} [{cross.manifest['library']['format']}, "
            f"{cross.manifest['library'].get('compiler') or 'no cross compiler'}]",
        ]
        if err > 1e-4:
            lines.append(f"  FAILED: error {err:.2e} above 1e-4")
        lines += ["", host.describe()]
    report = "\n".join(lines) + "\n"
    (out / "report.txt").write_text(report)
    print(report)
    print(f"report written to {out / 'report.txt'}")
    return 1 if "FAILED" in report else 0


if __name__ == "__main__":
    sys.exit(main())
