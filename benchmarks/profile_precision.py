"""Per-kernel profile of one sd15-unet call at a precision: where a low-precision build's time goes.

Compiles the zoo's sd15-unet (random weights) at ``--latent`` for this host with int8 added (the bench's
``host_int8``) at ``--precision`` (``fp32`` for none), then profiles one call with
``edgediff.backend.profile.profile_vm`` on one thread: the top kernels and the time per op family.

    PYTHONPATH=. .venv/bin/python benchmarks/profile_precision.py --precision int8 --pin '*.sdpa=a8'
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="int8", help="fp32, w8, int8, w4, bf16, ...")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--pin", action="append", default=[], metavar="LAYER=FORMAT", help="as in compile")
    args = parser.parse_args()
    os.environ["TVM_NUM_THREADS"] = "1"

    import torch

    import edgediff
    from edgediff import zoo
    from edgediff.precision import PrecisionConfig
    from edgediff.tools.bench.models import print_profile
    from edgediff.tools.bench.quality import host_int8

    torch.set_num_threads(1)
    zm = zoo.build("sd15-unet", latent_size=args.latent)
    pins = dict(pin.split("=", 1) for pin in args.pin)
    precision = None if args.precision == "fp32" else PrecisionConfig(mode=args.precision, pins=pins)
    with tempfile.TemporaryDirectory() as tmp:
        artifact = edgediff.compile_model(
            zm, target=host_int8(), precision=precision, output_dir=tmp, progress=False
        )
        print_profile(artifact.load(), tuple(zm.example_inputs), top=args.top)


if __name__ == "__main__":
    main()
