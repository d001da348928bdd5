"""Flow-matching Euler sampler for rectified-flow models (SD3, SANA, Flux), equal to diffusers'
``FlowMatchEulerDiscreteScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import Sampler, SamplerError, f32, register


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Flux's resolution-dependent shift ``mu``: linear in the number of latent tokens (diffusers'
    ``calculate_shift`` in the Flux pipeline)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


@register
class FlowEulerSampler(Sampler):
    """Euler's method on the rectified-flow ODE dx/dsigma = v(x, sigma) with x_sigma = (1 - sigma) x0 + sigma
    eps (Liu et al. 2023; Esser et al. 2024): x_next = x + (sigma_next - sigma) v.

    Sigmas run linearly from 1 to 1/T and are warped by the SD3 ``shift`` (sigma' = s sigma / (1 + (s-1)
    sigma)) or, with ``use_dynamic_shifting``, by Flux's time shift with ``mu`` (given, or computed from
    ``image_seq_len``). The model is called with t = 1000 sigma. ``stochastic_sampling`` re-noises the
    predicted x0 to sigma_next instead (fresh noise each step). The model must predict the flow velocity
    (``prediction_type='flow'``).
    """

    name = "flow-euler"
    diffusers_class = "FlowMatchEulerDiscreteScheduler"
    prediction_types = ("flow",)
    defaults: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "shift": 1.0,
        "use_dynamic_shifting": False,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
        "invert_sigmas": False,
        "shift_terminal": None,
        "use_karras_sigmas": False,
        "time_shift_type": "exponential",
        "stochastic_sampling": False,
    }
    fixed = {"use_exponential_sigmas": False, "use_beta_sigmas": False}
    choices = {"time_shift_type": ("exponential", "linear")}
    # set_timesteps(mu=...) argument of diffusers, or the token count the pipelines derive mu from
    extra_options: dict[str, Any] = {"mu": None, "image_seq_len": None}

    def _build(self, num_steps: int) -> None:
        o = self.options
        T = int(o["num_train_timesteps"])
        shift = float(o["shift"])
        # training sigmas as diffusers builds them in float32 (only their ends are used)
        train = np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)
        if not o["use_dynamic_shifting"]:
            train = np.float32(shift) * train / (np.float32(1.0) + np.float32(shift - 1) * train)
        sigma_max, sigma_min = float(train[0]), float(train[-1])
        sigmas = np.linspace(sigma_max * T, sigma_min * T, num_steps) / T
        if o["use_dynamic_shifting"]:
            mu = o["mu"]
            if mu is None and o["image_seq_len"] is not None:
                mu = calculate_shift(
                    int(o["image_seq_len"]),
                    int(o["base_image_seq_len"]),
                    int(o["max_image_seq_len"]),
                    float(o["base_shift"]),
                    float(o["max_shift"]),
                )
            if mu is None:
                raise SamplerError("flow-euler: use_dynamic_shifting needs mu= (or image_seq_len=)")
            sigmas = sch.flow_time_shift(float(mu), sigmas, o["time_shift_type"])
        else:
            sigmas = sch.flow_shift(sigmas, shift)
        if o["shift_terminal"]:
            sigmas = sch.stretch_to_terminal(sigmas, float(o["shift_terminal"]))
        if o["use_karras_sigmas"]:
            sigmas = sch.karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
        sigmas = sigmas.astype(np.float32)
        if o["invert_sigmas"]:
            sigmas = np.float32(1.0) - sigmas
            last = np.float32(1.0)
        else:
            last = np.float32(0.0)
        self.timesteps = (sigmas * np.float32(T)).astype(np.float32)
        self.sigmas = np.append(sigmas, last).astype(np.float32)
        self.init_noise_sigma = 1.0
        self.needs_noise = bool(o["stochastic_sampling"])
        s = self.sigmas.astype(np.float64)
        self._sig, self._next, self._dt = f32(s[:-1], s[1:], s[1:] - s[:-1])

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, v = self._begin(model_output, i, x)
        if self.needs_noise:
            x0 = x - self._sig[i] * v
            z = self._noise(noise, i, x.shape)
            return self._out((1.0 - self._next[i]) * x0 + self._next[i] * z)
        return self._out(x + self._dt[i] * v)
