"""Text-to-image generation on compiled artifacts: the sampler loop, classifier-free guidance, VAE decode.

Torch-free: numpy, the TVM runtime and the standard library. A pipeline is a compiled denoiser (UNet or
transformer), optionally a compiled VAE decoder, and conditioning given as arrays (prompt embeddings, class
labels) or as prompt text when it also has a compiled CLIP text encoder and its tokenizer. Everything a run
depends on is in its arguments, so a seeded run is bit-reproducible.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import EdgediffError, InputError
from edgediff.runtime.artifact import CompiledModule, resolutions_text
from edgediff.runtime.conditioning import PromptConditioner, load_conditioner, read_conditioning
from edgediff.runtime.image import to_uint8_image
from edgediff.runtime.memory import (
    MemoryPlan,
    default_overlap,
    make_plan,
    parse_bytes,
    peak_rss,
    tiled_decode,
)
from edgediff.runtime.samplers import Sampler, SamplerError, get_sampler
from edgediff.runtime.tokenizer import CLIPTokenizer

# Inputs every denoiser has; all its other inputs are conditioning.
SAMPLE_INPUT = "sample"
TIMESTEP_INPUT = "timestep"
ARTIFACT_SET_ROLES = ("denoiser", "decoder", "text_encoder")
TOKENIZER_DIR = "tokenizer"  # in an artifact set: the text encoder's tokenizer folder, copied as is
TILE_DECODER_DIR = "decoder_tile"  # in an artifact set: the decoder compiled for one latent tile


@dataclass
class Timings:
    """Wall-clock seconds per stage; ``model`` is the part of each step spent inside the compiled denoiser."""

    text_encoder: float = 0.0
    steps: list[float] = field(default_factory=list)
    model: list[float] = field(default_factory=list)
    decoder: float = 0.0
    total: float = 0.0

    @property
    def runtime_overhead(self) -> float:
        """Fraction of the step time spent outside the compiled denoiser (sampler math, copies, CFG)."""
        steps = sum(self.steps)
        return (steps - sum(self.model)) / steps if steps else 0.0

    def summary(self) -> str:
        lines = []
        if self.text_encoder:
            lines.append(f"text encoder  {1e3 * self.text_encoder:9.2f} ms")
        if self.steps:
            per_step = np.asarray(self.steps) * 1e3
            lines.append(
                f"denoiser      {per_step.sum():9.2f} ms for {len(per_step)} steps "
                f"(median {np.median(per_step):.2f} ms, min {per_step.min():.2f}, max {per_step.max():.2f})"
            )
            lines.append(
                f"  runtime overhead {100 * self.runtime_overhead:.2f}% of step time (outside the model)"
            )
        if self.decoder:
            lines.append(f"decoder       {1e3 * self.decoder:9.2f} ms")
        lines.append(f"total         {1e3 * self.total:9.2f} ms")
        return "\n".join(lines)


@dataclass
class Generation:
    """The result of one run: final latents, the decoded image (HWC uint8, if a decoder ran) and timings."""

    latents: np.ndarray
    image: np.ndarray | None
    timings: Timings
    memory_plan: MemoryPlan | None = None  # the plan a memory-capped run followed
    peak_rss: int = 0  # the process's peak resident set size at the end of the run (bytes)


class Pipeline:
    """A compiled denoiser (+ decoder, + text encoder and tokenizer) driven by one of the numpy samplers."""

    def __init__(
        self,
        denoiser: CompiledModule,
        decoder: CompiledModule | None = None,
        text_encoder: CompiledModule | None = None,
        tokenizer: CLIPTokenizer | None = None,
        *,
        tile_decoder: CompiledModule | None = None,
        max_memory: int | str | None = None,
        conditioner: PromptConditioner | None = None,
    ) -> None:
        self.denoiser = denoiser
        # SDXL / PixArt / SANA: the text encoders and how prompts become the denoiser's conditioning
        self.conditioner = conditioner
        self.decoder = decoder
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.tile_decoder = tile_decoder
        names = [info.name for info in denoiser.inputs]
        if names[:2] != [SAMPLE_INPUT, TIMESTEP_INPUT]:
            raise InputError(
                f"{denoiser.path}: a denoiser's first inputs must be ({SAMPLE_INPUT}, {TIMESTEP_INPUT}), "
                f"got {names}"
            )
        self.meta: dict[str, Any] = dict(denoiser.manifest["model"].get("meta") or {})
        self.prediction_type = self.meta.get("prediction_type") or "epsilon"
        self.conditioning = denoiser.inputs[2:]
        sample = denoiser.inputs[0]
        self.batch = sample.shape[0]
        self.latent_shape = (1, *sample.shape[1:])
        if self.batch not in (1, 2):
            raise InputError(
                f"{denoiser.path}: denoiser compiled for batch {self.batch}; use 1, or 2 for CFG"
            )
        if decoder is not None and decoder.entry_for_shape(self.latent_shape) is None:
            expected = tuple(decoder.inputs[0].shape)
            raise InputError(
                f"decoder {decoder.path} takes latents {list(expected)}, "
                f"the denoiser produces {list(self.latent_shape)}"
            )
        if tile_decoder is not None:
            tile = tuple(tile_decoder.inputs[0].shape)
            if (
                tile[:2] != self.latent_shape[:2]
                or tile[2] != tile[3]
                or tile[2] > min(self.latent_shape[2:])
            ):
                raise InputError(
                    f"tile decoder {tile_decoder.path} takes latents {list(tile)}: expected square tiles of "
                    f"{self.latent_shape[1]} channels no larger than the latents {list(self.latent_shape)}"
                )
        if text_encoder is not None and conditioner is not None:
            raise InputError("give either a CLIP text encoder or a conditioner, not both")
        if text_encoder is not None:
            self._check_text_encoder(text_encoder, tokenizer)
        if conditioner is not None:
            conditioner.check(self.conditioning)
            if max_memory is not None:
                raise InputError(f"--max-memory is not supported for {conditioner.family} sets yet")
        self.max_memory: int | None = None
        self._baseline: int | None = None
        self.memory_plan: MemoryPlan | None = None
        if max_memory is not None:
            self.set_memory_cap(max_memory)

    def _check_text_encoder(self, text_encoder: CompiledModule, tokenizer: CLIPTokenizer | None) -> None:
        """The text encoder must make exactly the denoiser's conditioning, from ids its tokenizer can give
        (an id past the embedding table would read out of bounds in the compiled gather)."""
        where = f"text encoder {text_encoder.path}"
        ids = text_encoder.inputs
        if (
            len(ids) != 1
            or len(ids[0].shape) != 2
            or ids[0].shape[0] != 1
            or not ids[0].dtype.startswith("int")
        ):
            raise InputError(
                f"{where}: expected one integer input (token ids) of shape [1, seq], got "
                + "; ".join(i.describe() for i in ids)
            )
        out = text_encoder.outputs[0]
        if len(self.conditioning) != 1 or tuple(self.conditioning[0].shape[1:]) != tuple(out.shape[1:]):
            takes = ", ".join(i.describe() for i in self.conditioning) or "no conditioning"
            raise InputError(f"{where} makes {out.describe()}; the denoiser takes {takes}")
        if tokenizer is not None:
            tokenizer.check_fits(text_encoder.manifest["model"].get("meta") or {}, where)

    @classmethod
    def from_artifacts(
        cls,
        denoiser: str | os.PathLike,
        decoder: str | os.PathLike | None = None,
        text_encoder: str | os.PathLike | None = None,
        tokenizer: str | os.PathLike | None = None,
        *,
        verify: bool = True,
        tile_decoder: str | os.PathLike | None = None,
        max_memory: int | str | None = None,
    ) -> Pipeline:
        """Load the artifacts of a pipeline (each a directory written by ``compile_model``) and the text
        encoder's tokenizer folder (``vocab.json`` + ``merges.txt`` or ``tokenizer.json``).

        ``max_memory`` (bytes or ``"1.5GB"``) caps the run: models are then loaded when their stage runs
        (see :mod:`edgediff.runtime.memory`); ``tile_decoder`` is a decoder compiled for one latent tile,
        for tiled decoding."""
        lazy = max_memory is not None

        def load(path: str | os.PathLike | None, lazy: bool = lazy) -> CompiledModule | None:
            return CompiledModule(path, verify=verify, lazy=lazy) if path is not None else None

        words = CLIPTokenizer.from_directory(tokenizer) if tokenizer is not None else None
        return cls(
            load(denoiser),
            load(decoder),
            load(text_encoder),
            words,
            tile_decoder=load(tile_decoder, lazy=True),  # loaded only when a decode is tiled
            max_memory=max_memory,
        )

    @classmethod
    def from_directory(
        cls, path: str | os.PathLike, *, verify: bool = True, max_memory: int | str | None = None
    ) -> Pipeline:
        """Load an artifact set: a directory holding denoiser/ and optionally decoder/, text_encoder/,
        tokenizer/ and decoder_tile/ (as ``edgediff.compile_pipeline`` writes it)."""
        root = Path(path)
        if not (root / "denoiser").is_dir():
            raise EdgediffError(
                f"'{root}' is not an artifact set: it needs a denoiser/ artifact "
                f"(and optionally {', '.join(r + '/' for r in (*ARTIFACT_SET_ROLES[1:], TOKENIZER_DIR))})"
            )
        found = {
            role: root / role if (root / role).is_dir() else None
            for role in (*ARTIFACT_SET_ROLES, TOKENIZER_DIR, TILE_DECODER_DIR)
        }
        options = read_conditioning(root)
        if options is not None:  # SDXL, PixArt-alpha, SANA: the text encoders belong to the conditioner
            load = lambda role: CompiledModule(found[role], verify=verify) if found[role] else None  # noqa: E731
            return cls(
                load("denoiser"),
                load("decoder"),
                conditioner=load_conditioner(root, options, verify=verify),
                tile_decoder=load(TILE_DECODER_DIR),
                max_memory=max_memory,
            )
        return cls.from_artifacts(
            found["denoiser"],
            found["decoder"],
            found["text_encoder"],
            found[TOKENIZER_DIR],
            verify=verify,
            tile_decoder=found[TILE_DECODER_DIR],
            max_memory=max_memory,
        )

    # ------------------------------------------------------------------------------------- LoRA and memory

    def _modules(self) -> dict[str, CompiledModule]:
        roles = {
            "text_encoder": self.text_encoder,
            **(self.conditioner.encoders if self.conditioner is not None else {}),
            "denoiser": self.denoiser,
            "decoder": self.decoder,
            TILE_DECODER_DIR: self.tile_decoder,
        }
        return {role: module for role, module in roles.items() if module is not None}

    def set_lora(self, path: str | os.PathLike | None, scale: float = 1.0) -> str:
        """Merge the LoRA file ``path`` at ``scale`` into the denoiser (and the text encoder, for its layers),
        replacing any LoRA merged before; ``None`` removes it. Returns a one-line summary."""
        from edgediff.runtime.lora import Lora

        lora = Lora.load(path, scale) if path is not None else None
        merged = []
        for role in ("denoiser", "text_encoder"):
            module = self._modules().get(role)
            if module is not None:
                state = module.set_lora(lora, role)
                if state:
                    quant = f", {state['requantized']} re-quantized" if state["requantized"] else ""
                    merged.append(f"{state['layers']} {role} layers{quant}")
        if lora is None:
            text = "LoRA removed: stored weights restored"
        else:
            text = f"LoRA {path} at scale {scale:g}: merged {', '.join(merged) or 'nothing'}"
            missing = [r for r in lora.roles() if r not in self._modules()]
            if missing:
                skipped = sum(len(lora.for_role(r)) for r in missing)
                text += f"; {skipped} layers for {', '.join(missing)} not applied (no such model in the set)"
        if self.max_memory is not None:
            self.memory_plan = self.plan_memory()  # merged tensors are held beside the loaded weights
        return text

    def set_memory_cap(self, cap: int | str, *, baseline: int | None = None) -> MemoryPlan:
        """Cap the runs at ``cap`` bytes (``"1.5GB"``); ``baseline`` is what the process holds besides the
        models (default: its resident set now). Raises :class:`InputError` when no plan fits. Models loaded
        eagerly stay loaded until their stage's plan releases them."""
        from edgediff.runtime.memory import current_rss

        self.max_memory = parse_bytes(cap, "--max-memory")
        self._baseline = current_rss() if baseline is None else baseline
        self.memory_plan = self.plan_memory()
        return self.memory_plan

    def plan_memory(self, cap: int | None = None) -> MemoryPlan:
        """The memory plan of a run under ``cap`` (default: the pipeline's ``max_memory``)."""
        cap = self.max_memory if cap is None else cap
        latent_bytes = int(np.prod(self.latent_shape)) * 4
        # the loop's own arrays: latents, the sampler's history (a few latents) and the conditioning
        extra = 8 * latent_bytes + sum(int(np.prod(i.shape)) * 4 for i in self.conditioning) * 2
        modules = self._modules()
        return make_plan(
            {role: m.manifest for role, m in modules.items()},
            cap,
            baseline=self._baseline,
            extra_io=extra,
            lora_bytes={role: sum(a.nbytes for a in m._merged.values()) for role, m in modules.items()},
        )

    def _enter(self, role: str) -> None:
        """Make ``role``'s model ready to run: under a per-stage plan, unload every other model first."""
        plan = self.memory_plan
        modules = self._modules()
        if plan is not None and not plan.resident:
            for other, module in modules.items():
                if other != role:
                    module.unload()
        modules[role].load()

    def decode(self, latents: np.ndarray, *, tiled: bool = False, overlap: int | None = None) -> np.ndarray:
        """The decoder's output for ``latents`` (NCHW floats in [-1, 1]); ``tiled`` decodes overlapping tiles
        with the tile decoder (``decoder_tile/``) and blends them (see :func:`memory.tiled_decode`)."""
        if not tiled:
            if self.decoder is None:
                raise InputError("this pipeline has no decoder/")
            self._enter("decoder")
            return np.asarray(self.decoder(latents))
        if self.tile_decoder is None:
            raise InputError("tiled decoding needs a decoder compiled for one tile (decoder_tile/)")
        self._enter(TILE_DECODER_DIR)
        tile = self.tile_decoder.inputs[0].shape[2]
        return tiled_decode(
            self.tile_decoder, latents, tile, default_overlap(tile) if overlap is None else overlap
        )

    # ---------------------------------------------------------------------------------------------- text

    def encode_prompt(self, text: str) -> np.ndarray:
        """Prompt embeddings ``(1, seq, dim)`` for the denoiser: ``text`` tokenized, padded/truncated to the
        text encoder's sequence length, and run through the compiled text encoder."""
        encoder, tokenizer = self.text_encoder, self.tokenizer
        if encoder is None or tokenizer is None:
            parts = (("text_encoder/", encoder), ("tokenizer/", tokenizer))
            raise InputError(
                "prompt text needs a compiled text encoder and its tokenizer; this pipeline has no "
                + " or ".join(name for name, part in parts if part is None)
                + ": give prompt embeddings instead (--prompt-embeds FILE.npy)"
            )
        ids = tokenizer.encode(text, encoder.inputs[0].shape[1])[None]
        return np.asarray(encoder(ids))

    def _encode_prompts(
        self,
        prompt: str | None,
        negative_prompt: str | None,
        conditioning: Mapping[str, Any] | np.ndarray | None,
        negative: Mapping[str, Any] | np.ndarray | None,
        use_cfg: bool,
        timings: Timings,
        latent_shape: tuple[int, ...] | None = None,
    ) -> tuple[Any, Any]:
        """Prompt text to conditioning: the prompt's embeddings and, with guidance, the negative prompt's
        (the empty prompt's unless given, as diffusers does); negative text is unused without guidance."""
        if prompt is not None and conditioning is not None:
            raise InputError("give either prompt text or prompt embeddings (conditioning), not both")
        if negative_prompt is not None and negative is not None:
            raise InputError("give either a negative prompt or negative embeddings, not both")
        start = time.perf_counter()
        if self.conditioner is not None:
            if prompt is None:
                raise InputError(f"a {self.conditioner.family} set takes the prompt as text: give prompt=")
            scale = int(self.meta.get("vae_scale_factor") or 8)
            shape = latent_shape or self.latent_shape
            conditioning, negative = self.conditioner.encode(
                prompt, negative_prompt, use_cfg=use_cfg, height=shape[2] * scale, width=shape[3] * scale
            )
            timings.text_encoder = time.perf_counter() - start
            return conditioning, negative
        if self.text_encoder is not None:
            self._enter("text_encoder")
        if prompt is not None:
            conditioning = self.encode_prompt(prompt)
        if use_cfg and negative is None:
            negative = self.encode_prompt(negative_prompt or "")
        timings.text_encoder = time.perf_counter() - start
        return conditioning, negative

    # ------------------------------------------------------------------------------------------ conditioning

    def _conditioning(
        self, values: Mapping[str, Any] | np.ndarray | None, what: str
    ) -> dict[str, np.ndarray]:
        """Check one image's conditioning arrays (batch 1) against the denoiser's inputs."""
        if values is None:
            values = {}
        elif not isinstance(values, Mapping):
            if len(self.conditioning) != 1:
                names = [info.name for info in self.conditioning]
                raise InputError(f"the denoiser takes several conditioning inputs {names}; pass a dict")
            values = {self.conditioning[0].name: values}
        unknown = set(values) - {info.name for info in self.conditioning}
        if unknown:
            raise InputError(f"{what}: the denoiser has no input {sorted(unknown)}")
        checked = {}
        for info in self.conditioning:
            if info.name not in values:
                raise InputError(f"{what}: missing '{info.name}' ({info.describe()} at batch {self.batch})")
            array = np.asarray(values[info.name]).astype(info.dtype, copy=False)
            if array.shape[1:] != info.shape[1:] or array.shape[0] != 1:
                raise InputError(
                    f"{what}: '{info.name}' has shape {list(array.shape)}, expected {[1, *info.shape[1:]]}"
                )
            checked[info.name] = array
        return checked

    def _default_negative(self) -> dict[str, np.ndarray] | None:
        # Class-conditional models (DiT) have a learned "null" class for the unconditional branch.
        if "null_class_label" in self.meta and [i.name for i in self.conditioning] == ["class_labels"]:
            return {"class_labels": np.array([self.meta["null_class_label"]], dtype=np.int64)}
        return None

    # ---------------------------------------------------------------------------------------------- sampling

    def make_sampler(self, name: str, steps: int, **options: Any) -> Sampler:
        """The sampler ``name`` configured for this model (its prediction type and scheduler config)."""
        if steps < 1:
            raise SamplerError(f"steps must be at least 1, got {steps}")
        config = self.meta.get("scheduler_config")
        if (
            config
            and self.prediction_type == "flow"
            and "flow_shift" in self.meta
            and name.startswith("flow")
        ):
            # the pipeline's shift (SANA's DPM-Solver config calls it flow_shift, flow-euler calls it shift)
            options.setdefault("shift", self.meta["flow_shift"])
        if config:
            return Sampler.from_diffusers_config(
                name, {**config, "prediction_type": self.prediction_type}, steps, **options
            )
        if self.prediction_type == "flow" and "flow_shift" in self.meta:
            options.setdefault("shift", self.meta["flow_shift"])
        return get_sampler(name, num_steps=steps, prediction_type=self.prediction_type, **options)

    def _denoise_fn(
        self,
        cond: dict[str, np.ndarray],
        uncond: dict[str, np.ndarray] | None,
        guidance: float,
        timings: Timings,
    ) -> Callable[[np.ndarray, float], np.ndarray]:
        start_ch, stop_ch = self.meta.get("noise_pred_channels") or (0, self.latent_shape[1])
        timestep_dtype = self.denoiser.inputs[1].dtype
        names = [info.name for info in self.conditioning]
        if uncond is not None and self.batch == 2:
            pair = [np.concatenate([uncond[n], cond[n]]) for n in names]
        elif self.batch == 2:  # a CFG build used without guidance: run the conditional branch twice
            pair = [np.concatenate([cond[n], cond[n]]) for n in names]
        single = [cond[n] for n in names]
        single_uncond = [uncond[n] for n in names] if uncond is not None else None

        def call(x: np.ndarray, t: float, extra: list[np.ndarray]) -> np.ndarray:
            timestep = np.full((x.shape[0],), t, dtype=timestep_dtype)
            start = time.perf_counter()
            out = self.denoiser(x, timestep, *extra)
            timings.model[-1] += time.perf_counter() - start
            return out[:, start_ch:stop_ch]

        def denoise(x: np.ndarray, t: float) -> np.ndarray:
            if self.batch == 2:
                both = call(np.concatenate([x, x]), t, pair)
                if uncond is None:
                    return both[1:]
                out_uncond, out_cond = both[:1], both[1:]
            elif single_uncond is not None:
                out_uncond, out_cond = call(x, t, single_uncond), call(x, t, single)
            else:
                return call(x, t, single)
            return out_uncond + guidance * (out_cond - out_uncond)

        return denoise

    def latent_shape_for(
        self,
        height: int | None = None,
        width: int | None = None,
        latents: np.ndarray | None = None,
        decode: bool = True,
    ) -> tuple[int, ...]:
        """The latent shape of one image at ``height`` x ``width`` pixels (default: the denoiser's first
        resolution, or the given ``latents``' when the denoiser has an entry for them); an error naming
        the compiled resolutions when the denoiser, or the decoder that is to decode, lacks it."""
        if height is None and width is None and latents is not None:
            entry = self.denoiser.entry_for_shape((self.batch, *np.shape(latents)[1:]))
            if entry is None:
                return self.latent_shape  # the caller reports the mismatch
        else:
            entry = self.denoiser.entry_for(height, width)
        shape = (1, *entry.inputs[0].shape[1:])
        if decode and self.decoder is not None and self.decoder.entry_for_shape(shape) is None:
            raise InputError(
                f"the decoder {self.decoder.path} is not compiled for {resolutions_text([entry])} "
                f"(latents {list(shape)}); it is for {resolutions_text(self.decoder.entries)}"
            )
        return shape

    def generate(
        self,
        conditioning: Mapping[str, Any] | np.ndarray | None = None,
        *,
        negative: Mapping[str, Any] | np.ndarray | None = None,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        sampler: str = "dpmpp-2m",
        steps: int = 20,
        guidance_scale: float = 7.5,
        seed: int = 0,
        latents: np.ndarray | None = None,
        sampler_options: Mapping[str, Any] | None = None,
        decode: bool = True,
        callback: Callable[[int, int], None] | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Generation:
        """Generate one image.

        ``conditioning`` holds the denoiser's conditioning inputs for one image (e.g. prompt embeddings
        ``(1, 77, 768)``; a bare array when the denoiser has one conditioning input). Guidance (``> 1``) needs
        ``negative`` conditioning (the empty prompt's embeddings) unless the model has a null class. The
        initial noise comes from ``numpy.random.default_rng(seed)`` unless ``latents`` is given.

        With a text encoder and tokenizer, ``prompt`` text replaces ``conditioning`` and ``negative_prompt``
        text replaces ``negative`` (default: the empty prompt, under guidance).

        ``height`` and ``width`` (pixels) choose among the resolutions the artifacts were compiled for
        (default: the first); given ``latents`` choose by their shape.
        """
        total_start = time.perf_counter()
        timings = Timings()
        chosen = self.make_sampler(sampler, steps, **dict(sampler_options or {}))
        use_cfg = guidance_scale > 1.0
        # the image size first: SDXL's time ids hold it
        latent_shape = self.latent_shape_for(height, width, latents, decode)
        if prompt is not None or negative_prompt is not None:
            conditioning, negative = self._encode_prompts(
                prompt, negative_prompt, conditioning, negative, use_cfg, timings, latent_shape
            )
        cond = self._conditioning(conditioning, "conditioning")
        uncond = None
        if use_cfg:
            if negative is None:
                uncond = self._default_negative()
                if uncond is None:
                    raise InputError(
                        f"guidance scale {guidance_scale} needs negative conditioning (the empty prompt's "
                        "embeddings, --negative-prompt-embeds) or a text encoder; or use --guidance 1"
                    )
            else:
                uncond = self._conditioning(negative, "negative conditioning")

        rng = np.random.default_rng(seed)
        if latents is None:
            latents = rng.standard_normal(latent_shape).astype(np.float32)
        else:
            latents = np.asarray(latents, dtype=np.float32)
            if latents.shape != latent_shape:
                raise InputError(f"latents have shape {list(latents.shape)}, expected {list(latent_shape)}")

        if self.max_memory is not None:
            self.memory_plan = self.plan_memory()
        self._enter("denoiser")
        denoise = self._denoise_fn(cond, uncond, guidance_scale, timings)
        evaluations = len(chosen.timesteps)

        def timed_denoise(x: np.ndarray, t: float) -> np.ndarray:
            timings.model.append(0.0)
            return denoise(x, t)

        # A step is everything between two callbacks: input scaling, the model call(s), guidance and the
        # sampler update. The user's callback (a progress bar) is left out.
        step_start = [time.perf_counter()]

        def on_step(i: int, _x: np.ndarray) -> None:
            timings.steps.append(time.perf_counter() - step_start[0])
            if callback:
                callback(i, evaluations)
            step_start[0] = time.perf_counter()

        final = chosen.sample(timed_denoise, latents, rng=rng, callback=on_step)

        image = None
        plan = self.memory_plan
        tiled = (
            plan.tiled_decode if plan is not None else self.decoder is None and self.tile_decoder is not None
        )
        if decode and (self.decoder is not None or self.tile_decoder is not None):
            start = time.perf_counter()
            image = to_uint8_image(self.decode(final, tiled=tiled))
            timings.decoder = time.perf_counter() - start
        if plan is not None and not plan.resident:
            for module in self._modules().values():
                module.unload()
        timings.total = time.perf_counter() - total_start
        return Generation(final, image, timings, plan, peak_rss())
