"""The numpy samplers of ``edgediff.runtime.samplers`` against diffusers' schedulers.

Both sides run the standard diffusers loop on the same deterministic numpy "model" and the same initial
noise (stochastic samplers also get the same per-step noise: diffusers draws it from a seeded
``torch.Generator``, the numpy side reproduces the draws through ``noise_fn`` from an identically seeded
generator). The final latents must agree to 1e-5 (relative L2 norm, and max abs error relative to the latents'
scale). Where diffusers itself fails on a combination (raises or returns NaN), the numpy sampler must raise
SamplerError instead.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgediff.runtime.samplers import Sampler, SamplerError, get_sampler, list_samplers

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

REPO = Path(__file__).resolve().parents[2]
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
STEPS = (1, 4, 20, 50)
TOL = 1e-5
SHAPE = (1, 4, 8, 8)
FLOW_SHAPE = (1, 16, 8, 8)
# diffusers' step() keyword arguments that our samplers take as options
STEP_KWARGS = ("eta", "use_clipped_model_output")
SET_KWARGS = ("mu",)


# ------------------------------------------------------------------------------------------------- fixtures


def make_denoiser(shape: tuple, seed: int = 1) -> Callable[[np.ndarray, float], np.ndarray]:
    """A deterministic, non-trivial stand-in for a diffusion model: channel mixing through tanh, a
    t-dependent gain and a t-dependent bias image (all in numpy, shared by both sides)."""
    rng = np.random.default_rng(seed)
    c = shape[1]
    mix = rng.standard_normal((c, c)) / np.sqrt(c)
    bias = rng.standard_normal(shape[1:]) * 0.1

    def denoise(x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        y = 0.6 * np.tanh(np.einsum("oc,bchw->bohw", mix, x)) + 0.3 * x * np.cos(t / 300.0)
        return (y + bias * np.sin(t / 150.0)).astype(np.float32)

    return denoise


def initial_noise(shape: tuple, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_noise_fn(seed: int) -> Callable[[tuple, int], np.ndarray]:
    """Per-step noise equal to diffusers' randn_tensor draws from torch.Generator().manual_seed(seed)."""
    gen = torch.Generator().manual_seed(seed)
    return lambda shape, i: torch.randn(shape, generator=gen, dtype=torch.float32).numpy()


@dataclass(frozen=True)
class Case:
    """One sampler configuration compared against one diffusers scheduler configuration."""

    id: str
    sampler: str
    scheduler: str
    config: dict[str, Any] = field(default_factory=dict)  # diffusers config kwargs (also given to ours)
    extra: dict[str, Any] = field(default_factory=dict)  # step()/set_timesteps() kwargs (our options)
    predictions: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
    seed: int | None = None  # set for samplers that draw per-step noise
    steps: tuple[int, ...] = STEPS
    flow: bool = False
    # step counts / prediction types on which diffusers itself fails (raises or returns NaN)
    fails: tuple[int | str, ...] = ()


def run_diffusers(case: Case, prediction: str, n: int, x_T: np.ndarray, denoise, sched: Any = None) -> tuple:
    """The standard diffusers sampling loop (on ``sched``, or one built from the case); returns
    (latents, timesteps, init_noise_sigma)."""
    if sched is None:
        cfg = dict(case.config) if case.flow else {**SD_BETAS, **case.config, "prediction_type": prediction}
        sched = getattr(diffusers, case.scheduler)(**cfg)
    sched.set_timesteps(n, **{k: v for k, v in case.extra.items() if k in SET_KWARGS})
    step_kwargs = {k: v for k, v in case.extra.items() if k in STEP_KWARGS}
    if case.seed is not None:
        step_kwargs["generator"] = torch.Generator().manual_seed(case.seed)
    latents = torch.from_numpy(x_T) * getattr(sched, "init_noise_sigma", 1.0)
    for t in sched.timesteps:
        model_in = sched.scale_model_input(latents, t) if hasattr(sched, "scale_model_input") else latents
        out = torch.from_numpy(denoise(model_in.numpy(), float(t)))
        latents = sched.step(out, t, latents, **step_kwargs).prev_sample
    return latents.numpy(), sched.timesteps.numpy(), float(getattr(sched, "init_noise_sigma", 1.0))


