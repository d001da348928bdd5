"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"), equal to diffusers' ``UniPCMultistepScheduler``."""

from __future__ import annotations

from typing import Any

import numpy as np

from . import schedule as sch
from .base import (
    STANDARD_BETA_SCHEDULES,
    THRESHOLDING_FIXED,
    THRESHOLDING_IGNORED,
    SamplerError,
    f32,
    register,
    train_options,
)
from .multistep import MultistepSampler


def _unipc_weights(h: float, rks: np.ndarray, order: int, predict_x0: bool, solver_type: str) -> tuple:
    """UniPC's (h_phi_1, B(h), rhs vector b, matrix R) for ``order`` (Zhao et al. 2023, Alg. 2/3).

    b_k = k! h phi_{k+1}(h) / B(h) with B(h) = h (bh1) or e^h - 1 (bh2); R[k] = r^k over the ratios
    r_m = (lambda_{s_m} - lambda_s) / h (the last one is 1).
    """
    # numpy scalars, so that h = inf (zero final sigma) yields inf/nan instead of a ZeroDivisionError
    hh = np.float64(-h if predict_x0 else h)
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if solver_type == "bh1" else np.expm1(hh)
    factorial = 1
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = np.stack([rks ** (k - 1) for k in range(1, order + 1)])
    return h_phi_1, b_h, np.asarray(b), R


