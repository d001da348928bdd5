"""Diffusers pipeline folders of each family as the models of an artifact set, checked before compiling.

``compile_pipeline`` hands a pipeline folder (``model_index.json``) of SDXL, PixArt-alpha, SANA or DiT
here. :func:`plan_set` loads every component it needs (the denoiser for the text encoders' sequence length,
the VAE decoder for the denoiser's latents, the text encoders wrapped to make what the pipeline feeds the
denoiser), checks that they fit one another and that the tokenizers fit the encoders, and says which
tokenizer folders to copy and what ``conditioning.json`` the runtime needs; nothing is compiled until all
of it passed."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import InputError, ModelNotFoundError
from edgediff.zoo.builder import ZooModel, make_prompt_encoder
from edgediff.zoo.configs import CLIP_TOKEN_IDS
from edgediff.zoo.local import _offline, _read_json, load_local
from edgediff.zoo.wrappers import (
    MaskedPixArtWrapper,
    MaskedSanaWrapper,
)

# model_index.json _class_name -> family
PIPELINE_CLASSES = {
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "SanaPipeline": "sana",
    "DiTPipeline": "dit",
}


def pipeline_family(path: Any) -> str | None:
    """The family of a diffusers pipeline folder handled here (None: not one, or SD 1.x/2.x)."""
    if not isinstance(path, (str, os.PathLike)) or not (Path(path) / "model_index.json").is_file():
        return None
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{Path(path) / 'model_index.json'}: unreadable ({exc})") from exc
    return PIPELINE_CLASSES.get(str(index.get("_class_name")))


# ---------------------------------------------------------------------------------------------- planning


@dataclass
class SetPlan:
    """What an artifact set of one family holds: models by role, tokenizer folders to copy (set folder name
    -> source) and the runtime's ``conditioning.json`` (None: the denoiser's inputs are all it needs)."""

    family: str
    models: dict[str, ZooModel] = field(default_factory=dict)
    tokenizers: dict[str, Path] = field(default_factory=dict)
    conditioning: dict[str, Any] | None = None


def _load_transformers(component: Path, class_name: str) -> nn.Module:
    """A transformers model from a pipeline subfolder, offline, refusing missing weights."""
    import transformers

    if not (component / "config.json").is_file():
        raise ModelNotFoundError(f"{component}: no config.json; the pipeline needs this component")
    config = json.loads((component / "config.json").read_text())
    declared = str((config.get("architectures") or [class_name])[0])
    if declared != class_name:
        raise InputError(f"{component}: is a {declared}; this pipeline needs a {class_name}")
    cls = getattr(transformers, class_name)
    with _offline():
        try:
            model, info = cls.from_pretrained(
                str(component), local_files_only=True, dtype=torch.float32, output_loading_info=True
            )
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"{component}: could not load {class_name} weights: {first}") from exc
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelNotFoundError(
            f"{component}: weights do not match config.json: {len(missing)} missing, e.g. {missing[0]}"
        )
    return model.eval().requires_grad_(False)


def _scheduler_config(root: Path) -> dict[str, Any]:
    config = _read_json(root / "scheduler" / "scheduler_config.json")
    return {k: v for k, v in config.items() if k != "_diffusers_version"}


def _with_scheduler(model: ZooModel, root: Path, flow_shift: float | None = None) -> ZooModel:
    """Record the pipeline's scheduler config in the denoiser's meta, which the runtime samples with (the
    betas of DiT and PixArt differ from SD's; a flow model's shift)."""
    config = _scheduler_config(root)
    if config:
        model.meta["scheduler_config"] = config
    shift = config.get("flow_shift", config.get("shift")) if flow_shift is None else flow_shift
    if model.meta.get("prediction_type") == "flow" and shift is not None:
        model.meta["flow_shift"] = float(shift)
    return model


def _decoder(root: Path, den: ZooModel) -> ZooModel:
    dec = load_local(root, subfolder="vae", latent_size=den.meta["latent_size"])
    sample = tuple(den.example_inputs[0].shape[1:])
    if tuple(dec.example_inputs[0].shape[1:]) != sample:
        raise InputError(
            f"{root / 'vae'}: takes latents {list(dec.example_inputs[0].shape)}; "
            f"the denoiser makes {[1, *sample]}"
        )
    return dec


def plan_set(
    path: str | os.PathLike,
    *,
    batch: int = 2,
    decoder: bool = True,
    max_sequence_length: int | None = None,
) -> SetPlan:
    """Load and check the components of the pipeline folder ``path`` (see the module's docstring)."""
    root = Path(path)
    family = pipeline_family(root)
    if family is None:
        raise InputError(f"{root}: not a pipeline folder of {', '.join(PIPELINE_CLASSES)}")
    plan = {"sdxl": _plan_sdxl, "dit": _plan_dit, "pixart": _plan_masked, "sana": _plan_masked}[family]
    result = plan(root, family=family, batch=batch, max_sequence_length=max_sequence_length)
    if decoder:
        result.models["decoder"] = _decoder(root, result.models["denoiser"])
    return result


def _plan_dit(root: Path, *, family: str, batch: int, max_sequence_length: int | None) -> SetPlan:
    den = load_local(root, subfolder="transformer", batch=batch)
    if den.family != "dit":
        raise InputError(f"{root / 'transformer'}: a DiTPipeline needs a DiT transformer, got a {den.family}")
    return SetPlan(family, {"denoiser": _with_scheduler(den, root)})


def _plan_sdxl(root: Path, *, family: str, batch: int, max_sequence_length: int | None) -> SetPlan:
    from edgediff.runtime.tokenizer import CLIPTokenizer

    if _read_json(root / "model_index.json").get("requires_aesthetics_score"):
        raise InputError(f"{root}: the SDXL refiner (aesthetic-score time ids) is not supported")
    tokenizers = {}
    encoders = {}
    for role, tok_dir, class_name in (
        ("text_encoder", "tokenizer", "CLIPTextModel"),
        ("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection"),
    ):
        model = _load_transformers(root / role, class_name)
        tokenizer = CLIPTokenizer.from_directory(root / tok_dir)
        cfg = model.config
        # configs from before transformers PR #24773 say eos 2; the tokenizer's ids are then the real ones
        ids = {k: getattr(tokenizer, k) for k in CLIP_TOKEN_IDS}
        if cfg.eos_token_id != 2:
            ids.update(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
        enc = make_prompt_encoder(
            model,
            name=f"{root.name}-{role}",
            seq_len=tokenizer.model_max_length or cfg.max_position_embeddings,
            penultimate=True,
            extra_meta={**ids, "source": str((root / role).resolve())},
        )
        tokenizer.check_fits(enc.meta, f"{role} {enc.name}")
        encoders[role], tokenizers[tok_dir] = enc, root / tok_dir
    one, two = encoders["text_encoder"], encoders["text_encoder_2"]
    if one.meta["seq_len"] != two.meta["seq_len"]:
        raise InputError(
            f"{root}: tokenizer pads to {one.meta['seq_len']} tokens, tokenizer_2 to {two.meta['seq_len']}"
        )
    den = load_local(root, subfolder="unet", batch=batch, seq_len=one.meta["seq_len"])
    names = den.input_names[2:]
    if names != ("encoder_hidden_states", "text_embeds", "time_ids"):
        raise InputError(
            f"{root / 'unet'}: an SDXL UNet takes text_embeds and time_ids; this one takes {list(names)}"
        )
    width = one.meta["hidden_size"] + two.meta["hidden_size"]
    takes = tuple(den.example_inputs[2].shape[2:])[0], int(den.example_inputs[3].shape[1])
    pooled_dim = int(two.meta["projection_dim"])
    if takes != (width, pooled_dim):
        raise InputError(
            f"{root}: the text encoders make {one.meta['hidden_size']}+{two.meta['hidden_size']} wide "
            f"states and {pooled_dim}-wide pooled embeddings; the UNet takes {takes[0]} and {takes[1]}"
        )
    index = _read_json(root / "model_index.json")
    conditioning = {
        "family": "sdxl",
        "force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True)),
    }
    models = {"denoiser": _with_scheduler(den, root), **encoders}
    return SetPlan(family, models, tokenizers, conditioning)


# The pipelines' default max_sequence_length and the transformers class of their text encoder.
_MASKED = {"pixart": (120, "T5EncoderModel"), "sana": (300, "Gemma2Model")}
# SanaPipeline.__call__'s default complex_human_instruction (its lines are joined with newlines).
SANA_INSTRUCTION = [
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable "
    "for image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, "
    "sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing "
    "street lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by "
    "towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
]


def _plan_masked(root: Path, *, family: str, batch: int, max_sequence_length: int | None) -> SetPlan:
    """PixArt-alpha (T5) and SANA (Gemma-2): one encoder taking ids and mask; the transformer takes the
    mask too."""
    from edgediff.runtime.text_tokenizer import JSONTokenizer

    default_len, class_name = _MASKED[family]
    max_len = max_sequence_length or default_len
    if max_len < 2:
        raise InputError(f"max_sequence_length must be at least 2, got {max_len}")
    tokenizer = JSONTokenizer(root / "tokenizer")
    model = _load_transformers(root / "text_encoder", class_name)
    instruction = SANA_INSTRUCTION if family == "sana" else []
    # SANA encodes the instruction + prompt and keeps the first and the last max_len - 1 states
    seq_len = tokenizer.count("\n".join(instruction)) + max_len - 2 if instruction else max_len
    enc = make_prompt_encoder(
        model,
        name=f"{root.name}-text_encoder",
        seq_len=seq_len,
        extra_meta={"pad_token_id": tokenizer.pad_token_id, "source": str((root / "text_encoder").resolve())},
    )
    tokenizer.check_fits(enc.meta, f"text_encoder {enc.name}")
    den = load_local(root, subfolder="transformer", batch=batch, seq_len=max_len)
    if den.family != family:
        raise InputError(
            f"{root / 'transformer'}: a {family} pipeline needs a {family} transformer, got a {den.family}"
        )
    if den.input_names != ("sample", "timestep", "encoder_hidden_states"):
        raise InputError(f"{root / 'transformer'}: inputs {list(den.input_names)} are not supported")
    caption = int(den.meta["caption_channels"])
    if caption != enc.meta["hidden_size"]:
        raise InputError(
            f"{root}: the text encoder makes {enc.meta['hidden_size']}-wide states; the transformer's "
            f"captions are {caption} wide"
        )
    transformer = den.module.transformer
    if family == "pixart":
        module: nn.Module = MaskedPixArtWrapper(transformer, den.meta["vae_scale_factor"])
    else:
        module = MaskedSanaWrapper(transformer)
    sample = den.example_inputs[0]
    text_mask = torch.ones(sample.shape[0], max_len)
    text_mask[:, max_len // 2 :] = 0.0
    den = replace(
        den,
        module=module.eval().requires_grad_(False),
        example_inputs=(*den.example_inputs, text_mask),
        input_names=(*den.input_names, "encoder_attention_mask"),
    )
    conditioning: dict[str, Any] = {"family": family, "max_sequence_length": max_len}
    if instruction:
        conditioning["complex_human_instruction"] = instruction
    models = {"denoiser": _with_scheduler(den, root), "text_encoder": enc}
    return SetPlan(family, models, {"tokenizer": root / "tokenizer"}, conditioning)