def run_ours(case: Case, prediction: str, n: int, x_T: np.ndarray, denoise, **opts: Any) -> tuple:
    """Our sampler with only the case's options: the SD betas must come from get_sampler's defaults."""
    sampler = get_sampler(
        case.sampler, num_steps=n, prediction_type=prediction, **case.config, **case.extra, **opts
    )
    noise_fn = torch_noise_fn(case.seed) if case.seed is not None else None
    return sampler.sample(denoise, x_T, noise_fn=noise_fn), sampler


def assert_close(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == np.float32 and got.shape == ref.shape
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    max_err = np.abs(got - ref).max()
    scale = max(1.0, float(np.abs(ref).max()))
    assert rel <= TOL, f"relative L2 error {rel:.3g}"
    assert max_err <= TOL * scale, f"max abs error {max_err:.3g} at latent scale {scale:.3g}"


def check_case(case: Case, prediction: str, n: int) -> None:
    shape = FLOW_SHAPE if case.flow else SHAPE
    denoise, x_T = make_denoiser(shape), initial_noise(shape)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, ref_ts, init_noise_sigma = run_diffusers(case, prediction, n, x_T, denoise)
        diffusers_error = None if np.isfinite(ref).all() else "NaN latents"
    except Exception as exc:  # any diffusers failure means "unsupported combination"
        diffusers_error = repr(exc)
    expect_failure = n in case.fails or prediction in case.fails
    assert (diffusers_error is not None) == expect_failure, f"diffusers: {diffusers_error or 'ran'}"
    if diffusers_error is not None:
        with pytest.raises(SamplerError):
            run_ours(case, prediction, n, x_T, denoise)
        return
    got, sampler = run_ours(case, prediction, n, x_T, denoise)
    np.testing.assert_allclose(sampler.timesteps.astype(np.float64), ref_ts, rtol=1e-6, atol=1e-4)
    assert sampler.init_noise_sigma == pytest.approx(init_noise_sigma, rel=1e-6)
    assert_close(got, ref)


# ------------------------------------------------------------------------------------------------ matrices

# Every sampler with its default options, for every prediction type diffusers' scheduler knows.
DEFAULT_CASES = [
    Case("ddim", "ddim", "DDIMScheduler"),
    Case("ddim-eta1", "ddim", "DDIMScheduler", extra={"eta": 1.0}, seed=11),
    Case("ddpm", "ddpm", "DDPMScheduler", seed=12),
    Case("euler", "euler", "EulerDiscreteScheduler"),
    # diffusers' Euler-ancestral raises NotImplementedError for "sample": ours must raise SamplerError
    Case("euler-a", "euler-a", "EulerAncestralDiscreteScheduler", seed=13, fails=("sample",)),
    Case("heun", "heun", "HeunDiscreteScheduler"),
    Case("dpmpp-2m", "dpmpp-2m", "DPMSolverMultistepScheduler"),
    Case("dpmpp-2m-karras", "dpmpp-2m", "DPMSolverMultistepScheduler", config={"use_karras_sigmas": True}),
    Case("unipc", "unipc", "UniPCMultistepScheduler"),
    Case("lcm", "lcm", "LCMScheduler", seed=14),
    Case("flow-euler", "flow-euler", "FlowMatchEulerDiscreteScheduler", predictions=("flow",), flow=True),
    Case(
        "flow-euler-sd3",
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        config={"shift": 3.0},
        predictions=("flow",),
        flow=True,
    ),
]

# Non-default options that change the step math or the schedule.
OPTION_CASES = [
    Case(
        "ddim-trailing-zsnr",
        "ddim",
        "DDIMScheduler",
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        predictions=("v_prediction",),
    ),
    Case(
        "ddim-sd-config",
        "ddim",
        "DDIMScheduler",
        {"set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False},
        predictions=("epsilon",),
    ),
    Case(
        "ddim-eta-clipped",
        "ddim",
        "DDIMScheduler",
        {"timestep_spacing": "linspace"},
        {"eta": 0.5, "use_clipped_model_output": True},
        ("epsilon", "sample"),
        seed=3,
    ),
    Case(
        "ddpm-large-trailing",
        "ddpm",
        "DDPMScheduler",
        {"variance_type": "fixed_large", "timestep_spacing": "trailing"},
        predictions=("epsilon",),
        seed=4,
    ),
    Case(
        "ddpm-cosine-smalllog",
        "ddpm",
        "DDPMScheduler",
        {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_small_log"},
        predictions=("v_prediction",),
        seed=5,
    ),
    Case(
        "ddpm-sigmoid-linspace",
        "ddpm",
        "DDPMScheduler",
        {"beta_schedule": "sigmoid", "timestep_spacing": "linspace"},
        predictions=("epsilon",),
        seed=6,
    ),
    Case(
        "euler-leading",
        "euler",
        "EulerDiscreteScheduler",
        {"timestep_spacing": "leading", "steps_offset": 1},
        predictions=("epsilon",),
    ),
    Case(
        "euler-karras",
        "euler",
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True},
        predictions=("epsilon", "v_prediction"),
    ),
    Case(
        "euler-karras-minmax",
        "euler",
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0, "final_sigmas_type": "sigma_min"},
        predictions=("epsilon",),
    ),
    Case(
        "euler-continuous",
        "euler",
        "EulerDiscreteScheduler",
        {"timestep_type": "continuous"},
        predictions=("v_prediction",),
    ),
    # zero terminal SNR puts sigma_max = 4096: diffusers' float32 update x + (x - x0) / sigma * (0 - sigma)
    # then cancels ~4096-sized terms and is itself off by ~3e-4 at 1-4 steps; from 20 steps on it is within
    # 1e-5 of the float64 result.
    Case(
        "euler-trailing-zsnr",
        "euler",
        "EulerDiscreteScheduler",
        {"timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        predictions=("v_prediction",),
        steps=(20, 50),
    ),
    Case(
        "euler-a-leading",
        "euler-a",
        "EulerAncestralDiscreteScheduler",
        {"timestep_spacing": "leading", "steps_offset": 1},
        predictions=("epsilon",),
        seed=7,
    ),
    Case(
        "heun-karras",
        "heun",
        "HeunDiscreteScheduler",
        {"use_karras_sigmas": True},
        predictions=("epsilon", "v_prediction"),
    ),
    Case(
        "heun-clip-leading-exp",
        "heun",
        "HeunDiscreteScheduler",
        {"clip_sample": True, "timestep_spacing": "leading", "beta_schedule": "exp"},
        predictions=("sample", "epsilon"),
    ),
    Case(
        "dpmpp-3m", "dpmpp-2m", "DPMSolverMultistepScheduler", {"solver_order": 3}, predictions=("epsilon",)
    ),
    # diffusers returns NaN from 4 steps on (zero-length last step): ours must raise
    Case(
        "dpmpp-3m-karras-sigmamin",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {
            "solver_order": 3,
            "use_karras_sigmas": True,
            "lower_order_final": False,
            "final_sigmas_type": "sigma_min",
        },
        predictions=("epsilon",),
        fails=(4, 20, 50),
    ),
    Case(
        "dpmpp-2m-heun-trailing",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {"solver_type": "heun", "euler_at_final": True, "timestep_spacing": "trailing"},
        predictions=("v_prediction",),
    ),
    Case(
        "dpmpp-1-leading",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {"solver_order": 1, "timestep_spacing": "leading", "steps_offset": 1},
        predictions=("epsilon",),
    ),
    Case(
        "dpmpp-lambda-clip",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {"lambda_min_clipped": -3.0, "beta_schedule": "squaredcos_cap_v2"},
        predictions=("epsilon",),
    ),
    # diffusers crashes (its start index skips a repeated first timestep): ours must raise
    Case(
        "dpmpp-cosine-karras",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {"beta_schedule": "squaredcos_cap_v2", "use_karras_sigmas": True},
        predictions=("epsilon",),
        fails=(4, 20, 50),
    ),
    Case(
        "dpmpp-trailing-zsnr",
        "dpmpp-2m",
        "DPMSolverMultistepScheduler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        predictions=("v_prediction",),
    ),
    Case(
        "unipc-bh1-3",
        "unipc",
        "UniPCMultistepScheduler",
        {"solver_type": "bh1", "solver_order": 3, "final_sigmas_type": "sigma_min"},
        predictions=("epsilon", "sample"),
    ),
    # bh1 with the default zero final sigma gives NaN in diffusers: ours must raise
    Case(
        "unipc-bh1",
        "unipc",
        "UniPCMultistepScheduler",
        {"solver_type": "bh1"},
        predictions=("epsilon",),
        fails=STEPS,
    ),
    Case(
        "unipc-karras",
        "unipc",
        "UniPCMultistepScheduler",
        {"use_karras_sigmas": True},
        predictions=("epsilon",),
    ),
    Case(
        "unipc-karras-sigmamin",
        "unipc",
        "UniPCMultistepScheduler",
        {"use_karras_sigmas": True, "final_sigmas_type": "sigma_min", "sigma_min": 0.05},
        predictions=("epsilon",),
    ),
    Case(
        "unipc-eps-form",
        "unipc",
        "UniPCMultistepScheduler",
        {"predict_x0": False, "final_sigmas_type": "sigma_min"},
        predictions=("epsilon", "v_prediction"),
    ),
    # the eps form with a zero final sigma gives NaN in diffusers: ours must raise
    Case(
        "unipc-eps-form-zero",
        "unipc",
        "UniPCMultistepScheduler",
        {"predict_x0": False},
        predictions=("epsilon",),
        fails=STEPS,
    ),
    Case(
        "unipc-no-corrector",
        "unipc",
        "UniPCMultistepScheduler",
        {"disable_corrector": [0, 2], "timestep_spacing": "trailing", "solver_order": 3},
        predictions=("epsilon",),
    ),
    # no lower-order final step: NaN in diffusers from 4 steps on, ours must raise
    Case(
        "unipc-no-lower-final",
        "unipc",
        "UniPCMultistepScheduler",
        {"lower_order_final": False},
        predictions=("epsilon",),
        fails=(4, 20, 50),
    ),
    # 50 steps exceed original_inference_steps=20: diffusers raises, so must ours
    Case(
        "lcm-options",
        "lcm",
        "LCMScheduler",
        {
            "original_inference_steps": 20,
            "clip_sample": True,
            "timestep_scaling": 5.0,
            "set_alpha_to_one": False,
        },
        predictions=("epsilon",),
        seed=8,
        fails=(50,),
    ),
    Case(
        "flow-euler-dynamic",
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        {"use_dynamic_shifting": True, "shift_terminal": 0.1},
        {"mu": 0.8},
        predictions=("flow",),
        flow=True,
        fails=(1,),
    ),
    Case(
        "flow-euler-karras",
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        {"use_karras_sigmas": True, "shift": 2.0},
        predictions=("flow",),
        flow=True,
    ),
    Case(
        "flow-euler-inverted",
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        {"invert_sigmas": True},
        predictions=("flow",),
        flow=True,
    ),
    Case(
        "flow-euler-stochastic",
        "flow-euler",
        "FlowMatchEulerDiscreteScheduler",
        {"stochastic_sampling": True, "shift": 3.0},
        predictions=("flow",),
        flow=True,
        seed=9,
    ),
]


def _params(cases: list[Case]) -> list:
    return [
        pytest.param(case, pred, n, id=f"{case.id}-{pred}-{n}")
        for case in cases
        for pred in case.predictions
        for n in case.steps
    ]


@pytest.mark.parametrize(("case", "prediction", "n"), _params(DEFAULT_CASES))
def test_matches_diffusers(case: Case, prediction: str, n: int) -> None:
    check_case(case, prediction, n)


@pytest.mark.parametrize(("case", "prediction", "n"), _params(OPTION_CASES))
def test_matches_diffusers_with_options(case: Case, prediction: str, n: int) -> None:
    check_case(case, prediction, n)


def test_every_sampler_is_covered() -> None:
    assert {c.sampler for c in DEFAULT_CASES} == set(list_samplers())


# ------------------------------------------------------------------------------------ from_diffusers_config


def _diffusers_scheduler(case: Case, prediction: str):
    cfg = dict(case.config) if case.flow else {**SD_BETAS, **case.config, "prediction_type": prediction}
    return getattr(diffusers, case.scheduler)(**cfg)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in DEFAULT_CASES + OPTION_CASES[:3]])
