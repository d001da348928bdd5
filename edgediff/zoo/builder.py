"""Zoo models: building a named model from its config, wrapping a diffusers model, and the ZooModel record."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgediff.errors import InputError, ModelNotFoundError
from edgediff.zoo.configs import (
    CLIP_TEXT_L14_CONFIG,
    CLIP_TOKEN_IDS,
    DEFAULT_PREDICTION,
    DEFAULT_SCALING,
    DEFAULT_SEQ_LEN,
    NUM_TRAIN_TIMESTEPS,
    SPECS,
    TRANSFORMER2D_REMAP,
    TRANSFORMERS_CLASSES,
    ZooSpec,
)
from edgediff.zoo.wrappers import (
    CLIPPenultimateWrapper,
    CLIPTextEncoderWrapper,
    DCAEDecoderWrapper,
    DiTWrapper,
    MaskedEncoderWrapper,
    PixArtWrapper,
    SanaWrapper,
    SDXLUNetWrapper,
    UNetWrapper,
    VAEDecoderWrapper,
)

FAMILIES = ("unet", "dit", "pixart", "sana", "vae-decoder", "text-encoder")


@dataclass
class ZooModel:
    """A model ready for capture: an eval-mode wrapper, example inputs and what they mean.

    ``module(*example_inputs)`` returns a single tensor; ``input_names`` / ``output_names`` name the
    positional inputs and that output. ``config`` is the diffusers config the model was built from and
    ``meta`` the (JSON-serialisable) facts a sampler or runtime needs to drive it.
    """

    name: str
    family: str
    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    config: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names accepted by :func:`build`, full-size models first, then their tiny versions."""
    return list(SPECS)


def build(
    name: str,
    *,
    batch: int = 1,
    latent_size: int | None = None,
    seed: int = 0,
    seq_len: int | None = None,
) -> ZooModel:
    """Build zoo model ``name`` with random weights drawn from ``seed``.

    The same seed gives the same weights and example inputs, without disturbing the caller's global RNG.
    ``latent_size`` (default: the config's sample size) only shapes the example inputs; transformer models
    recompute their positional embedding for other sizes, as diffusers does. ``seq_len`` (default: the
    entry's) is the number of text tokens: of a denoiser's text conditioning, or a text encoder's input.
    """
    spec = zoo_spec(name)
    model = instantiate(spec.class_name, spec.config, seed=seed)
    return make_zoo_model(
        model,
        name=name,
        batch=batch,
        latent_size=latent_size,
        seed=seed,
        seq_len=seq_len or spec.seq_len,
        prediction_type=spec.prediction_type,
        scaling_factor=spec.scaling_factor,
        vae_scale_factor=spec.vae_scale_factor,
        extra_meta={"source": spec.source, "tiny": name.startswith("tiny-"), **spec.extra_meta},
    )


def wrap(
    model: nn.Module, *, batch: int = 1, latent_size: int | None = None, name: str | None = None
) -> ZooModel:
    """Wrap an already-built diffusers model (UNet2DConditionModel, DiTTransformer2DModel,
    PixArtTransformer2DModel, SanaTransformer2DModel, or AutoencoderKL / AutoencoderDC, which give their
    decoder path) or a transformers text encoder (CLIPTextModel; CLIPTextModelWithProjection, T5EncoderModel
    and Gemma2Model as SDXL, PixArt-alpha and SANA call them).

    Facts the model's own config does not hold (prediction type, VAE scaling factor) get the family's usual
    values; :func:`load_local` reads them from the pipeline folder instead. The model is shared, not
    copied, and is put in eval mode with gradients off.
    """
    return make_zoo_model(model, name=name or type(model).__name__, batch=batch, latent_size=latent_size)


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def zoo_spec(name: str) -> ZooSpec:
    try:
        return SPECS[name]
    except KeyError:
        close = difflib.get_close_matches(name, SPECS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelNotFoundError(f"unknown zoo model {name!r}{hint} (valid: {', '.join(SPECS)})") from None


def instantiate(
    class_name: str, config: Mapping[str, Any], *, seed: int = 0, meta: bool = False
) -> nn.Module:
    """Build a diffusers (or transformers) model from ``config``; ``meta=True`` allocates no storage (to count
    parameters)."""
    if meta:
        with torch.device("meta"):
            return new_model(class_name, config)
    # fork_rng keeps the caller's global RNG untouched while making the init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return new_model(class_name, config)


def new_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    if class_name in TRANSFORMERS_CLASSES:
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))
    import diffusers

    return getattr(diffusers, class_name).from_config(dict(config))


