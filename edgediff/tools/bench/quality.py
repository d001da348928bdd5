"""Quality of a low-precision engine as a user sees it: the final latents of a sampling trajectory (20-step
DPM-Solver++ by default) against the float PyTorch model from the same seeded noise, as PSNR."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Denoiser = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (latents, timesteps) -> model output
DEFAULT_SAMPLING = ("dpmpp-2m", 20)


def host_int8() -> Any:
    """The ``host`` spec with int8 added, so that int8 artifacts are built and run here (its int8 throughput,
    300 GFLOP/s, is an assumption, not a measurement)."""
    from edgediff.targets import load_target
    from edgediff.targets.spec import TargetSpec

    data = load_target("host").to_dict()
    # keep what the host detected (e.g. bfloat16, whose peak entry must stay matched by a dtype)
    data.update(name="host-int8", dtypes=[*[d for d in data["dtypes"] if d != "int8"], "int8"])
    data["compute"]["peak_gflops"].setdefault("int8", 300)
    return TargetSpec.from_dict(data)


def trajectory(
    denoise: Denoiser, zm: Any, sampling: tuple[str, int] = DEFAULT_SAMPLING, seed: int = 0
) -> Any:
    """Final latents of a ``sampling`` = (sampler, steps) run from seeded noise with the example conditioning
    (no guidance)."""
    from edgediff.runtime.samplers import get_sampler

    name, steps = sampling
    sampler = get_sampler(name, num_steps=steps, prediction_type=zm.meta.get("prediction_type") or "epsilon")
    start, stop = zm.meta.get("noise_pred_channels") or (0, zm.example_inputs[0].shape[1])
    x_T = np.random.default_rng(seed).standard_normal(tuple(zm.example_inputs[0].shape)).astype(np.float32)

    def step(x: np.ndarray, t: float) -> np.ndarray:
        timestep = np.full((x.shape[0],), t, np.float32)
        return np.asarray(denoise(x, timestep))[:, start:stop]

    return sampler.sample(step, x_T, rng=np.random.default_rng(seed))


def torch_denoiser(zm: Any, fake: Any = None) -> Denoiser:
    """The float PyTorch model as a denoiser (``fake``: a FakeQuant context whose timesteps it sets)."""
    import torch

    def denoise(x: np.ndarray, t: np.ndarray) -> np.ndarray:
        timestep = torch.from_numpy(t)
        if fake is not None:
            fake.timesteps = timestep
        with torch.no_grad():
            return zm.module(torch.from_numpy(x), timestep, *zm.example_inputs[2:]).numpy()

    return denoise


def psnr(got: np.ndarray, want: np.ndarray) -> float:
    """PSNR in dB of ``got`` against ``want``, with ``want``'s value range as the peak."""
    peak = float(want.max() - want.min())
    mse = float(np.mean((got.astype(np.float64) - want) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(peak**2 / mse))
