"""Torch-free samplers of the edgediff runtime: numpy re-implementations of diffusers' schedulers that give
the same latents step for step (see ``tests/runtime/test_samplers.py``).

>>> from edgediff.runtime.samplers import get_sampler
>>> s = get_sampler("dpmpp-2m", num_steps=20, karras=True)
>>> latents = s.sample(denoise, x_T, rng=np.random.default_rng(0))  # doctest: +SKIP

Only numpy and the standard library are imported here, so the runtime runs where torch is not installed.
"""

from __future__ import annotations

from . import ddim, ddpm, dpm_solver, euler, flow, heun, lcm, unipc  # noqa: F401  (register the samplers)
from .base import Sampler, SamplerError, get_sampler, list_samplers
from .ddim import DDIMSampler
from .ddpm import DDPMSampler
from .dpm_solver import DPMSolverPPSampler
from .euler import EulerAncestralSampler, EulerSampler
from .flow import FlowEulerSampler
from .heun import HeunSampler
from .lcm import LCMSampler
from .unipc import UniPCSampler

__all__ = [
    "DDIMSampler",
    "DDPMSampler",
    "DPMSolverPPSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "FlowEulerSampler",
    "HeunSampler",
    "LCMSampler",
    "Sampler",
    "SamplerError",
    "UniPCSampler",
    "get_sampler",
    "list_samplers",
]