def resolve_class_name(config: Mapping[str, Any]) -> str:
    # diffusers configs name their class in _class_name, transformers configs in architectures
    name = str(config.get("_class_name") or (config.get("architectures") or [""])[0])
    if name == "Transformer2DModel":
        return TRANSFORMER2D_REMAP.get(config.get("norm_type", ""), name)
    return name


def family_of(model: nn.Module) -> str:
    name = type(model).__name__
    families = {
        "UNet2DConditionModel": "unet",
        "DiTTransformer2DModel": "dit",
        "PixArtTransformer2DModel": "pixart",
        "SanaTransformer2DModel": "sana",
        "AutoencoderKL": "vae-decoder",
        "AutoencoderDC": "vae-decoder",  # SANA's deep-compression autoencoder
        "CLIPTextModel": "text-encoder",
        "CLIPTextModelWithProjection": "text-encoder",
        "T5EncoderModel": "text-encoder",
        "Gemma2Model": "text-encoder",
    }
    if name not in families:
        raise ModelNotFoundError(f"cannot wrap {name}: expected one of {', '.join(families)}")
    return families[name]


def _jsonable(value: Any) -> Any:
    """Config values as plain JSON types (diffusers configs hold tuples and FrozenDicts)."""
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def make_text_encoder(
    model: nn.Module,
    *,
    name: str,
    batch: int,
    seed: int,
    seq_len: int | None,
    extra_meta: Mapping[str, Any] | None,
) -> ZooModel:
    """A CLIP text encoder: seeded example token ids ``(batch, seq_len)`` and the facts a runtime needs to
    feed it (sequence length, hidden size, vocabulary size, bos/eos/pad ids)."""
    cfg = model.config
    tokens = seq_len or cfg.max_position_embeddings
    if not 1 <= tokens <= cfg.max_position_embeddings:
        raise InputError(f"{name}: seq_len must be 1..{cfg.max_position_embeddings}, got {tokens}")
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen)
    module = CLIPTextEncoderWrapper(model).eval().requires_grad_(False)
    # Configs from before transformers PR #24773 say bos/eos/pad = 0/2/1 (transformers checks eos == 2 too);
    # the CLIP tokenizer they were trained with uses CLIP_TOKEN_IDS.
    token_ids = (
        dict(CLIP_TOKEN_IDS) if cfg.eos_token_id == 2 else {k: getattr(cfg, k) for k in CLIP_TOKEN_IDS}
    )
    meta = {
        "family": "text-encoder",
        "seq_len": tokens,
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        **token_ids,
        "prediction_type": None,
        "param_count": sum(p.numel() for p in module.parameters()),
        **(extra_meta or {}),
    }
    config = {"_class_name": type(model).__name__, **{k: getattr(cfg, k, None) for k in CLIP_TEXT_L14_CONFIG}}
    return ZooModel(
        name=name,
        family="text-encoder",
        module=module,
        example_inputs=(input_ids,),
        input_names=("input_ids",),
        output_names=("last_hidden_state",),
        config=_jsonable(config),
        meta=_jsonable(meta),
    )


