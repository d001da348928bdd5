"""Shared noise-schedule math for the samplers (numpy only).

Everything here mirrors a helper of diffusers' schedulers (``scheduling_ddim.py``,
``scheduling_euler_discrete.py``, ``scheduling_dpmsolver_multistep.py`` ...), because the runtime must
reproduce diffusers step for step:

* training schedules: betas -> alphas_cumprod (``alpha_bar``), zero-terminal-SNR rescaling;
* inference timestep spacing ("linspace", "leading", "trailing"; the plain and the "n + 1" solver variant);
* sigma schedules: ``sigma = sqrt((1 - alpha_bar) / alpha_bar)``, interpolation at fractional timesteps, the
  Karras et al. (2022, eq. 5) rho-schedule and the inverse map sigma -> timestep;
* flow-matching shifts (SD3 ``shift``, Flux-style dynamic ``mu`` shift, terminal stretching);
* the linear maps from a model output (epsilon / v / sample) to the predicted clean sample x0 and noise eps.

Where diffusers keeps a quantity in float32 (betas, alphas_cumprod, the per-step sigma table) the same float32
rounding is applied here, so both sides start from the same numbers (up to the last bit of torch.linspace);
the per-step coefficients derived from them are computed in float64 - or, where diffusers' own float32
rounding is large (``strided_posterior_f32``), with that rounding - and stored as float32 tables.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "exp", "laplace", "sigmoid")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


class ScheduleError(ValueError):
    """An invalid schedule parameter; the samplers re-raise it as ``SamplerError``."""


# ----------------------------------------------------------------------------------------------------
# Training schedule
# ----------------------------------------------------------------------------------------------------


def _alpha_bar_betas(num_train_timesteps: int, kind: str, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar``: betas that discretise a continuous alpha_bar(t), t in [0, 1].

    "cosine" is the improved-DDPM schedule (Nichol & Dhariwal 2021, eq. 17) with s = 0.008.
    """
    if kind == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    elif kind == "laplace":

        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    elif kind == "exp":

        def alpha_bar(t: float) -> float:
            return math.exp(t * -12.0)

    else:  # pragma: no cover - guarded by make_betas
        raise ScheduleError(f"unsupported alpha_bar transform {kind!r}")
    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.asarray(betas, dtype=np.float32)


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The float32 training betas as the diffusers schedulers build them in ``__init__`` (linspace is
    computed in float64 and rounded once, where torch's float32 linspace may differ in the last bit)."""
    if trained_betas is not None:
        betas = np.asarray(trained_betas, dtype=np.float32)
        if betas.ndim != 1 or betas.size < 2:
            raise ScheduleError("trained_betas must be a 1-D sequence of at least 2 betas")
        return betas
    if num_train_timesteps < 2:
        raise ScheduleError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    n = int(num_train_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, n).astype(np.float32)
    if beta_schedule == "scaled_linear":
        # Stable Diffusion's schedule: linear in sqrt(beta); diffusers squares the float32 linspace in
        # float32.
        root = np.linspace(beta_start**0.5, beta_end**0.5, n).astype(np.float32)
        return root * root
    if beta_schedule == "squaredcos_cap_v2":
        return _alpha_bar_betas(n, "cosine")
    if beta_schedule in ("exp", "laplace"):
        return _alpha_bar_betas(n, beta_schedule)
    if beta_schedule == "sigmoid":
        ramp = np.linspace(-6.0, 6.0, n).astype(np.float32)
        sig = (1.0 / (1.0 + np.exp(-ramp.astype(np.float64)))).astype(np.float32)
        return (sig * np.float32(beta_end - beta_start) + np.float32(beta_start)).astype(np.float32)
    raise ScheduleError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


def cumprod_f32(values: np.ndarray) -> np.ndarray:
    """Cumulative product as torch computes it on CPU: accumulated in float64, outputs rounded to float32."""
    return np.cumprod(values.astype(np.float64)).astype(np.float32)


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas so the last step has zero SNR (Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Algorithm 1): shift and scale sqrt(alpha_bar) so that it ends at exactly 0."""
    alphas_bar_sqrt = np.sqrt(cumprod_f32(np.float32(1.0) - betas).astype(np.float64))
    first, last = alphas_bar_sqrt[0], alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1.0 - alphas).astype(np.float32)


def alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: Sequence[float] | np.ndarray | None = None,
    rescale_betas_zero_snr: bool = False,
) -> np.ndarray:
    """float32 ``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (Ho et al. 2020), indexed by training timestep."""
    betas = make_betas(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return cumprod_f32(np.float32(1.0) - betas)


def train_sigmas(alpha_bar: np.ndarray) -> np.ndarray:
    """float32 VE noise levels ``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` per training timestep."""
    a = alpha_bar.astype(np.float32)
    return ((np.float32(1.0) - a) / a) ** np.float32(0.5)


def strided_posterior_f32(a_t: np.ndarray, a_prev: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(alpha_t, beta_t, posterior variance) of a strided step t -> prev, in float32 with diffusers' op order.

    alpha_t = a_t / a_prev, beta_t = 1 - alpha_t and var = (1 - a_prev) / (1 - a_t) beta_t (Ho et al. 2020,
    eq. 7; DDIM's sigma_t^2 at eta = 1). ``1 - a_t / a_prev`` cancels badly in float32 when steps are short
    (many-step DDPM); diffusers computes it in float32, so it is rounded the same way here to stay equal to
    diffusers.
    """
    a_t = np.asarray(a_t, dtype=np.float32)
    a_prev = np.asarray(a_prev, dtype=np.float32)
    one = np.float32(1.0)
    cur_alpha = a_t / a_prev
    cur_beta = one - cur_alpha
    variance = (one - a_prev) / (one - a_t) * cur_beta
    return cur_alpha, cur_beta, variance


# ----------------------------------------------------------------------------------------------------
# Inference timesteps
# ----------------------------------------------------------------------------------------------------


def _check_spacing(spacing: str) -> None:
    if spacing not in TIMESTEP_SPACINGS:
        raise ScheduleError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(TIMESTEP_SPACINGS)}")


def spaced_timesteps(
    spacing: str, num_train_timesteps: int, num_steps: int, steps_offset: int = 0, *, rounded: bool = True
) -> np.ndarray:
    """``num_steps`` descending training timesteps (DDIM, DDPM, Euler, Heun, table 2 of Lin et al. 2024).

    ``rounded=False`` keeps the fractional "linspace" values, as the Euler/Heun schedulers do (float32).
    """
    _check_spacing(spacing)
    T = num_train_timesteps
    if spacing == "linspace":
        if rounded:
            return np.linspace(0, T - 1, num_steps).round()[::-1].copy().astype(np.int64)
        return np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
    if spacing == "leading":
        ratio = T // num_steps
        ts = (np.arange(0, num_steps) * ratio).round()[::-1].copy().astype(np.int64)
        return ts + steps_offset
    ratio = T / num_steps
    return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


def solver_timesteps(
    spacing: str,
    num_train_timesteps: int,
    num_steps: int,
    steps_offset: int = 0,
    last_timestep: int | None = None,
) -> np.ndarray:
    """Timesteps of the multistep solvers (DPM-Solver++, UniPC): ``num_steps + 1`` points, last dropped."""
    _check_spacing(spacing)
    T = num_train_timesteps
    last = T if last_timestep is None else last_timestep
    if spacing == "linspace":
        return np.linspace(0, last - 1, num_steps + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = last // (num_steps + 1)
        ts = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64)
        return ts + steps_offset
    ratio = T / num_steps
    return np.arange(last, 0, -ratio).round().copy().astype(np.int64) - 1


# ----------------------------------------------------------------------------------------------------
# Sigma schedules
# ----------------------------------------------------------------------------------------------------


def interp_sigmas(timesteps: np.ndarray, sigmas_train: np.ndarray) -> np.ndarray:
    """Sigma at (possibly fractional) timesteps by linear interpolation of the training table (float64)."""
    return np.interp(timesteps, np.arange(0, len(sigmas_train)), sigmas_train)


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (EDM) eq. 5: sigma_i = (max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho."""
    ramp = np.linspace(0, 1, num_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma: piecewise-linear interpolation in log-sigma (diffusers'
    ``_sigma_to_t``, vectorised over ``sigmas``)."""
    sigmas = np.asarray(sigmas, dtype=np.float64)
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma[np.newaxis, :] - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low = log_sigmas[low_idx]
    high = log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return (1 - w) * low_idx + w * high_idx


def vp_alpha_sigma(sigma: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
    """Map a VE noise level to the VP pair (alpha_t, sigma_t) with x_t = alpha_t x0 + sigma_t eps:
    alpha_t = 1 / sqrt(1 + sigma^2), sigma_t = sigma * alpha_t."""
    s = np.asarray(sigma, dtype=np.float64)
    alpha = 1.0 / np.sqrt(s * s + 1.0)
    return alpha, s * alpha


def half_log_snr(sigma: np.ndarray | float) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = -log(sigma) for a VE sigma (DPM-Solver's time variable); +inf at
    0."""
    s = np.asarray(sigma, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return -np.log(s)


# ----------------------------------------------------------------------------------------------------
# Flow matching (rectified flow, x_t = (1 - sigma) x0 + sigma eps)
# ----------------------------------------------------------------------------------------------------


def flow_shift(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3 resolution shift (Esser et al. 2024, eq. 23): sigma' = s sigma / (1 + (s - 1) sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Flux-style dynamic shift with a resolution-dependent ``mu``: e^mu / (e^mu + (1/t - 1)) (or linear in
    mu)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1) ** 1.0)
    raise ScheduleError(f"time_shift_type must be 'exponential' or 'linear', got {kind!r}")


def stretch_to_terminal(sigmas: np.ndarray, shift_terminal: float) -> np.ndarray:
    """Stretch a shifted flow schedule so that its last sigma equals ``shift_terminal`` (LTX-Video)."""
    one_minus = 1 - sigmas
    scale = one_minus[-1] / (1 - shift_terminal)
    return 1 - (one_minus / scale)


# ----------------------------------------------------------------------------------------------------
# Model-output parameterisations
# ----------------------------------------------------------------------------------------------------


def x0_coefficients(prediction_type: str, alpha: np.ndarray | float, sigma: np.ndarray | float) -> tuple:
    """(a, b) with ``x0 = a * x + b * model_output`` for a VP state x = alpha x0 + sigma eps.

    epsilon: x0 = (x - sigma eps) / alpha (Ho et al. 2020); v_prediction: x0 = alpha x - sigma v (Salimans &
    Ho 2022, v = alpha eps - sigma x0); sample: the model predicts x0 itself.
    """
    alpha = np.asarray(alpha, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if prediction_type == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction_type == "v_prediction":
        return alpha, -sigma
    if prediction_type == "sample":
        return np.zeros_like(alpha), np.ones_like(alpha)
    raise ScheduleError(f"prediction type {prediction_type!r} has no x0 map on a diffusion (VP) schedule")


def eps_coefficients(prediction_type: str, alpha: np.ndarray | float, sigma: np.ndarray | float) -> tuple:
    """(a, b) with ``eps = a * x + b * model_output`` for a VP state x = alpha x0 + sigma eps (see above)."""
    alpha = np.asarray(alpha, dtype=np.float64)
    sigma = np.asarray(sigma, dtype=np.float64)
    if prediction_type == "epsilon":
        return np.zeros_like(alpha), np.ones_like(alpha)
    if prediction_type == "v_prediction":
        return sigma, alpha
    if prediction_type == "sample":
        return 1.0 / sigma, -alpha / sigma
    raise ScheduleError(f"prediction type {prediction_type!r} has no eps map on a diffusion (VP) schedule")


# ----------------------------------------------------------------------------------------------------
# VE (k-diffusion style) sigma schedules of the Euler / Heun samplers
# ----------------------------------------------------------------------------------------------------


def ve_schedule(
    alpha_bar: np.ndarray,
    spacing: str,
    num_steps: int,
    steps_offset: int = 0,
    *,
    karras: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    final_sigmas_type: str = "zero",
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of diffusers' Euler/Heun ``set_timesteps``: float32 model timesteps (fractional for
    "linspace" and Karras) and float32 sigmas with the final sigma appended (0, or sigma_0 for
    "sigma_min")."""
    T = len(alpha_bar)
    ts = spaced_timesteps(spacing, T, num_steps, steps_offset, rounded=False).astype(np.float32)
    table = train_sigmas(alpha_bar)
    sigmas = interp_sigmas(ts, table)
    if karras:
        lo = sigma_min if sigma_min is not None else float(sigmas[-1])
        hi = sigma_max if sigma_max is not None else float(sigmas[0])
        sigmas = karras_sigmas(lo, hi, num_steps)
        ts = sigma_to_t(sigmas, np.log(table)).astype(np.float32)
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = float(table[0])
    else:
        raise ScheduleError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    return ts, np.concatenate([sigmas, [last]]).astype(np.float32)


def ve_init_noise_sigma(sigmas: np.ndarray, spacing: str) -> float:
    """Std of the initial latent in VE space: sigma_max ("linspace"/"trailing") or sqrt(sigma_max^2 + 1)."""
    top = np.float32(sigmas.max())
    if spacing in ("linspace", "trailing"):
        return float(top)
    return float(np.sqrt(top * top + np.float32(1.0)))


def ve_input_scale(sigmas: np.ndarray) -> np.ndarray:
    """1 / sqrt(sigma^2 + 1): maps the VE latent x0 + sigma eps to the unit-variance model input."""
    s = sigmas.astype(np.float64)
    return 1.0 / np.sqrt(s * s + 1.0)


def solver_schedule(
    alpha_bar: np.ndarray,
    spacing: str,
    num_steps: int,
    steps_offset: int = 0,
    *,
    last_timestep: int | None = None,
    karras: bool = False,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    round_karras: bool = True,
    final_sigmas_type: str = "zero",
    karras_final_is_last: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 timesteps, float32 sigmas + final sigma) of the multistep solvers' ``set_timesteps``.

    Karras sigmas span the whole training range (sigma_0 .. sigma_{T-1}) unless ``sigma_min``/``sigma_max``
    are given; their timesteps are rounded (``round_karras``). The final sigma is 0 ("zero") or, for
    "sigma_min", sigma_0 - except UniPC with Karras sigmas, which repeats the last Karras sigma
    (``karras_final_is_last``).
    """
    T = len(alpha_bar)
    table = train_sigmas(alpha_bar)
    ts = solver_timesteps(spacing, T, num_steps, steps_offset, last_timestep)
    if karras:
        lo = sigma_min if sigma_min is not None else float(table[0])
        hi = sigma_max if sigma_max is not None else float(table[-1])
        sigmas = karras_sigmas(lo, hi, num_steps)
        ts = sigma_to_t(sigmas, np.log(table))
        if round_karras:
            ts = ts.round()
    else:
        sigmas = interp_sigmas(ts, table)
    if final_sigmas_type == "zero":
        last = 0.0
    elif final_sigmas_type == "sigma_min":
        last = float(sigmas[-1]) if (karras and karras_final_is_last) else float(table[0])
    else:
        raise ScheduleError(f"final_sigmas_type must be 'zero' or 'sigma_min', got {final_sigmas_type!r}")
    return ts.astype(np.int64), np.concatenate([sigmas, [last]]).astype(np.float32)
