"""Linear attention (passes ``rewrite-linear-attention`` / ``fuse-linear-attention``) against fused softmax.

Two tables:

1. ``attention``: SD1.5's self attention at the 64x64 latent level (8 heads of dim 40 over N = 4096 tokens,
   batch 1, fp32): the fused softmax kernel (``fuse-attention``) against the same layer rewritten with
   each feature map (forced with ``fine_tuned``, i.e. every layer rewritten), timed as the median of
   ``--runs`` calls, engines taking turns call by call. ``error`` is the relative L2 error of the linear
   form against exact softmax on those random inputs (q, k, v ~ N(0, 1), so scores ~ N(0, 1)): an
   indication only; the model table measures it where it matters.
2. ``model``: a UNet compiled twice, with the default pipeline and with
   ``linear_attention={"feature_map": MAP, "max_error": E}``; the pass's per-layer table (N, error,
   estimated saving, decision), the time per UNet call of each, and the relative error of the final latent
   of a ``--steps`` DDIM run from the same noise and conditioning; next to it, the same error when the
   softmax build's outputs are perturbed by ``--noise`` relative Gaussian noise (how much the trajectory
   amplifies any small change).

    python benchmarks/linear_attention.py                              # both tables, tiny-sd15-unet
    python benchmarks/linear_attention.py --tables model --model sd15-unet --latent 64
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention import HEAD_DIM, HEADS, time_interleaved  # noqa: E402

from edgediff.tools.bench import machine_line  # noqa: E402


def _sdpa_module() -> Any:
    import torch

    class SelfAttention(torch.nn.Module):
        def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return SelfAttention().eval()


def bench_attention(tokens: int, maps: list[str], args: argparse.Namespace, workdir: Path) -> None:
    import torch

    import edgediff
    from edgediff.linear_attention import linear_reference, relative_error, softmax_reference

    torch.manual_seed(0)
    inputs = tuple(torch.randn(1, HEADS, tokens, HEAD_DIM) for _ in range(3))
    arrays = [x.numpy() for x in inputs]
    scale = HEAD_DIM**-0.5
    exact = softmax_reference(*arrays, scale)
    model = _sdpa_module()
    calls, errors = {}, {}
    for label in ["softmax", *maps]:
        la = None if label == "softmax" else {"feature_map": label, "fine_tuned": True}
        artifact = edgediff.compile_model(
            model, inputs, output_dir=workdir / f"attn-{tokens}-{label}", progress=False, linear_attention=la
        )
        module = edgediff.load(artifact.path)
        got = module(*inputs)
        reference = exact if la is None else linear_reference(label, *arrays, scale=scale)
        compiled_err = relative_error(got, reference)
        assert compiled_err < 1e-4, f"{label}: compiled differs from its reference by {compiled_err:.1e}"
        errors[label] = relative_error(reference, exact)
        calls[label] = lambda module=module: module(*inputs)
    seconds = time_interleaved(calls, args.runs, args.warmup)
    print(f"\nattention: N = M = {tokens}, {HEADS} heads, head dim {HEAD_DIM}, batch 1, fp32")
    print(f"  {'engine':<10} {'ms':>9} {'vs softmax':>11} {'error':>9}")
    for label, value in seconds.items():
        speedup = seconds["softmax"] / value
        print(f"  {label:<10} {value * 1e3:9.2f} {speedup:10.2f}x {errors[label]:9.2e}")


def bench_model(args: argparse.Namespace, workdir: Path) -> None:
    import time

    import edgediff
    from edgediff import zoo
    from edgediff.linear_attention import format_layer_table, relative_error
    from edgediff.runtime.samplers import get_sampler

    zm = zoo.build(args.model, latent_size=args.latent)
    la = {"feature_map": args.feature_map, "max_error": args.max_error}
    modules, compile_s = {}, {}
    for label, options in (("softmax", None), (args.feature_map, la)):
        start = time.perf_counter()
        artifact = edgediff.compile_model(
            zm, output_dir=workdir / f"model-{label}", progress=False, linear_attention=options
        )
        compile_s[label] = time.perf_counter() - start
        modules[label] = edgediff.load(artifact.path)
        if options is not None:
            report = next(p for p in artifact.manifest["passes"] if p["name"] == "rewrite-linear-attention")
            print(
                f"\nmodel: {args.model} at latent {zm.meta.get('latent_size')}, {report['report']['summary']}"
            )
            print(format_layer_table(report["report"]["layers"]))
    sample, timestep, *conditioning = (x.numpy() for x in zm.example_inputs)
    x_T = np.random.default_rng(0).standard_normal(sample.shape).astype(np.float32)
    finals = {}
    for label, module in modules.items():
        sampler = get_sampler("ddim", num_steps=args.steps)

        def denoise(x: np.ndarray, t: float, module: Any = module) -> np.ndarray:
            return module(x, np.full(timestep.shape, t, dtype=timestep.dtype), *conditioning)

        finals[label] = sampler.sample(denoise, x_T, rng=np.random.default_rng(0))
    # how much the trajectory itself amplifies small changes: the softmax build with every output
    # multiplied by (1 + noise), noise ~ N(0, args.noise^2) per element
    noise_rng = np.random.default_rng(1)

    def noisy(x: np.ndarray, t: float) -> np.ndarray:
        out = modules["softmax"](x, np.full(timestep.shape, t, dtype=timestep.dtype), *conditioning)
        return out * (1 + args.noise * noise_rng.standard_normal(out.shape)).astype(np.float32)

    perturbed = get_sampler("ddim", num_steps=args.steps).sample(noisy, x_T, rng=np.random.default_rng(0))
    # per-call times with the engines taking turns, so the machine's load hits both alike
    inputs = (sample, timestep, *conditioning)
    calls = {label: (lambda module=module: module(*inputs)) for label, module in modules.items()}
    call_s = time_interleaved(calls, args.runs, args.warmup)
    err = relative_error(finals[args.feature_map], finals["softmax"])
    print(
        f"  {args.steps}-step DDIM, final latent: relative L2 error {err:.2e} "
        f"(max |diff| {np.abs(finals[args.feature_map] - finals['softmax']).max():.2e})"
    )
    print(
        f"  reference: softmax with {args.noise:g} relative noise on every output: relative L2 error "
        f"{relative_error(perturbed, finals['softmax']):.2e}"
    )
    for label in modules:
        print(f"  {label:<10} {call_s[label] * 1e3:9.1f} ms per UNet call, compile {compile_s[label]:.0f} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tables", nargs="+", default=["attention", "model"], choices=["attention", "model"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096])
    parser.add_argument("--maps", nargs="+", default=["relu", "elu+1", "taylor2", "favor+"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--model", default="tiny-sd15-unet")
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--feature-map", default="taylor2")
    parser.add_argument("--max-error", type=float, default=0.05)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--noise", type=float, default=1e-3, help="model table: the perturbation reference")
    args = parser.parse_args(argv)
    import torch

    threads = int(os.environ.get("TVM_NUM_THREADS", os.cpu_count() or 1))
    torch.set_num_threads(threads)
    print(machine_line(threads))
    with tempfile.TemporaryDirectory() as tmp:
        if "attention" in args.tables:
            for tokens in args.tokens:
                bench_attention(tokens, args.maps, args, Path(tmp))
        if "model" in args.tables:
            bench_model(args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
