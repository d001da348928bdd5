"""Shared machinery of the multistep exponential-integrator samplers (DPM-Solver++, UniPC).

Both integrate the diffusion ODE in lambda = log(alpha_t / sigma_t) (half log-SNR) and reuse the converted
model outputs of the previous steps (one model call per step, a history buffer of ``solver_order`` outputs).
Every coefficient depends only on the sigma schedule and the step index, so they are precomputed in ``_build``
and a step is ``x_next = c_x[i] * x + sum_k c_m[i, k] * history[k]``.
"""

from __future__ import annotations

import numpy as np

from . import schedule as sch
from .base import Sampler, SamplerError, f32


class MultistepSampler(Sampler):
    """Base of the multistep solvers: VP conversion of model outputs and the output history.

    ``history[0]`` is the current step's converted output (x0 for data-prediction solvers, eps otherwise),
    ``history[k]`` the one from ``k`` steps earlier.
    """

    stateful = True
    _history_len = 1

    def _solver_schedule(self, num_steps: int, lambda_min_clipped: float = -np.inf, **kwargs: object) -> None:
        o = self.options
        ac = self.alphas_cumprod(finite_sigma=True)
        # lambda_min_clipped drops the low-SNR end (timesteps whose float32 lambda is below the bound)
        lam32 = np.log(np.sqrt(ac)) - np.log(np.sqrt(np.float32(1.0) - ac))
        clipped = int(np.searchsorted(lam32[::-1], lambda_min_clipped))
        ts, sigmas = sch.solver_schedule(
            ac,
            o["timestep_spacing"],
            num_steps,
            int(o["steps_offset"]),
            last_timestep=len(ac) - clipped,
            karras=bool(o["use_karras_sigmas"]),
            final_sigmas_type=o["final_sigmas_type"],
            **kwargs,
        )
        self.timesteps = ts
        self.sigmas = sigmas
        self.init_noise_sigma = 1.0
        s = sigmas.astype(np.float64)
        self._alpha, self._sigma = sch.vp_alpha_sigma(s)
        self._lambda = sch.half_log_snr(s)
        if np.any(s[1:-1] == s[:-2]):
            # a repeated timestep gives a zero step h = 0 (num_steps close to num_train_timesteps): diffusers'
            # update divides by it and returns NaN
            raise SamplerError(
                f"{self.name}: num_steps={num_steps} repeats a timestep (zero-length solver step)"
            )

    def _check_finite(self, *coefficients: np.ndarray) -> None:
        if not all(np.isfinite(c).all() for c in coefficients):
            raise SamplerError(
                f"{self.name}: these options give a degenerate solver step for num_steps={self.num_steps} "
                "(diffusers returns NaN)"
            )

    def _conversion(self, data_prediction: bool) -> None:
        """Per-step maps of the raw model output to x0 (``data_prediction``) or to eps, at sigmas[i]."""
        a, s = self._alpha[:-1], self._sigma[:-1]
        to_output = sch.x0_coefficients if data_prediction else sch.eps_coefficients
        self._conv_x, self._conv_m = f32(*to_output(self.prediction_type, a, s))

    def reset(self) -> None:
        super().reset()
        self._history: list[np.ndarray] = []

    def _push(self, i: int, x: np.ndarray, m: np.ndarray) -> None:
        converted = self._conv_x[i] * x + self._conv_m[i] * m
        self._history = [converted, *self._history[: self._history_len - 1]]

    def _combine(self, coef_x: float, x: np.ndarray, coefs: np.ndarray) -> np.ndarray:
        out = coef_x * x
        for c, h in zip(coefs, self._history, strict=False):
            if c != 0.0:
                out = out + c * h
        return out
