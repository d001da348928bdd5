"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models"), equal to diffusers' ``DDIMScheduler``."""

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
class DDIMSampler(Sampler):
    """DDIM update (Song et al. 2021, eq. 12) on the discrete alpha_bar schedule:

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps + s z,
    s = eta sqrt((1 - a_prev) / (1 - a_t) (1 - a_t / a_prev)).

    eta = 0 is the deterministic ODE sampler (no noise); eta > 0 interpolates towards DDPM and draws fresh
    noise every step. As in diffusers the "previous" timestep is ``t - T // n`` (not the next entry of
    ``timesteps``) and the step past t = 0 uses ``final_alpha_cumprod`` (1 with ``set_alpha_to_one``, else
    alpha_bar_0).
    """

    name = "ddim"
    diffusers_class = "DDIMScheduler"
    defaults: dict[str, Any] = {
        **train_options(),
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
        "timestep_spacing": "leading",
        **THRESHOLDING_IGNORED,
    }
    fixed = dict(THRESHOLDING_FIXED)
    indexes_by_timestep = False
    choices = {"beta_schedule": STANDARD_BETA_SCHEDULES, "timestep_spacing": sch.TIMESTEP_SPACINGS}
    # Arguments of diffusers' DDIMScheduler.step.
    extra_options: dict[str, Any] = {"eta": 0.0, "use_clipped_model_output": False}

    def _build(self, num_steps: int) -> None:
        o = self.options
        T = int(o["num_train_timesteps"])
        eta = float(o["eta"])
        if eta < 0:
            raise SamplerError(f"ddim: eta must be >= 0, got {eta}")
        ac = self.alphas_cumprod()
        ts = self._spaced_timesteps(num_steps)
        prev = ts - T // num_steps
        final = 1.0 if o["set_alpha_to_one"] else float(ac[0])
        a_prev32 = np.where(prev >= 0, ac[np.maximum(prev, 0)], np.float32(final)).astype(np.float32)
        variance = sch.strided_posterior_f32(ac[ts], a_prev32)[2].astype(np.float64)
        a_t, a_prev = ac[ts].astype(np.float64), a_prev32.astype(np.float64)
        b_t = 1.0 - a_t
        x0_x, x0_m = sch.x0_coefficients(self.prediction_type, np.sqrt(a_t), np.sqrt(b_t))
        eps_x, eps_m = sch.eps_coefficients(self.prediction_type, np.sqrt(a_t), np.sqrt(b_t))
        std = eta * np.sqrt(variance)
        direction = np.sqrt(np.maximum(1.0 - a_prev - std**2, 0.0))
        self._x0_x, self._x0_m, self._eps_x, self._eps_m = f32(x0_x, x0_m, eps_x, eps_m)
        self._std, self._dir, self._sqrt_a_prev = f32(std, direction, np.sqrt(a_prev))
        # use_clipped_model_output re-derives eps from the clipped x0: eps = (x - sqrt(a) x0) / sqrt(1 - a)
        self._sqrt_a, self._sqrt_b = f32(np.sqrt(a_t), np.sqrt(b_t))
        self.timesteps = ts
        self.init_noise_sigma = 1.0
        self.needs_noise = eta > 0

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        o = self.options
        x0 = self._x0_x[i] * x + self._x0_m[i] * m
        if o["use_clipped_model_output"]:
            x0 = self._clip(x0, o["clip_sample"], o["clip_sample_range"])
            eps = (x - self._sqrt_a[i] * x0) / self._sqrt_b[i]
        else:
            eps = self._eps_x[i] * x + self._eps_m[i] * m
            x0 = self._clip(x0, o["clip_sample"], o["clip_sample_range"])
        prev = self._sqrt_a_prev[i] * x0 + self._dir[i] * eps
        if self.needs_noise:
            prev += self._std[i] * self._noise(noise, i, x.shape)
        return self._out(prev)
