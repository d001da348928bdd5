"""DDPM ancestral sampling (Ho et al. 2020), equal to diffusers' ``DDPMScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import (
    STANDARD_BETA_SCHEDULES,
    THRESHOLDING_FIXED,
    THRESHOLDING_IGNORED,
    Sampler,
    f32,
    register,
    train_options,
)


@register
class DDPMSampler(Sampler):
    """Ancestral step from the posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7):

    x_prev = sqrt(a_prev) beta_t / (1 - a_t) x0 + sqrt(alpha_t) (1 - a_prev) / (1 - a_t) x_t + sigma_t z,

    with alpha_t = a_t / a_prev over the (possibly strided) inference steps and sigma_t^2 = the posterior
    variance ("fixed_small") or beta_t ("fixed_large"). No noise is added at t = 0.
    """

    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    defaults: dict[str, Any] = {
        **train_options(),
        "variance_type": "fixed_small",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        **THRESHOLDING_IGNORED,
    }
    fixed = dict(THRESHOLDING_FIXED)
    indexes_by_timestep = False
    choices = {
        "beta_schedule": (*STANDARD_BETA_SCHEDULES, "sigmoid", "laplace"),
        "timestep_spacing": sch.TIMESTEP_SPACINGS,
        # "learned"/"learned_range" need a 2C-channel model output; "fixed_large_log" is broken in diffusers.
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large"),
    }
    needs_noise = True

    def _build(self, num_steps: int) -> None:
        o = self.options
        ac = self.alphas_cumprod()
        ts = self._spaced_timesteps(num_steps)
        prev = np.append(ts[1:], -1)
        a_t32 = ac[ts]
        a_prev32 = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(1.0)).astype(np.float32)
        cur_alpha, cur_beta, variance = sch.strided_posterior_f32(a_t32, a_prev32)
        a_t, a_prev = a_t32.astype(np.float64), a_prev32.astype(np.float64)
        b_t, b_prev = 1.0 - a_t, 1.0 - a_prev
        x0_x, x0_m = sch.x0_coefficients(self.prediction_type, np.sqrt(a_t), np.sqrt(b_t))
        c_x0 = np.sqrt(a_prev) * cur_beta.astype(np.float64) / b_t
        c_x = np.sqrt(cur_alpha.astype(np.float64)) * b_prev / b_t
        if o["variance_type"] == "fixed_large":
            variance = cur_beta
        else:  # fixed_small and fixed_small_log give the same std (exp(0.5 log v) = sqrt(v))
            variance = np.maximum(variance, np.float32(1e-20))
        variance = variance.astype(np.float64)
        self._x0_x, self._x0_m, self._c_x0, self._c_x = f32(x0_x, x0_m, c_x0, c_x)
        (self._std,) = f32(np.sqrt(variance))
        self.timesteps = ts
        self.init_noise_sigma = 1.0

    def step_needs_noise(self, i: int) -> bool:
        return bool(self.timesteps[i] > 0)

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        x0 = self._clip(
            self._x0_x[i] * x + self._x0_m[i] * m,
            self.options["clip_sample"],
            self.options["clip_sample_range"],
        )
        prev = self._c_x0[i] * x0 + self._c_x[i] * x
        if self.step_needs_noise(i):
            prev += self._std[i] * self._noise(noise, i, x.shape)
        return self._out(prev)
