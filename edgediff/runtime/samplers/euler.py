"""Euler and Euler-ancestral samplers in VE (sigma) space, equal to diffusers' ``EulerDiscreteScheduler`` and
``EulerAncestralDiscreteScheduler``; :class:`VESampler` is also the base of Heun."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import STANDARD_BETA_SCHEDULES, Sampler, f32, register, train_options


class VESampler(Sampler):
    """Base of the k-diffusion style samplers (Karras et al. 2022): the latent is x = x0 + sigma eps, the
    model sees x / sqrt(sigma^2 + 1) (the VP latent), and the model output is mapped to the denoised x0.

    Subclasses call :meth:`_ve_build`; it sets ``timesteps``, ``sigmas`` (float32, final sigma appended),
    ``init_noise_sigma`` and the per-sigma x0 coefficients ``x0 = _x0_x * x + _x0_m * model_output``.
    """

    _karras_minmax_options = False  # Euler exposes sigma_min / sigma_max config overrides, Heun does not

    def _ve_build(self, num_steps: int) -> None:
        o = self.options
        ac = self.alphas_cumprod(finite_sigma=True)
        ts, sigmas = sch.ve_schedule(
            ac,
            o["timestep_spacing"],
            num_steps,
            int(o["steps_offset"]),
            karras=bool(o.get("use_karras_sigmas", False)),
            sigma_min=o.get("sigma_min") if self._karras_minmax_options else None,
            sigma_max=o.get("sigma_max") if self._karras_minmax_options else None,
            final_sigmas_type=o.get("final_sigmas_type", "zero"),
        )
        self.timesteps = ts
        self.sigmas = sigmas
        self.init_noise_sigma = sch.ve_init_noise_sigma(sigmas, o["timestep_spacing"])

    def _set_x0_maps(self, sigmas: np.ndarray) -> None:
        # x0 from the output at VE sigma s: the VP pair is alpha = 1/sqrt(1+s^2), sigma_t = s alpha and the VP
        # latent is alpha x, so the x-coefficient picks up a factor alpha.
        alpha, sig = sch.vp_alpha_sigma(sigmas)
        a, b = sch.x0_coefficients(self.prediction_type, alpha, sig)
        self._x0_x64, self._x0_m64 = a * alpha, b  # float64 copies to fold into further coefficients
        self._in_scale, self._x0_x, self._x0_m = f32(sch.ve_input_scale(sigmas), a * alpha, b)

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        i = self._check_index(i)
        return self._latent(x).astype(np.float32, copy=False) * self._in_scale[i]


_EULER_COMMON: dict[str, Any] = {
    **train_options(),
    "timestep_spacing": "linspace",
    "steps_offset": 0,
}


@register
class EulerSampler(VESampler):
    """Euler's method on the probability-flow ODE dx/dsigma = (x - x0(x, sigma)) / sigma (Karras et al. 2022,
    Alg. 1 with no churn): x_next = x + (sigma_next - sigma) (x - x0) / sigma. One model call per step."""

    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    defaults: dict[str, Any] = {
        **_EULER_COMMON,
        "use_karras_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_type": "discrete",
        "final_sigmas_type": "zero",
    }
    fixed = {
        "interpolation_type": "linear",
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
    }
    choices = {
        "beta_schedule": STANDARD_BETA_SCHEDULES,
        "timestep_spacing": sch.TIMESTEP_SPACINGS,
        "timestep_type": ("discrete", "continuous"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }
    _karras_minmax_options = True

    def _build(self, num_steps: int) -> None:
        self._ve_build(num_steps)
        s = self.sigmas
        if self.options["timestep_type"] == "continuous" and self.prediction_type == "v_prediction":
            # EDM-style conditioning c_noise = log(sigma) / 4 (Karras et al. 2022, table 1)
            self.timesteps = (np.float32(0.25) * np.log(s[:-1])).astype(np.float32)
        self._set_x0_maps(s[:-1])
        # fold x_next = x + (x - x0) dt / sigma into x_next = A x + B m
        ratio = (s[1:].astype(np.float64) - s[:-1]) / s[:-1]
        self._A, self._B = f32(1.0 + (1.0 - self._x0_x64) * ratio, -self._x0_m64 * ratio)

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        return self._out(self._A[i] * x + self._B[i] * m)


@register
class EulerAncestralSampler(VESampler):
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``): split the move sigma -> sigma_next into a
    deterministic Euler step down to sigma_down and fresh noise of std sigma_up, where
    sigma_up = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2),
    sigma_down = sqrt(sigma_next^2 - sigma_up^2).
    """

    name = "euler-a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    # diffusers' EulerAncestralDiscreteScheduler raises NotImplementedError for "sample" prediction
    prediction_types = ("epsilon", "v_prediction")
    defaults: dict[str, Any] = dict(_EULER_COMMON)
    choices = {"beta_schedule": STANDARD_BETA_SCHEDULES, "timestep_spacing": sch.TIMESTEP_SPACINGS}
    needs_noise = True

    def _build(self, num_steps: int) -> None:
        self._ve_build(num_steps)
        s = self.sigmas.astype(np.float64)
        s_from, s_to = s[:-1], s[1:]
        up = np.sqrt(s_to**2 * (s_from**2 - s_to**2) / s_from**2)
        down = np.sqrt(np.maximum(s_to**2 - up**2, 0.0))
        self._set_x0_maps(self.sigmas[:-1])
        ratio = (down - s_from) / s_from
        self._A, self._B = f32(1.0 + (1.0 - self._x0_x64) * ratio, -self._x0_m64 * ratio)
        (self._up,) = f32(up)

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        return self._out(self._A[i] * x + self._B[i] * m + self._up[i] * self._noise(noise, i, x.shape))