@register
class UniPCSampler(MultistepSampler):
    """UniPC-p with its corrector UniC (B(h) variant ``bh2`` by default, order 2, as in diffusers).

    Predictor (UniP): x_t = (sigma_t/sigma_s) x_s - alpha_t h phi_1(h) x0_s - alpha_t B(h) sum_m rho_m D_m,
    with D_m = (x0_{s_m} - x0_s) / r_m from the history. Corrector (UniC): once the model output at t is
    known, the previous step is redone with it included (one more rho), giving the sample the next predictor
    starts from - no extra model call. Weights rho solve R rho = b (order 2 predictor: rho = 1/2).
    ``predict_x0=False`` runs the same scheme on eps (alpha and sigma swap roles). Warm-up and
    ``lower_order_final`` as in diffusers.
    """

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    defaults: dict[str, Any] = {
        **train_options(),
        "solver_order": 2,
        "predict_x0": True,
        "solver_type": "bh2",
        "lower_order_final": True,
        "disable_corrector": [],
        "use_karras_sigmas": False,
        "sigma_min": None,
        "sigma_max": None,
        "timestep_spacing": "linspace",
        "steps_offset": 0,
        "final_sigmas_type": "zero",
        **THRESHOLDING_IGNORED,
        # only used with use_flow_sigmas / use_dynamic_shifting, which are not supported
        "flow_shift": 1.0,
        "time_shift_type": "exponential",
    }
    fixed = {
        **THRESHOLDING_FIXED,
        "solver_p": None,
        "use_exponential_sigmas": False,
        "use_beta_sigmas": False,
        "use_flow_sigmas": False,
        "use_dynamic_shifting": False,
        "shift_terminal": None,
    }
    choices = {
        "beta_schedule": STANDARD_BETA_SCHEDULES,
        "timestep_spacing": sch.TIMESTEP_SPACINGS,
        "solver_type": ("bh1", "bh2"),
        "final_sigmas_type": ("zero", "sigma_min"),
    }

    def _build(self, num_steps: int) -> None:
        o = self.options
        order = int(o["solver_order"])
        if order < 1:
            raise SamplerError(f"unipc: solver_order must be >= 1, got {order}")
        predict_x0 = bool(o["predict_x0"])
        if not predict_x0 and o["final_sigmas_type"] == "zero":
            # the eps-form update multiplies sigma_t = 0 by e^h - 1 = inf at the last step: NaN in diffusers
            raise SamplerError(
                "unipc: predict_x0=False needs final_sigmas_type='sigma_min' (diffusers yields NaN)"
            )
        if o["solver_type"] == "bh1" and o["final_sigmas_type"] == "zero":
            # B(h) = h = -inf at the final sigma 0 multiplies a zero correction: diffusers returns NaN
            raise SamplerError(
                "unipc: solver_type='bh1' needs final_sigmas_type='sigma_min' (diffusers yields NaN)"
            )
        self._solver_schedule(
            num_steps, sigma_min=o["sigma_min"], sigma_max=o["sigma_max"], karras_final_is_last=True
        )
        self._conversion(data_prediction=predict_x0)
        self._history_len = order + 1  # the corrector also needs the output from order steps back
        n = len(self.timesteps)
        disabled = {int(k) for k in (o["disable_corrector"] or [])}
        orders = [min(order, n - i if o["lower_order_final"] else order, i + 1) for i in range(n)]
        # predictor: x_next = px x + sum_k pm[k] history[k]; corrector: x = cl x_last + sum_k cm[k] history[k]
        self._px, self._pm = np.zeros(n), np.zeros((n, order + 1))
        self._cl, self._cm = np.zeros(n), np.zeros((n, order + 1))
        self._corrects = np.zeros(n, dtype=bool)
        for i in range(n):
            self._px[i], self._pm[i, : orders[i]] = self._update(i, i + 1, orders[i], corrector=False)
            if i > 0 and (i - 1) not in disabled:
                self._corrects[i] = True
                self._cl[i], self._cm[i, : orders[i - 1] + 1] = self._update(
                    i - 1, i, orders[i - 1], corrector=True
                )
        self._check_finite(self._px, self._pm, self._cl, self._cm)
        self._px, self._pm, self._cl, self._cm = f32(self._px, self._pm, self._cl, self._cm)

    def _update(self, s: int, t: int, order: int, corrector: bool) -> tuple[float, np.ndarray]:
        """Coefficients of the UniP (UniC) update from sigmas[s] to sigmas[t] over the history outputs.

        Predictor: history[0] is the output at s, history[k] the one k steps before. Corrector: history[0] is
        the new output at t, history[1] the one at s, history[1 + k] the one k steps before s.
        """
        o = self.options
        predict_x0 = bool(o["predict_x0"])
        lam, alpha, sigma = self._lambda, self._alpha, self._sigma
        h = lam[t] - lam[s]
        rks = np.array([(lam[s - k] - lam[s]) / h for k in range(1, order)] + [1.0])
        if predict_x0:
            c_x, a_t = sigma[t] / sigma[s], alpha[t]  # data prediction: x0 weights carry alpha_t
        else:
            c_x, a_t = alpha[t] / alpha[s], sigma[t]  # noise prediction: eps weights carry sigma_t
        base = 1 if corrector else 0  # index of the output at s in the history
        coefs = np.zeros(order + base)
        if order == 1 and not corrector:
            coefs[0] = -a_t * np.expm1(-h if predict_x0 else h)
            return c_x, coefs
        h_phi_1, b_h, b, R = _unipc_weights(h, rks, order, predict_x0, o["solver_type"])
        coefs[base] = -a_t * h_phi_1
        try:
            if corrector:
                rhos = np.array([0.5]) if order == 1 else np.linalg.solve(R, b)
                # D_t = m_t - m_s carries the last rho
                coefs[0] += -a_t * b_h * rhos[-1]
                coefs[base] += a_t * b_h * rhos[-1]
            else:
                rhos = np.array([0.5]) if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1])
        except np.linalg.LinAlgError:  # coinciding lambdas: torch.linalg.solve fails in diffusers as well
            raise SamplerError(
                f"unipc: singular UniPC system at step {s} for num_steps={self.num_steps}"
            ) from None
        for k in range(1, order):  # D_k = (m_{s-k} - m_s) / r_k
            w = -a_t * b_h * rhos[k - 1] / rks[k - 1]
            coefs[base + k] += w
            coefs[base] -= w
        return c_x, coefs

    def reset(self) -> None:
        super().reset()
        self._last_x: np.ndarray | None = None

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:
        i, x, m = self._begin(model_output, i, x)
        self._push(i, x, m)
        if self._corrects[i] and self._last_x is not None:
            x = self._combine(self._cl[i], self._last_x, self._cm[i])
            self._last_x = x
        else:
            self._last_x = x.copy()  # x may be the caller's array, which it is free to modify in place
        return self._out(self._combine(self._px[i], x, self._pm[i]))
