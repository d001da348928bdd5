"""Sampler base class, option handling, the registry and the generic sampling loop.

A :class:`Sampler` is a diffusers scheduler re-expressed over numpy: all schedule-dependent numbers are
computed once in :meth:`Sampler.set_steps` (in float64, or with diffusers' float32 rounding where that
matters) and stored as float32 per-step coefficients, so :meth:`Sampler.step` is a handful of float32 array
operations on the latents - the precision diffusers' own loop uses for them. Latents come back as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar

import numpy as np

from edgediff.errors import EdgediffError

from . import schedule as sch


class SamplerError(EdgediffError, ValueError):
    """Bad sampler request: unknown name, steps < 1, unsupported option or prediction type, bad latents."""


# Diffusion (non-flow) samplers default to Stable Diffusion's training schedule; every other option defaults
# to the value the matching diffusers scheduler uses.
RUNTIME_BETA_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# Option spellings accepted by get_sampler besides the diffusers config names.
ALIASES: dict[str, str] = {"karras": "use_karras_sigmas"}

# diffusers calls "sample" prediction "original_sample" in older configs and flow models "flow_prediction".
_PREDICTION_ALIASES = {"original_sample": "sample", "flow_prediction": "flow"}

_REGISTRY: dict[str, type[Sampler]] = {}

NoiseFn = Callable[[tuple, int], np.ndarray]


def register(cls: type[Sampler]) -> type[Sampler]:
    """Class decorator: make ``cls`` available to :func:`get_sampler` under ``cls.name``."""
    _REGISTRY[cls.name] = cls
    return cls


def list_samplers() -> list[str]:
    """Registry names of all samplers, sorted."""
    return sorted(_REGISTRY)


def _lookup(name: str) -> type[Sampler]:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise SamplerError(
            f"unknown sampler {name!r}; valid samplers: {', '.join(list_samplers())}"
        ) from None


def get_sampler(name: str, *, num_steps: int, prediction_type: str = "epsilon", **schedule: Any) -> Sampler:
    """Build the sampler ``name`` for ``num_steps`` steps.

    ``schedule`` takes diffusers' config names (``beta_schedule``, ``timestep_spacing``, ``steps_offset``,
    ``use_karras_sigmas`` (alias ``karras``), ``shift`` ...) plus the step options ``eta`` (ddim) and ``mu``
    (flow-euler with dynamic shifting). Unknown or unsupported options raise :class:`SamplerError`.
    """
    return _lookup(name)(num_steps, prediction_type=prediction_type, **schedule)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a or []) == list(b or [])
    return a == b


class Sampler:
    """Base class: a diffusers-equivalent sampler over numpy arrays.

    Subclasses set the class attributes below and implement :meth:`_build` (precompute everything for a step
    count) and :meth:`step`. The loop in :meth:`sample` is the one of a diffusers pipeline:
    ``x = x_T * init_noise_sigma``; for each model evaluation ``i``:
    ``x = step(denoise(scale_model_input(x, i), timesteps[i]), i, x, noise)``.
    """

    #: registry name
    name: ClassVar[str] = ""
    #: the diffusers scheduler this sampler reproduces
    diffusers_class: ClassVar[str] = ""
    #: model parameterisations the sampler accepts
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")
    #: supported diffusers config keys with diffusers' own defaults
    defaults: ClassVar[dict[str, Any]] = {}
    #: diffusers config keys supported only at the given (default) value
    fixed: ClassVar[dict[str, Any]] = {}
    #: allowed values of enumerated options
    choices: ClassVar[dict[str, tuple]] = {}
    #: options that are not diffusers config keys (step arguments such as DDIM's eta), with defaults
    extra_options: ClassVar[dict[str, Any]] = {}
    #: True when steps depend on earlier steps (must run in order; reset() clears the state)
    stateful: ClassVar[bool] = False
    #: diffusers locates the first step by timestep value (a repeated first timestep breaks it)
    indexes_by_timestep: ClassVar[bool] = True

    num_steps: int
    prediction_type: str
    timesteps: np.ndarray
    init_noise_sigma: float
    needs_noise: bool = False

    def __init__(self, num_steps: int, prediction_type: str = "epsilon", **schedule: Any) -> None:
        opts = self._base_options(runtime=True)
        opts.update(self._checked_overrides(schedule))
        self._setup(num_steps, prediction_type, opts)

    # ----------------------------------------------------------------------------------------------- options

    @classmethod
    def _base_options(cls, *, runtime: bool) -> dict[str, Any]:
        opts = dict(cls.defaults)
        if runtime:
            opts.update({k: v for k, v in RUNTIME_BETA_DEFAULTS.items() if k in opts})
        opts.update(cls.extra_options)
        return opts

    @classmethod
    def option_names(cls) -> list[str]:
        """Options accepted by get_sampler (diffusers config names and step options)."""
        return sorted({*cls.defaults, *cls.extra_options, *cls.fixed})

    @classmethod
    def _checked_overrides(cls, schedule: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        valid = set(cls.option_names())
        for key, value in schedule.items():
            key = ALIASES.get(key, key) if ALIASES.get(key) in valid else key
            if key not in valid:
                raise SamplerError(
                    f"sampler {cls.name!r} has no option {key!r}; "
                    f"valid options: {', '.join(cls.option_names())}"
                )
            out[key] = value
        return out

    def _setup(self, num_steps: int, prediction_type: str, opts: dict[str, Any]) -> None:
        cls = type(self)
        for key, allowed in cls.fixed.items():
            if key in opts and not _same(opts[key], allowed):
                raise SamplerError(
                    f"{cls.name}: option {key}={opts[key]!r} is not supported by the numpy runtime "
                    f"(only {allowed!r})"
                )
            opts.pop(key, None)
        for key, allowed in cls.choices.items():
            if opts.get(key) not in allowed:
                raise SamplerError(f"{cls.name}: {key} must be one of {allowed}, got {opts.get(key)!r}")
        prediction_type = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
        if prediction_type not in cls.prediction_types:
            hint = ""
            if prediction_type == "flow":
                hint = "; flow-matching models need the 'flow-euler' sampler"
            elif "flow" in cls.prediction_types:
                hint = "; diffusion (epsilon/v/sample) models need a diffusion sampler such as 'euler'"
            raise SamplerError(
                f"sampler {cls.name!r} does not support prediction_type={prediction_type!r} "
                f"(supported: {', '.join(cls.prediction_types)}){hint}"
            )
        self.name = cls.name
        self.prediction_type = prediction_type
        self.options: Mapping[str, Any] = MappingProxyType(opts)
        self.set_steps(num_steps)

    @classmethod
    def from_diffusers_config(
        cls, name: str | None, config: Mapping[str, Any], num_steps: int, **overrides: Any
    ) -> Sampler:
        """Build a sampler from a diffusers ``scheduler_config.json`` dict (or ``scheduler.config``).

        ``name`` picks the sampler (``None``: this class when called on a subclass, else inferred from
        ``config['_class_name']``, as written in ``scheduler_config.json``). Missing keys take the
        diffusers scheduler's defaults; keys the scheduler does not know are ignored (as diffusers does), keys
        it knows but the runtime does not implement must hold their default value. ``overrides`` are
        get_sampler options (e.g. ``eta=1.0``, ``mu=...``) applied on top.
        """
        if name is None and cls.name:
            target = cls
        elif name is None:
            cls_name = config.get("_class_name")
            matches = [c for c in _REGISTRY.values() if c.diffusers_class == cls_name]
            if len(matches) != 1:
                raise SamplerError(
                    f"cannot infer the sampler from _class_name={cls_name!r}; pass one of {list_samplers()}"
                )
            target = matches[0]
        else:
            target = _lookup(name)
        opts = target._base_options(runtime=False)
        known = {*target.defaults, *target.fixed}
        for key, value in config.items():
            if key in known:
                opts[key] = value
        prediction_type = config.get("prediction_type", target.prediction_types[0])
        overrides = dict(overrides)
        prediction_type = overrides.pop("prediction_type", prediction_type)
        opts.update(target._checked_overrides(overrides))
        obj = target.__new__(target)
        obj._setup(num_steps, prediction_type, opts)
        return obj

    # ------------------------------------------------------------------------------------------ step count

    def set_steps(self, num_steps: int) -> None:
        """Precompute timesteps and all per-step coefficients for ``num_steps`` steps, then reset()."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)):
            raise SamplerError(f"num_steps must be an integer, got {num_steps!r}")
        if num_steps < 1:
            raise SamplerError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = int(num_steps)
        try:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                self._build(self.num_steps)
        except sch.ScheduleError as exc:
            raise SamplerError(f"{self.name}: {exc}") from None
        self._check_schedule()
        self.reset()

    def _check_schedule(self) -> None:
        # Refuse schedules on which diffusers fails (raises or produces NaN) instead of returning other
        # numbers.
        tables = [self.timesteps, getattr(self, "sigmas", np.zeros(1))]
        if not all(np.isfinite(np.asarray(t, dtype=np.float64)).all() for t in tables):
            raise SamplerError(
                f"{self.name}: options give a non-finite schedule for num_steps={self.num_steps}"
            )
        if self.indexes_by_timestep and np.count_nonzero(self.timesteps == self.timesteps[0]) > 1:
            # diffusers finds its start index by timestep value and takes the 2nd match: it would skip step 0
            raise SamplerError(
                f"{self.name}: the first timestep {self.timesteps[0]} repeats for num_steps={self.num_steps}"
            )

    def _build(self, num_steps: int) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the state of a previous trajectory (multistep history, Heun's half step)."""
        self._next_index = 0
        self._shape: tuple | None = None

    @property
    def num_model_evals(self) -> int:
        """Model evaluations per sample (len(timesteps); 2 per step for Heun except the last)."""
        return len(self.timesteps)

    def alphas_cumprod(self, *, finite_sigma: bool = False) -> np.ndarray:
        """float32 training alpha_bar of this sampler's beta options.

        ``finite_sigma``: with zero-terminal-SNR betas the last alpha_bar is 0; the sigma-based schedulers of
        diffusers replace it by 2^-24 so that sigma_max (= 4096) stays finite.
        """
        o = self.options
        zero_snr = bool(o.get("rescale_betas_zero_snr", False))
        ac = sch.alphas_cumprod(
            int(o["num_train_timesteps"]),
            float(o["beta_start"]),
            float(o["beta_end"]),
            o["beta_schedule"],
            o.get("trained_betas"),
            zero_snr,
        )
        if finite_sigma and zero_snr:
            ac[-1] = np.float32(2.0**-24)
        return ac

    def _spaced_timesteps(self, num_steps: int) -> np.ndarray:
        """DDIM/DDPM inference timesteps (rounded, int64); refuses what diffusers refuses (num_steps > T)."""
        o = self.options
        T = int(o["num_train_timesteps"])
        if num_steps > T:
            raise SamplerError(f"{self.name}: num_steps={num_steps} exceeds num_train_timesteps={T}")
        ts = sch.spaced_timesteps(o["timestep_spacing"], T, num_steps, int(o["steps_offset"]))
        if ts.max() >= T or ts.min() < 0:
            raise SamplerError(f"{self.name}: timesteps {ts.tolist()} fall outside [0, {T})")
        return ts

    # -------------------------------------------------------------------------------------------- stepping

    def step_needs_noise(self, i: int) -> bool:
        """Whether :meth:`step` ``i`` consumes fresh Gaussian noise (the loop draws it only then)."""
        return self.needs_noise

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        """The latent the model sees at evaluation ``i`` (identity unless the sampler works in VE space)."""
        self._check_index(i)
        return np.asarray(self._latent(x), dtype=np.float32)

    def step(
        self, model_output: np.ndarray, i: int, x: np.ndarray, noise: np.ndarray | None = None
    ) -> np.ndarray:  # pragma: no cover - abstract
        """Advance the latent ``x`` by model evaluation ``i`` given the model output; returns float32."""
        raise NotImplementedError

    def sample(
        self,
        denoise: Callable[[np.ndarray, float], np.ndarray],
        x_T: np.ndarray,
        rng: np.random.Generator | None = None,
        noise_fn: NoiseFn | None = None,
        callback: Callable[[int, np.ndarray], None] | None = None,
    ) -> np.ndarray:
        """Run the whole sampler loop from initial noise ``x_T`` (unit Gaussian); returns float32 latents.

        Per-step noise comes from ``noise_fn(shape, i)`` if given, else ``rng.standard_normal`` (float32), and
        is drawn only for steps that use it, so a seeded run is reproducible.
        """
        x = self._latent(x_T).astype(np.float32, copy=False) * np.float32(self.init_noise_sigma)
        self.reset()
        if rng is None and noise_fn is None and self.needs_noise:
            rng = np.random.default_rng()
        for i, t in enumerate(self.timesteps):
            out = denoise(self.scale_model_input(x, i), float(t))
            noise = None
            if self.step_needs_noise(i):
                noise = (
                    noise_fn(x.shape, i) if noise_fn is not None else rng.standard_normal(x.shape, np.float32)
                )
            x = self.step(out, i, x, noise)
            if callback is not None:
                callback(i, x)
        return x

    # ------------------------------------------------------------------------------------- shared helpers

    def _check_index(self, i: int) -> int:
        n = len(self.timesteps)
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n:
            raise SamplerError(f"{self.name}: step index must be an int in [0, {n}), got {i!r}")
        return int(i)

    def _latent(self, x: Any, what: str = "latent") -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise SamplerError(f"{self.name}: {what} must be a numpy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise SamplerError(f"{self.name}: {what} must be a float16/32/64 array, got dtype {x.dtype}")
        if x.ndim < 2:
            raise SamplerError(f"{self.name}: {what} must be batched (ndim >= 2), got shape {x.shape}")
        return x

    def _begin(self, model_output: np.ndarray, i: int, x: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """Validate one step's inputs; return (i, x, model_output) as float32 arrays."""
        i = self._check_index(i)
        x = self._latent(x)
        model_output = self._latent(model_output, "model output")
        if model_output.shape != x.shape:
            raise SamplerError(
                f"{self.name}: model output shape {model_output.shape} != latent shape {x.shape}"
            )
        if self.stateful:
            if i == 0:
                self.reset()
            elif i != self._next_index:
                raise SamplerError(
                    f"{self.name} is a multistep sampler: expected step {self._next_index}, got {i} "
                    "(call reset() to start over)"
                )
            elif x.shape != self._shape:
                raise SamplerError(f"{self.name}: latent shape changed from {self._shape} to {x.shape}")
            self._next_index = i + 1
            self._shape = x.shape
        return i, x.astype(np.float32, copy=False), model_output.astype(np.float32, copy=False)

    def _noise(self, noise: np.ndarray | None, i: int, shape: tuple) -> np.ndarray:
        if noise is None:
            raise SamplerError(f"{self.name}: step {i} needs a noise array (see step_needs_noise)")
        noise = self._latent(noise, "noise")
        if noise.shape != shape:
            raise SamplerError(f"{self.name}: noise shape {noise.shape} != latent shape {shape}")
        return noise.astype(np.float32, copy=False)

    @staticmethod
    def _clip(x0: np.ndarray, enabled: bool, limit: float) -> np.ndarray:
        # diffusers' clip_sample: clamp the predicted x0 to [-limit, limit] (pixel-space DDPM convention).
        return np.clip(x0, -limit, limit, out=x0) if enabled else x0

    @staticmethod
    def _out(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        cls = type(self).__name__
        return f"<{cls} {self.name!r} steps={self.num_steps} prediction={self.prediction_type!r}>"


def f32(*arrays: Any) -> tuple[np.ndarray, ...]:
    """Per-step coefficient tables as float32: indexing them gives float32 scalars, so the latent arithmetic
    in step() stays float32 (a float64 scalar would promote every product to float64 under NEP 50)."""
    return tuple(np.asarray(a, dtype=np.float32) for a in arrays)


def train_options(
    beta_start: float = 0.0001, beta_end: float = 0.02, beta_schedule: str = "linear", zero_snr: bool = True
) -> dict[str, Any]:
    """diffusers config keys of the training (beta) schedule, with a scheduler's defaults."""
    opts: dict[str, Any] = {
        "num_train_timesteps": 1000,
        "beta_start": beta_start,
        "beta_end": beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": None,
    }
    if zero_snr:
        opts["rescale_betas_zero_snr"] = False
    return opts


# diffusers' dynamic thresholding (Saharia et al. 2022) is for pixel-space models and is not implemented: the
# switch must stay off, its two parameters are accepted and have no effect.
THRESHOLDING_FIXED: dict[str, Any] = {"thresholding": False}
THRESHOLDING_IGNORED: dict[str, Any] = {"dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0}

STANDARD_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
