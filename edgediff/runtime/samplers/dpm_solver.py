"""Multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
Probabilistic Models"), equal to diffusers' ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++")``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import (
    STANDARD_BETA_SCHEDULES,
    THRESHOLDING_FIXED,
    THRESHOLDING_IGNORED,
    f32,
    register,
    train_options,
)
from .multistep import MultistepSampler


@register
class DPMSolverPPSampler(MultistepSampler):
    """DPM-Solver++(2M) and its 1st/3rd-order relatives: exponential integration of the data-prediction ODE,

    x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D,   h = lambda_t - lambda_s,

    with D = x0_s (1st order, = DDIM), or the multistep estimate D = x0_s + (x0_s - x0_prev) / (2 r) (2M,
    "midpoint", Lu et al. 2022 Alg. 2; "heun" uses the exact phi_2 weight) from the previous step's x0. The
    first step is 1st order; the final step is 1st order with the default zero final sigma, and below 15 steps
    the second-to-last step is at most 2nd order (``lower_order_final``), as in diffusers.
    ``use_karras_sigmas`` (alias ``karras``) uses the Karras et al. 2022 rho = 7 sigma schedule.
    """

    name = "dpmpp-2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    defaults: dict[str, Any] = {
        **train_options(),
        "solver_order": 2,
        "algorithm_type": "dpmsolver++",
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "use_karras_sigmas": False,
        "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"),
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        **THRESHOLDING_IGNORED,
        # only used with use_flow_sigmas / use_dynamic_shifting, which are not supported
        "flow_shift": 1.0,
        "time_shift_type": "exponential",
    }
    fixed = {
        **THRESHOLDING_FIXED,
        "variance_type": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_lu_lambdas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
    }
    choices = {
        "beta_schedule": STANDARD_BETA_SCHEDULES,
        "timestep_spacing": sch.TIMESTEP_SPACINGS,
        # the SDE variants and the noise-prediction "dpmsolver" are not implemented
        "algorithm_type": ("dpmsolver++",),
        "solver_type": ("midpoint", "heun"),
        "solver_order": (1, 2, 3),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def _build(self, num_steps: int) -> None:
        o = self.options
        self._solver_schedule(
            num_steps,
            lambda_min_clipped=float(o["lambda_min_clipped"]),
            round_karras=o["beta_schedule"] != "squaredcos_cap_v2",
        )
        self._conversion(data_prediction=True)
        order = int(o["solver_order"])
        self._history_len = order
        n = len(self.timesteps)
        lam, alpha, sigma = self._lambda, self._alpha, self._sigma
        self._cx = np.zeros(n)
        self._cm = np.zeros((n, 3))
        for i in range(n):
            lower_final = i == n - 1 and (
                o["euler_at_final"] or (o["lower_order_final"] and n < 15) or o["final_sigmas_type"] == "zero"
            )
            lower_second = i == n - 2 and o["lower_order_final"] and n < 15
            warm = min(i, order)  # outputs already in the history ("lower_order_nums")
            if order == 1 or warm < 1 or lower_final:
                step_order = 1
            elif order == 2 or warm < 2 or lower_second:
                step_order = 2
            else:
                step_order = 3
            self._cx[i], self._cm[i] = self._coefficients(i, step_order, lam, alpha, sigma, o["solver_type"])
        self._check_finite(self._cx, self._cm)
        self._cx, self._cm = f32(self._cx, self._cm)

    @staticmethod
    def _coefficients(
        i: int, order: int, lam: np.ndarray, alpha: np.ndarray, sigma: np.ndarray, solver_type: str
    ) -> tuple[float, np.ndarray]:
        """Coefficients of x and of the last 3 x0 outputs (newest first) for the step sigmas[i] -> [i+1]."""
        a_t = alpha[i + 1]
        # h = +inf when the target sigma is 0: then e^{-h} = 0 and the (1st-order) step returns x0
        h = lam[i + 1] - lam[i]
        em1 = np.expm1(-h)  # e^{-h} - 1
        c_x = sigma[i + 1] / sigma[i]
        # D0, D1, D2 as weight vectors over the history (m0, m1, m2), so the update folds into one vector
        d0 = np.array([1.0, 0.0, 0.0])
        if order == 1:
            return c_x, -a_t * em1 * d0
        r0 = (lam[i] - lam[i - 1]) / h
        d1_0 = np.array([1.0, -1.0, 0.0]) / r0  # (m0 - m1) / r0
        if order == 2:
            if solver_type == "midpoint":
                return c_x, -a_t * em1 * d0 - 0.5 * a_t * em1 * d1_0
            return c_x, -a_t * em1 * d0 + a_t * (em1 / h + 1.0) * d1_0
        r1 = (lam[i - 1] - lam[i - 2]) / h
        d1_1 = np.array([0.0, 1.0, -1.0]) / r1  # (m1 - m2) / r1
        d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        return c_x, -a_t * em1 * d0 + a_t * (em1 / h + 1.0) * d1 - a_t * ((em1 + h) / h**2 - 0.5) * d2

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        self._push(i, x, m)
        return self._out(self._combine(self._cx[i], x, self._cm[i]))