def make_prompt_encoder(
    model: nn.Module,
    *,
    name: str,
    batch: int = 1,
    seed: int = 0,
    seq_len: int | None = None,
    penultimate: bool = False,
    extra_meta: Mapping[str, Any] | None = None,
) -> ZooModel:
    """The text encoders of SDXL, PixArt-alpha and SANA as their pipelines call them: a CLIP encoder's
    penultimate hidden states (``penultimate``, SDXL's ``text_encoder``), ``CLIPTextModelWithProjection``'s
    penultimate states and pooled projection (SDXL's ``text_encoder_2``), or a T5 / Gemma-2 encoder's last
    hidden state from ``(input_ids, attention_mask)``. Example ids are seeded; the example mask pads the
    second half on the right, as prompts are padded."""
    cfg = model.config
    kind = type(model).__name__
    clip = kind.startswith("CLIPTextModel")
    # default: CLIP's positions, or the max_sequence_length of the pipeline the encoder belongs to
    default = DEFAULT_SEQ_LEN["sana" if kind == "Gemma2Model" else "pixart"]
    tokens = int(seq_len or (cfg.max_position_embeddings if clip else default))
    limit = getattr(cfg, "max_position_embeddings", None) if clip or kind == "Gemma2Model" else None
    if tokens < 1 or (limit is not None and tokens > limit):
        raise InputError(f"{name}: seq_len must be 1..{limit}, got {tokens}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch, tokens), generator=gen)
    meta: dict[str, Any] = {"family": "text-encoder", "seq_len": tokens, "encoder": kind}
    if clip:
        pooled = kind == "CLIPTextModelWithProjection"
        if not (pooled or penultimate):
            raise InputError(f"{name}: a plain CLIPTextModel's last state is make_text_encoder's")
        module: nn.Module = CLIPPenultimateWrapper(model, pooled)
        inputs: tuple[torch.Tensor, ...] = (ids,)
        names: tuple[str, ...] = ("input_ids",)
        outputs = ("hidden_states", "text_embeds") if pooled else ("hidden_states",)
        # as make_text_encoder: pre-#24773 configs' bos/eos/pad are not the tokenizer's
        token_ids = CLIP_TOKEN_IDS if cfg.eos_token_id == 2 else {k: getattr(cfg, k) for k in CLIP_TOKEN_IDS}
        meta.update(token_ids, projection_dim=getattr(cfg, "projection_dim", None) if pooled else None)
    else:
        module = MaskedEncoderWrapper(model)
        mask = torch.ones(batch, tokens, dtype=torch.int64)
        mask[:, tokens // 2 :] = 0
        inputs, names, outputs = (ids, mask), ("input_ids", "attention_mask"), ("last_hidden_state",)
        meta["pad_token_id"] = cfg.pad_token_id
    module.eval().requires_grad_(False)
    meta.update(
        hidden_size=int(getattr(cfg, "hidden_size", None) or cfg.d_model),
        vocab_size=int(cfg.vocab_size),
        prediction_type=None,
        param_count=sum(p.numel() for p in module.parameters()),
        **(extra_meta or {}),
    )
    return ZooModel(
        name=name,
        family="text-encoder",
        module=module,
        example_inputs=inputs,
        input_names=names,
        output_names=outputs,
        config=_jsonable({"_class_name": kind, **cfg.to_dict()}),
        meta=_jsonable(meta),
    )


def make_zoo_model(
    model: nn.Module,
    *,
    name: str,
    batch: int,
    latent_size: int | None,
    seed: int = 0,
    seq_len: int | None = None,
    prediction_type: str | None = None,
    scaling_factor: float | None = None,
    vae_scale_factor: int | None = None,
    num_time_ids: int = 6,
    extra_meta: Mapping[str, Any] | None = None,
) -> ZooModel:
    """Pick the family's wrapper and make seeded example inputs and metadata for it."""
    family = family_of(model)
    cfg = model.config
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"{name}: batch must be a positive integer, got {batch!r}")
    if family == "text-encoder":
        if latent_size is not None:
            raise InputError(f"{name}: latent_size does not apply to a text encoder")
        if type(model).__name__ != "CLIPTextModel":
            return make_prompt_encoder(
                model, name=name, batch=batch, seed=seed, seq_len=seq_len, extra_meta=extra_meta
            )
        return make_text_encoder(
            model, name=name, batch=batch, seed=seed, seq_len=seq_len, extra_meta=extra_meta
        )

    dc_ae = type(model).__name__ == "AutoencoderDC"
    if family == "vae-decoder":
        n_up = len(cfg.decoder_block_out_channels if dc_ae else cfg.block_out_channels) - 1
        # a DC-AE config has no sample size: SANA's 1024px images are 32x32 latents
        default_latent = 32 if dc_ae else int(_first(cfg.sample_size)) // 2**n_up
        vae_scale_factor = 2**n_up
    else:
        default_latent = int(_first(cfg.sample_size))
        vae_scale_factor = vae_scale_factor or (32 if family == "sana" else 8)
    latent = default_latent if latent_size is None else latent_size
    patch = int(getattr(cfg, "patch_size", None) or 1)
    if not isinstance(latent, int) or latent < 1 or latent % patch:
        raise InputError(f"{name}: latent_size must be a positive multiple of {patch}, got {latent_size!r}")

    gen = torch.Generator().manual_seed(seed)
    in_ch = cfg.latent_channels if family == "vae-decoder" else cfg.in_channels
    sample = torch.randn(batch, in_ch, latent, latent, generator=gen)
    # Integer-valued float timesteps: what the discrete schedulers emit, float32 as the runtime feeds them.
    timestep = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,), generator=gen).to(torch.float32)
    meta: dict[str, Any] = {
        "family": family,
        "latent_size": latent,
        "vae_scale_factor": vae_scale_factor,
        "image_size": latent * vae_scale_factor,
    }
    out_names: tuple[str, ...] = ("noise_pred",)

    if family == "unet":
        if cfg.class_embed_type is not None or cfg.num_class_embeds is not None:
            raise ModelNotFoundError(
                f"{name}: UNets with class embeddings (e.g. upscalers) are not supported"
            )
        if cfg.addition_embed_type not in (None, "text_time"):
            raise ModelNotFoundError(
                f"{name}: addition_embed_type {cfg.addition_embed_type!r} is not supported"
            )
        if cfg.encoder_hid_dim_type not in (None, "text_proj"):
            raise ModelNotFoundError(
                f"{name}: encoder_hid_dim_type {cfg.encoder_hid_dim_type!r} is not supported"
            )
        text_dim = (
            cfg.encoder_hid_dim
            if cfg.encoder_hid_dim_type == "text_proj"
            else _first(cfg.cross_attention_dim)
        )
        tokens = seq_len or DEFAULT_SEQ_LEN["unet"]
        ehs = torch.randn(batch, tokens, text_dim, generator=gen)
        meta.update(
            cross_attention_dim=_first(cfg.cross_attention_dim), text_seq_len=tokens, text_dim=text_dim
        )
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - num_time_ids * cfg.addition_time_embed_dim
            if pooled < 1:
                raise ModelNotFoundError(
                    f"{name}: text_time config leaves no room for {num_time_ids} time ids"
                )
            text_embeds = torch.randn(batch, pooled, generator=gen)
            px = float(latent * vae_scale_factor)
            # As the SDXL pipelines build them: (original h, w, crop top, left, target h, w), or for the
            # refiner (original h, w, crop top, left, aesthetic score).
            ids = [px, px, 0.0, 0.0, px, px] if num_time_ids == 6 else [px, px, 0.0, 0.0, 6.0]
            time_ids = torch.tensor([ids]).repeat(batch, 1)
            module: nn.Module = SDXLUNetWrapper(model)
            inputs = (sample, timestep, ehs, text_embeds, time_ids)
            names = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
            meta.update(
                pooled_text_dim=pooled,
                time_ids_dim=num_time_ids,
                addition_time_embed_dim=cfg.addition_time_embed_dim,
            )
        else:
            module = UNetWrapper(model)
            inputs = (sample, timestep, ehs)
            names = ("sample", "timestep", "encoder_hidden_states")
    elif family == "dit":
        num_classes = int(cfg.num_embeds_ada_norm)
        labels = torch.randint(0, num_classes, (batch,), generator=gen)
        module = DiTWrapper(model)
        inputs = (sample, timestep, labels)
        names = ("sample", "timestep", "class_labels")
        # Label num_classes is the "null" class used for classifier-free guidance.
        meta.update(num_classes=num_classes, null_class_label=num_classes)
    elif family == "pixart":
        tokens = seq_len or DEFAULT_SEQ_LEN["pixart"]
        ehs = torch.randn(batch, tokens, cfg.caption_channels, generator=gen)
        module = PixArtWrapper(model, vae_scale_factor)
        inputs = (sample, timestep, ehs)
        names = ("sample", "timestep", "encoder_hidden_states")
        meta.update(
            caption_channels=cfg.caption_channels,
            cross_attention_dim=cfg.cross_attention_dim,
            text_seq_len=tokens,
            text_dim=cfg.caption_channels,
            use_additional_conditions=bool(model.use_additional_conditions),
        )
    elif family == "sana":
        tokens = seq_len or DEFAULT_SEQ_LEN["sana"]
        ehs = torch.randn(batch, tokens, cfg.caption_channels, generator=gen)
        module = SanaWrapper(model)
        inputs = (sample, timestep, ehs)
        names = ("sample", "timestep", "encoder_hidden_states")
        if cfg.guidance_embeds:
            inputs = (*inputs, torch.full((batch,), 4.5))
            names = (*names, "guidance")
        meta.update(
            caption_channels=cfg.caption_channels,
            cross_attention_dim=cfg.cross_attention_dim,
            text_seq_len=tokens,
            text_dim=cfg.caption_channels,
        )
    else:
        module = DCAEDecoderWrapper(model) if dc_ae else VAEDecoderWrapper(model)
        inputs = (sample,)
        names = ("latent",)
        out_names = ("image",)
        meta.update(
            scaling_factor=module.scaling_factor,
            shift_factor=module.shift_factor,
            image_channels=cfg.in_channels if dc_ae else cfg.out_channels,
            output_range=[-1.0, 1.0],
        )

    if family != "vae-decoder":
        sdxl = family == "unet" and cfg.addition_embed_type == "text_time"
        scaling_key = "sdxl-unet" if sdxl else family
        latent_channels = int(cfg.in_channels)
        out_ch = int(cfg.out_channels or cfg.in_channels)
        learned_sigma = out_ch == 2 * latent_channels
        meta.update(
            prediction_type=prediction_type or DEFAULT_PREDICTION[family],
            scaling_factor=scaling_factor if scaling_factor is not None else DEFAULT_SCALING[scaling_key],
            num_train_timesteps=NUM_TRAIN_TIMESTEPS,
            learned_sigma=learned_sigma,
            # Channels [start, stop) of the output that are the prediction proper; with learned sigma the
            # second half holds the variance interpolation values, which samplers other than DDPM ignore.
            noise_pred_channels=[0, latent_channels],
        )
    else:
        latent_channels = int(cfg.latent_channels)
        out_ch = int(cfg.in_channels if dc_ae else cfg.out_channels)
        meta["prediction_type"] = None
        meta.setdefault("learned_sigma", False)

    module.eval().requires_grad_(False)
    meta.update(
        latent_channels=latent_channels,
        in_channels=int(in_ch),
        out_channels=out_ch,
        param_count=sum(p.numel() for p in module.parameters()),
        **(extra_meta or {}),
    )
    config = {"_class_name": type(model).__name__, **{k: v for k, v in cfg.items() if not k.startswith("_")}}
    return ZooModel(
        name=name,
        family=family,
        module=module,
        example_inputs=tuple(inputs),
        input_names=tuple(names),
        output_names=out_names,
        config=_jsonable(config),
        meta=_jsonable(meta),
    )