def test_from_diffusers_config(case: Case) -> None:
    """``scheduler.config`` (and its JSON form) builds a sampler equal to that scheduler."""
    prediction = "v_prediction" if "v_prediction" in case.predictions else case.predictions[0]
    sched = _diffusers_scheduler(case, prediction)
    # every key diffusers writes to this scheduler's config is understood (none silently ignored)
    sampler_cls = type(get_sampler(case.sampler, num_steps=1, prediction_type=prediction))
    assert {k for k in sched.config if not k.startswith("_")} <= {
        *sampler_cls.option_names(),
        "prediction_type",
    }
    n = 20
    denoise = make_denoiser(FLOW_SHAPE if case.flow else SHAPE)
    x_T = initial_noise(FLOW_SHAPE if case.flow else SHAPE)
    ref, _, _ = run_diffusers(case, prediction, n, x_T, denoise)
    json_config = json.loads(sched.to_json_string())  # a scheduler_config.json, with _class_name
    for sampler in (
        Sampler.from_diffusers_config(case.sampler, dict(sched.config), n, **case.extra),
        Sampler.from_diffusers_config(None, json_config, n, **case.extra),
    ):
        assert sampler.name == case.sampler and sampler.prediction_type == prediction
        noise_fn = torch_noise_fn(case.seed) if case.seed is not None else None
        assert_close(sampler.sample(denoise, x_T, noise_fn=noise_fn), ref)


