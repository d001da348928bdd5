"""Heun's 2nd-order sampler (Karras et al. 2022, Alg. 1), equal to diffusers' ``HeunDiscreteScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import f32, register, train_options
from .euler import VESampler


@register
class HeunSampler(VESampler):
    """Heun's method (explicit trapezoid) on the probability-flow ODE dx/dsigma = (x - x0) / sigma.

    Each step sigma_k -> sigma_{k+1} takes an Euler predictor with d_k, evaluates the model again at the
    predicted point and averages the slopes: x_{k+1} = x_k + (sigma_{k+1} - sigma_k) (d_k + d'_{k+1}) / 2. The
    last step, to sigma = 0, is a plain Euler step (Alg. 1, line 9), so there are 2n - 1 model evaluations. As
    in diffusers the evaluations are flattened: ``timesteps``/``sigmas`` repeat every interior entry and even
    evaluations are predictor steps, odd ones correctors that use the state kept from the predictor (call them
    in order).
    """

    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    defaults: dict[str, Any] = {
        **train_options(0.00085, 0.012, "linear", zero_snr=False),
        "use_karras_sigmas": False,
        "clip_sample": False,
        "clip_sample_range": 1.0,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
    }
    fixed = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    choices = {
        "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2", "exp"),
        "timestep_spacing": sch.TIMESTEP_SPACINGS,
    }
    stateful = True

    def _build(self, num_steps: int) -> None:
        self._ve_build(num_steps)
        ts, s = self.timesteps, self.sigmas
        # [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0] and [t0, t1, t1, ..., t_{n-1}, t_{n-1}]
        self.sigmas = np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]])
        self.timesteps = np.concatenate([ts[:1], np.repeat(ts[1:], 2)]).astype(np.float32)
        # evaluation k converts its output to x0 at sigmas[k]: the predictor's sigma, or the corrector's
        # sigma_next
        self._set_x0_maps(self.sigmas[:-1])
        sig = self.sigmas.astype(np.float64)
        self._sig, self._dt = f32(sig[:-1], sig[1:] - sig[:-1])  # dt is used on predictor (even) evaluations

    def reset(self) -> None:
        super().reset()
        self._prev_derivative: np.ndarray | None = None
        self._prev_x: np.ndarray | None = None

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        o = self.options
        x0 = self._clip(self._x0_x[i] * x + self._x0_m[i] * m, o["clip_sample"], o["clip_sample_range"])
        derivative = (x - x0) / self._sig[i]
        if i % 2 == 0:  # predictor: Euler step, remember slope and start point for the corrector
            # (a copy: x may be the caller's array, which a pipeline is free to modify in place)
            self._prev_derivative, self._prev_x = derivative, x.copy()
            return self._out(x + derivative * self._dt[i])
        # corrector: trapezoid from the predictor's start point with the averaged slope
        slope = (self._prev_derivative + derivative) / 2
        out = self._prev_x + slope * self._dt[i - 1]
        self._prev_derivative = self._prev_x = None
        return self._out(out)
