"""Latent Consistency Model multistep sampling (Luo et al. 2023), equal to diffusers' ``LCMScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import (
    STANDARD_BETA_SCHEDULES,
    THRESHOLDING_FIXED,
    THRESHOLDING_IGNORED,
    Sampler,
    SamplerError,
    f32,
    register,
    train_options,
)


@register
class LCMSampler(Sampler):
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1; LCM: Luo et al. 2023, Alg. 3).

    Each step evaluates the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with the boundary
    scalings c_skip = s_d^2 / ((10 t)^2 + s_d^2), c_out = 10 t / sqrt((10 t)^2 + s_d^2), s_d = 0.5, and
    re-noises the result to the next timestep: x_next = sqrt(a_next) f + sqrt(1 - a_next) z. The last step
    returns f itself. Timesteps are an evenly skipped subset of the ``original_inference_steps`` distillation
    grid.
    """

    name = "lcm"
    diffusers_class = "LCMScheduler"
    defaults: dict[str, Any] = {
        **train_options(0.00085, 0.012, "scaled_linear"),
        "original_inference_steps": 50,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,  # accepted; without negative timesteps it has no effect (see _build)
        "steps_offset": 0,  # accepted; unused by diffusers' LCMScheduler.set_timesteps
        "timestep_spacing": "leading",  # accepted; unused likewise
        "timestep_scaling": 10.0,
        **THRESHOLDING_IGNORED,
    }
    fixed = dict(THRESHOLDING_FIXED)
    choices = {"beta_schedule": STANDARD_BETA_SCHEDULES}
    needs_noise = True

    def _build(self, num_steps: int) -> None:
        o = self.options
        T = int(o["num_train_timesteps"])
        original = int(o["original_inference_steps"])
        if original > T:
            raise SamplerError(f"lcm: original_inference_steps={original} exceeds num_train_timesteps={T}")
        if num_steps > original:
            raise SamplerError(
                f"lcm: num_steps={num_steps} exceeds original_inference_steps={original} "
                "(the distillation grid)"
            )
        ac = self.alphas_cumprod()
        k = T // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1].copy()
        idx = np.floor(np.linspace(0, len(origin), num=num_steps, endpoint=False)).astype(np.int64)
        ts = origin[idx].astype(np.int64)
        # the last step does not re-noise, so its "next" timestep is a placeholder; no next timestep is
        # negative, hence set_alpha_to_one (final_alpha_cumprod) never takes effect, as in diffusers
        nxt = np.append(ts[1:], ts[-1])
        a_t, a_next = ac[ts].astype(np.float64), ac[nxt].astype(np.float64)
        x0_x, x0_m = sch.x0_coefficients(self.prediction_type, np.sqrt(a_t), np.sqrt(1.0 - a_t))
        self._x0_x, self._x0_m = f32(x0_x, x0_m)
        sigma_data = 0.5
        scaled = ts.astype(np.float64) * float(o["timestep_scaling"])
        c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
        c_out = scaled / np.sqrt(scaled**2 + sigma_data**2)
        self._c_skip, self._c_out = f32(c_skip, c_out)
        self._sqrt_a_next, self._sqrt_b_next = f32(np.sqrt(a_next), np.sqrt(1.0 - a_next))
        self.timesteps = ts
        self.init_noise_sigma = 1.0

    def step_needs_noise(self, i: int) -> bool:
        return i != len(self.timesteps) - 1

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        o = self.options
        x0 = self._clip(self._x0_x[i] * x + self._x0_m[i] * m, o["clip_sample"], o["clip_sample_range"])
        denoised = self._c_out[i] * x0 + self._c_skip[i] * x
        if not self.step_needs_noise(i):
            return self._out(denoised)
        return self._out(
            self._sqrt_a_next[i] * denoised + self._sqrt_b_next[i] * self._noise(noise, i, x.shape)
        )