def test_from_config_of_another_scheduler_ignores_foreign_keys() -> None:
    """A Stable Diffusion 1.5 scheduler_config.json (a PNDM config) loaded as DDIM, as pipelines do."""
    sd15 = {
        "_class_name": "PNDMScheduler",
        "_diffusers_version": "0.6.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "trained_betas": None,
        "clip_sample": False,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.DDIMScheduler.from_config(sd15)
    case = Case("sd15", "ddim", "DDIMScheduler")
    denoise, x_T = make_denoiser(SHAPE), initial_noise(SHAPE)
    ref, _, _ = run_diffusers(case, "epsilon", 25, x_T, denoise, sched=sched)
    ours = Sampler.from_diffusers_config("ddim", sd15, 25)
    assert ours.options["steps_offset"] == 1 and ours.options["clip_sample"] is False
    assert_close(ours.sample(denoise, x_T), ref)
    with pytest.raises(SamplerError, match="cannot infer"):
        Sampler.from_diffusers_config(None, sd15, 25)


def test_from_diffusers_config_rejects_unsupported_values() -> None:
    cfg = dict(diffusers.DDIMScheduler(thresholding=True).config)
    with pytest.raises(SamplerError, match="thresholding"):
        Sampler.from_diffusers_config("ddim", cfg, 10)
    cfg = dict(diffusers.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++").config)
    with pytest.raises(SamplerError, match="algorithm_type"):
        Sampler.from_diffusers_config("dpmpp-2m", cfg, 10)
    cfg = dict(diffusers.DPMSolverMultistepScheduler(prediction_type="flow_prediction").config)
    with pytest.raises(SamplerError, match="flow"):
        Sampler.from_diffusers_config("dpmpp-2m", cfg, 10)


def test_defaults_follow_stable_diffusion_betas_and_diffusers_options() -> None:
    for name in list_samplers():
        sampler = get_sampler(
            name, num_steps=10, prediction_type="flow" if name == "flow-euler" else "epsilon"
        )
        if name != "flow-euler":
            assert {k: sampler.options[k] for k in SD_BETAS} == SD_BETAS
    assert get_sampler("ddim", num_steps=10).options["clip_sample"] is True  # diffusers' DDIM default
    assert get_sampler("euler", num_steps=10).options["timestep_spacing"] == "linspace"
    # a config dict lacking keys gets the diffusers scheduler's own defaults, as diffusers' from_config does
    partial = Sampler.from_diffusers_config("ddim", {"_class_name": "DDIMScheduler", "steps_offset": 1}, 10)
    assert partial.options["beta_schedule"] == "linear" and partial.options["steps_offset"] == 1


# --------------------------------------------------------------------------------------------- error paths


def test_list_samplers() -> None:
    assert list_samplers() == sorted(
        ["ddim", "ddpm", "euler", "euler-a", "heun", "dpmpp-2m", "unipc", "lcm", "flow-euler"]
    )


def test_unknown_sampler_lists_valid_names() -> None:
    with pytest.raises(SamplerError) as info:
        get_sampler("dpm++", num_steps=10)
    assert isinstance(info.value, ValueError)
    for name in list_samplers():
        assert name in str(info.value)


@pytest.mark.parametrize("name", ["ddim", "euler", "heun", "dpmpp-2m", "unipc", "lcm", "flow-euler"])
@pytest.mark.parametrize("steps", [0, -3, 2.5, True])
def test_bad_step_count(name: str, steps: Any) -> None:
    pred = "flow" if name == "flow-euler" else "epsilon"
    with pytest.raises(SamplerError, match="num_steps"):
        get_sampler(name, num_steps=steps, prediction_type=pred)


def test_too_many_steps_like_diffusers() -> None:
    with pytest.raises(ValueError):
        diffusers.DDIMScheduler().set_timesteps(1001)
    with pytest.raises(SamplerError, match="exceeds"):
        get_sampler("ddim", num_steps=1001)
    with pytest.raises(SamplerError, match="original_inference_steps"):
        get_sampler("lcm", num_steps=51)
    # num_steps == num_train_timesteps repeats a solver timestep: diffusers' DPM-Solver++ returns NaN there
    with pytest.raises(SamplerError, match="repeats"):
        get_sampler("dpmpp-2m", num_steps=1000)


def test_flow_and_diffusion_prediction_types_do_not_mix() -> None:
    with pytest.raises(SamplerError, match="flow-euler"):
        get_sampler("flow-euler", num_steps=10)  # default prediction type is epsilon
    with pytest.raises(SamplerError):
        get_sampler("flow-euler", num_steps=10, prediction_type="v_prediction")
    with pytest.raises(SamplerError, match="flow-euler"):
        get_sampler("euler", num_steps=10, prediction_type="flow")
    with pytest.raises(SamplerError):
        get_sampler("ddim", num_steps=10, prediction_type="velocity")
    with pytest.raises(SamplerError, match="use_dynamic_shifting"):
        get_sampler("flow-euler", num_steps=10, prediction_type="flow", use_dynamic_shifting=True)


def test_unknown_and_unsupported_options() -> None:
    with pytest.raises(SamplerError, match="valid options"):
        get_sampler("euler", num_steps=10, karas=True)
    with pytest.raises(SamplerError, match="eta"):
        get_sampler("euler", num_steps=10, eta=1.0)  # eta is a DDIM option
    with pytest.raises(SamplerError, match="use_exponential_sigmas"):
        get_sampler("euler", num_steps=10, use_exponential_sigmas=True)
    with pytest.raises(SamplerError, match="timestep_spacing"):
        get_sampler("ddim", num_steps=10, timestep_spacing="uniform")
    with pytest.raises(SamplerError, match="eta"):
        get_sampler("ddim", num_steps=10, eta=-1.0)
    assert get_sampler("dpmpp-2m", num_steps=10, karras=True).options["use_karras_sigmas"] is True


def test_latent_validation() -> None:
    sampler = get_sampler("euler", num_steps=4)
    x = initial_noise(SHAPE)
    with pytest.raises(SamplerError, match="float"):
        sampler.step(np.zeros(SHAPE, np.int32), 0, x)
    with pytest.raises(SamplerError, match="numpy"):
        sampler.step(torch.zeros(SHAPE), 0, x)
    with pytest.raises(SamplerError, match="batched"):
        sampler.scale_model_input(np.zeros(8, np.float32), 0)
    with pytest.raises(SamplerError, match="shape"):
        sampler.step(np.zeros((1, 8, 8, 8), np.float32), 0, x)  # e.g. a learned-variance 2C output
    with pytest.raises(SamplerError, match="step index"):
        sampler.step(x, 4, x)
    # float16/float64 latents are accepted; latents always come back as float32
    out = sampler.step(x.astype(np.float16), 0, x.astype(np.float64))
    assert out.dtype == np.float32 and out.shape == SHAPE
    # a stochastic step without noise, or with noise of the wrong shape
    ancestral = get_sampler("euler-a", num_steps=4)
    with pytest.raises(SamplerError, match="noise"):
        ancestral.step(x, 0, x)
    with pytest.raises(SamplerError, match="noise shape"):
        ancestral.step(x, 0, x, np.zeros((1, 4, 4, 4), np.float32))


def test_multistep_state_and_order() -> None:
    x = initial_noise(SHAPE)
    for name in ("dpmpp-2m", "unipc", "heun"):
        sampler = get_sampler(name, num_steps=5)
        sampler.step(x, 0, x)
        with pytest.raises(SamplerError, match="expected step 1"):
            sampler.step(x, 2, x)
        sampler.step(x, 1, x)
        with pytest.raises(SamplerError, match="shape changed"):
            sampler.step(x[:, :2], 2, x[:, :2])


@pytest.mark.parametrize("name", ["dpmpp-2m", "unipc", "heun", "euler"])
def test_reuse_gives_same_result_and_manual_loop(name: str) -> None:
    """sample() resets the history; a hand-written loop over step() gives the same latents."""
    sampler = (
        get_sampler(name, num_steps=8, karras=True) if name != "unipc" else get_sampler(name, num_steps=8)
    )
    denoise, x_T = make_denoiser(SHAPE), initial_noise(SHAPE)
    first = sampler.sample(denoise, x_T)
    assert np.array_equal(sampler.sample(denoise, x_T), first)
    x = x_T * np.float32(sampler.init_noise_sigma)
    for i, t in enumerate(sampler.timesteps):
        x = sampler.step(denoise(sampler.scale_model_input(x, i), float(t)), i, x)
    assert np.array_equal(x, first)
    seen = []
    sampler.sample(denoise, x_T, callback=lambda i, lat: seen.append((i, lat.dtype)))
    assert seen == [(i, np.float32) for i in range(sampler.num_model_evals)]
    if name == "heun":
        assert sampler.num_model_evals == 2 * 8 - 1


@pytest.mark.parametrize("name", ["heun", "unipc", "dpmpp-2m"])
def test_steps_do_not_keep_references_to_caller_arrays(name: str) -> None:
    """A pipeline may modify its latent buffer in place between steps (e.g. inpainting masks)."""
    sampler = get_sampler(name, num_steps=6)
    denoise, x_T = make_denoiser(SHAPE), initial_noise(SHAPE)
    expected = sampler.sample(denoise, x_T)
    buffer = x_T * np.float32(sampler.init_noise_sigma)
    for i, t in enumerate(sampler.timesteps):
        out = denoise(sampler.scale_model_input(buffer, i), float(t))
        new = sampler.step(out, i, buffer)
        buffer[...] = new  # overwrite the array the sampler was given
    assert np.array_equal(buffer, expected)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("ddim", {"eta": 1.0}),
        ("ddpm", {}),
        ("euler-a", {}),
        ("lcm", {}),
        ("flow-euler", {"stochastic_sampling": True, "prediction_type": "flow"}),
    ],
)
def test_seeded_stochastic_runs_are_reproducible(name: str, opts: dict) -> None:
    shape = FLOW_SHAPE if name == "flow-euler" else SHAPE
    sampler = get_sampler(name, num_steps=6, **opts)
    assert sampler.needs_noise
    denoise, x_T = make_denoiser(shape), initial_noise(shape)
    a = sampler.sample(denoise, x_T, rng=np.random.default_rng(123))
    b = sampler.sample(denoise, x_T, rng=np.random.default_rng(123))
    c = sampler.sample(denoise, x_T, rng=np.random.default_rng(124))
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    drawn = []
    sampler.sample(denoise, x_T, noise_fn=lambda s, i: drawn.append(i) or np.zeros(s, np.float32))
    assert drawn == [i for i in range(sampler.num_model_evals) if sampler.step_needs_noise(i)]


def test_deterministic_samplers_draw_no_noise() -> None:
    for name in ("ddim", "euler", "heun", "dpmpp-2m", "unipc"):
        sampler = get_sampler(name, num_steps=5)
        assert not sampler.needs_noise

        def fail(shape: tuple, i: int) -> np.ndarray:
            raise AssertionError("noise drawn")

        sampler.sample(make_denoiser(SHAPE), initial_noise(SHAPE), noise_fn=fail)


def test_import_is_torch_free() -> None:
    code = (
        "import sys, edgediff.runtime.samplers as s; "
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, sorted(sys.modules); "
        "print(len(s.list_samplers()))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(len(list_samplers()))
