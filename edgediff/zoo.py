"""The model zoo: named diffusion models as export-friendly ``torch.nn.Module`` wrappers.

There is no model hub here. Zoo models are built from the published diffusers configs (kept below as dict
literals) with seeded random weights, which is all the compiler needs to measure, lower and test them; real
weights come only from a local diffusers folder through :func:`load_local`.

Diffusers models take keyword arguments, nested dicts (``added_cond_kwargs``) and return dataclasses, which
``torch.export`` and TVM's importer handle poorly. Every model is therefore wrapped in a small module whose
``forward`` takes positional tensors only and returns one tensor, and is returned as a :class:`ZooModel`
together with seeded example inputs, input/output names and the metadata a sampler needs (prediction type,
latent shape, VAE scaling factor, ...).
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgediff.errors import InputError, ModelNotFoundError

__all__ = ["ZooModel", "build", "list_models", "load_local", "wrap"]

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
# Configs. Full-size ones are copied from the published diffusers config.json files (keys that only record
# the diffusers version are dropped); tiny ones keep each family's block types and code paths at ~1e4-1e5
# parameters so a forward pass takes milliseconds.
# --------------------------------------------------------------------------------------------------------

# runwayml/stable-diffusion-v1-5, unet/config.json (859,520,964 parameters).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2,567,463,684 parameters).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# facebook/DiT-XL-2-256, transformer/config.json (published as a Transformer2DModel with norm_type
# "ada_norm_zero", which diffusers now loads as DiTTransformer2DModel; only that class's keys are kept).
DIT_XL_2_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "attention_bias": True,
    "sample_size": 32,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-05,
}

# PixArt-alpha/PixArt-XL-2-512x512, transformer/config.json (a Transformer2DModel with norm_type
# "ada_norm_single", loaded as PixArtTransformer2DModel). The 512 variant is used because it has no
# resolution / aspect-ratio conditioning; the 1024 variant (sample_size 128) is still supported by the
# wrapper, which derives those conditions from the latent shape.
PIXART_ALPHA_CONFIG: dict[str, Any] = {
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "num_layers": 28,
    "dropout": 0.0,
    "norm_num_groups": 32,
    "cross_attention_dim": 1152,
    "attention_bias": True,
    "sample_size": 64,
    "patch_size": 2,
    "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000,
    "upcast_attention": False,
    "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "caption_channels": 4096,
    "attention_type": "default",
    "use_additional_conditions": None,
}

# Efficient-Large-Model/Sana_600M_1024px_diffusers, transformer/config.json.
SANA_600M_CONFIG: dict[str, Any] = {
    "attention_bias": False,
    "attention_head_dim": 32,
    "caption_channels": 2304,
    "cross_attention_dim": 1152,
    "cross_attention_head_dim": 72,
    "dropout": 0.0,
    "in_channels": 32,
    "mlp_ratio": 2.5,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "num_attention_heads": 36,
    "num_cross_attention_heads": 16,
    "num_layers": 28,
    "out_channels": 32,
    "patch_size": 1,
    "sample_size": 32,
}

# runwayml/stable-diffusion-v1-5, vae/config.json: the same architecture as stabilityai/sd-vae-ft-mse (whose
# config says sample_size 256, the fine-tuning crop); 512 here so the default latent (64) matches sd15-unet.
# scaling_factor is the diffusers default, written out because the decoder wrapper divides by it.
SD_VAE_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# runwayml/stable-diffusion-v1-5, text_encoder/config.json: the text tower of openai/clip-vit-large-patch14
# (123,060,480 parameters). Its bos/eos/pad ids (0, 2, 1) predate transformers' fix of them (PR #24773);
# the tokenizer's real ids are CLIP_TOKEN_IDS.
CLIP_TEXT_L14_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
# <|startoftext|>, <|endoftext|> and the pad token (<|endoftext|>) of the SD 1.x CLIP tokenizer.
CLIP_TOKEN_IDS = {"bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407}

# Tiny SD 1.x UNet: cross-attention down/up blocks, a plain down/up block and the cross-attention mid block.
TINY_SD15_UNET_CONFIG: dict[str, Any] = {
    "attention_head_dim": 2,
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 4,
    "sample_size": 16,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# Tiny SDXL UNet: text_time added conditioning, per-block head counts, linear projections and a block with
# two transformer layers (SDXL's deep blocks), all at toy widths.
TINY_SDXL_UNET_CONFIG: dict[str, Any] = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 2],
    "block_out_channels": [16, 32, 32],
    "cross_attention_dim": 32,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "in_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "out_channels": 4,
    # pooled text embedding (32) + 6 time ids x addition_time_embed_dim (8)
    "projection_class_embeddings_input_dim": 80,
    "sample_size": 16,
    "transformer_layers_per_block": [1, 2, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}

TINY_DIT_CONFIG: dict[str, Any] = {
    **DIT_XL_2_CONFIG,
    "num_attention_heads": 2,
    "attention_head_dim": 8,
    "num_layers": 2,
    "sample_size": 8,
}

TINY_PIXART_CONFIG: dict[str, Any] = {
    **PIXART_ALPHA_CONFIG,
    "num_attention_heads": 2,
    # inner dim 24: divisible by 3 like 1152, which the resolution/aspect-ratio embedder needs if turned on
    "attention_head_dim": 12,
    "num_layers": 2,
    "cross_attention_dim": 24,  # must equal the inner dim: captions are projected to it
    "caption_channels": 32,
    "sample_size": 8,
    # sample_size 8 would not turn the 1024-only conditioning on anyway; say so explicitly.
    "use_additional_conditions": False,
}

TINY_SANA_CONFIG: dict[str, Any] = {
    **SANA_600M_CONFIG,
    "attention_head_dim": 8,
    "caption_channels": 32,
    "cross_attention_dim": 16,
    "cross_attention_head_dim": 8,
    "in_channels": 8,
    "num_attention_heads": 2,
    "num_cross_attention_heads": 2,
    "num_layers": 2,
    "out_channels": 8,
    "sample_size": 8,
}

# Tiny VAE: four decoder levels (three upsamplers) and the attention mid block, like the SD VAE.
TINY_VAE_CONFIG: dict[str, Any] = {
    **SD_VAE_CONFIG,
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
}


# Tiny CLIP text encoder for tiny-sd15-unet: hidden size = its cross_attention_dim (32), 8 positions = its
# 8-token sequence. As in CLIP, bos and eos/pad are the last two ids of the vocabulary.
TINY_CLIP_TEXT_CONFIG: dict[str, Any] = {
    **CLIP_TEXT_L14_CONFIG,
    "bos_token_id": 998,
    "eos_token_id": 999,
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 8,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "pad_token_id": 999,
    "projection_dim": 32,
    "vocab_size": 1000,
}


@dataclass(frozen=True)
class _Spec:
    """One zoo entry: the diffusers class and config plus what the config alone does not say."""

    family: str
    class_name: str
    config: Mapping[str, Any]
    source: str
    seq_len: int | None = None  # text tokens in the example encoder_hidden_states
    prediction_type: str | None = None
    scaling_factor: float | None = None  # of the VAE whose latents the denoiser works on
    vae_scale_factor: int = 8  # pixels per latent along each side
    extra_meta: Mapping[str, Any] = field(default_factory=dict)


_SD_VAE = 0.18215  # SD 1.x/2.x VAE scaling factor, also the VAE of DiT and PixArt-alpha
_SDXL_VAE = 0.13025
_DC_AE = 0.41407  # SANA's DC-AE f32c32
_SANA = {"vae_scale_factor": 32, "extra_meta": {"flow_shift": 3.0}}  # flow_shift: SANA 1024px scheduler

_SPECS: dict[str, _Spec] = {
    "sd15-unet": _Spec(
        "unet",
        "UNet2DConditionModel",
        SD15_UNET_CONFIG,
        "runwayml/stable-diffusion-v1-5",
        seq_len=77,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "sdxl-unet": _Spec(
        "unet",
        "UNet2DConditionModel",
        SDXL_UNET_CONFIG,
        "stabilityai/stable-diffusion-xl-base-1.0",
        seq_len=77,
        prediction_type="epsilon",
        scaling_factor=_SDXL_VAE,
    ),
    "dit-xl-2": _Spec(
        "dit",
        "DiTTransformer2DModel",
        DIT_XL_2_CONFIG,
        "facebook/DiT-XL-2-256",
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    # 120: the T5 max_sequence_length of the PixArt-alpha pipeline
    "pixart-alpha": _Spec(
        "pixart",
        "PixArtTransformer2DModel",
        PIXART_ALPHA_CONFIG,
        "PixArt-alpha/PixArt-XL-2-512x512",
        seq_len=120,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    # 300: the Gemma-2 max_sequence_length of the SANA pipeline
    "sana-600m": _Spec(
        "sana",
        "SanaTransformer2DModel",
        SANA_600M_CONFIG,
        "Efficient-Large-Model/Sana_600M_1024px_diffusers",
        seq_len=300,
        prediction_type="flow",
        scaling_factor=_DC_AE,
        **_SANA,
    ),
    "sd-vae-decoder": _Spec(
        "vae-decoder", "AutoencoderKL", SD_VAE_CONFIG, "runwayml/stable-diffusion-v1-5 vae"
    ),
    "clip-text-l14": _Spec(
        "text-encoder",
        "CLIPTextModel",
        CLIP_TEXT_L14_CONFIG,
        "runwayml/stable-diffusion-v1-5 text_encoder (openai/clip-vit-large-patch14)",
        seq_len=77,
    ),
    "tiny-sd15-unet": _Spec(
        "unet",
        "UNet2DConditionModel",
        TINY_SD15_UNET_CONFIG,
        "tiny sd15-unet",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-sdxl-unet": _Spec(
        "unet",
        "UNet2DConditionModel",
        TINY_SDXL_UNET_CONFIG,
        "tiny sdxl-unet",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SDXL_VAE,
    ),
    "tiny-dit": _Spec(
        "dit",
        "DiTTransformer2DModel",
        TINY_DIT_CONFIG,
        "tiny dit-xl-2",
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-pixart": _Spec(
        "pixart",
        "PixArtTransformer2DModel",
        TINY_PIXART_CONFIG,
        "tiny pixart-alpha",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-sana": _Spec(
        "sana",
        "SanaTransformer2DModel",
        TINY_SANA_CONFIG,
        "tiny sana-600m",
        seq_len=8,
        prediction_type="flow",
        scaling_factor=_DC_AE,
        **_SANA,
    ),
    "tiny-vae-decoder": _Spec("vae-decoder", "AutoencoderKL", TINY_VAE_CONFIG, "tiny sd-vae-decoder"),
    "tiny-clip-text": _Spec(
        "text-encoder", "CLIPTextModel", TINY_CLIP_TEXT_CONFIG, "tiny clip-text-l14", seq_len=8
    ),
}

# Defaults for models that arrive without a zoo spec (wrap / load_local); load_local overrides them from
# the pipeline's scheduler and vae configs when it can find them.
_DEFAULT_SEQ_LEN = {"unet": 77, "pixart": 120, "sana": 300}
_DEFAULT_PREDICTION = {"unet": "epsilon", "dit": "epsilon", "pixart": "epsilon", "sana": "flow"}
_DEFAULT_SCALING = {
    "unet": _SD_VAE,
    "sdxl-unet": _SDXL_VAE,
    "dit": _SD_VAE,
    "pixart": _SD_VAE,
    "sana": _DC_AE,
}
_NUM_TRAIN_TIMESTEPS = 1000  # every supported family was trained with 1000 steps (flow: t = 1000 * sigma)
_WRAPPABLE = (
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "SanaTransformer2DModel",
    "AutoencoderKL",
    "CLIPTextModel",
)
_TRANSFORMERS_CLASSES = ("CLIPTextModel",)  # built from the transformers library, not diffusers
# Older DiT / PixArt checkpoints name the generic class; diffusers picks the real one from norm_type.
_TRANSFORMER2D_REMAP = {
    "ada_norm_zero": "DiTTransformer2DModel",
    "ada_norm_single": "PixArtTransformer2DModel",
}


# --------------------------------------------------------------------------------------------------------
# Wrappers: positional tensors in, one tensor out, no Python-side branching on tensor values.
# --------------------------------------------------------------------------------------------------------


class UNetWrapper(nn.Module):
    """SD 1.x / 2.x UNet: ``(sample, timestep, encoder_hidden_states) -> noise_pred``."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


class SDXLUNetWrapper(nn.Module):
    """SDXL UNet: ``(sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> noise_pred``.

    The ``added_cond_kwargs`` dict SDXL needs is built here so the captured graph sees plain tensors.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(sample, timestep, encoder_hidden_states, added_cond_kwargs=added, return_dict=False)[
            0
        ]


class DiTWrapper(nn.Module):
    """DiT: ``(sample, timestep, class_labels) -> noise_pred`` (with learned sigma: 2x latent channels)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
    ) -> torch.Tensor:
        return self.transformer(sample, timestep=timestep, class_labels=class_labels, return_dict=False)[0]


class PixArtWrapper(nn.Module):
    """PixArt-alpha: ``(sample, timestep, encoder_hidden_states) -> noise_pred``.

    Models that use resolution / aspect-ratio conditioning (the 1024 variants) get it computed from the
    latent's static shape, as the PixArt pipeline does from the requested image size, so it becomes a
    constant of the captured graph rather than an extra input.
    """

    def __init__(self, transformer: nn.Module, vae_scale_factor: int = 8) -> None:
        super().__init__()
        self.transformer = transformer
        self.vae_scale_factor = vae_scale_factor

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            batch, _, height, width = sample.shape
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
            added["resolution"] = torch.tensor(
                [[float(height), float(width)]], dtype=sample.dtype, device=sample.device
            ).expand(batch, 2)
            added["aspect_ratio"] = torch.tensor(
                [[height / width]], dtype=sample.dtype, device=sample.device
            ).expand(batch, 1)
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class SanaWrapper(nn.Module):
    """SANA: ``(sample, timestep, encoder_hidden_states[, guidance]) -> flow prediction``.

    ``guidance`` exists only for guidance-distilled checkpoints (config ``guidance_embeds``).
    """

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            timestep=timestep,
            guidance=guidance,
            return_dict=False,
        )[0]


class VAEDecoderWrapper(nn.Module):
    """AutoencoderKL decoder: ``(latent) -> image``, i.e. ``vae.decode(latent / scaling_factor).sample``.

    The input is the scaled latent a sampler produces; the output is an image in roughly [-1, 1], not
    clamped (the pipeline's post-processing clamps). Only ``post_quant_conv`` and ``decoder`` are kept so the
    encoder's weights do not end up in the captured graph.
    """

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.post_quant_conv = vae.post_quant_conv  # None when config use_post_quant_conv is False
        self.decoder = vae.decoder
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent / self.scaling_factor
        if self.shift_factor:
            z = z + self.shift_factor
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


class CLIPTextEncoderWrapper(nn.Module):
    """CLIP text encoder (transformers' ``CLIPTextModel``): ``(input_ids) -> last_hidden_state``.

    The output is what SD 1.x/2.x pipelines feed the UNet as ``encoder_hidden_states``: the last layer's
    states after the final layer norm, for every token (no attention mask, as those pipelines call it).
    """

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, return_dict=False)[0]


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names accepted by :func:`build`, full-size models first, then their tiny versions."""
    return list(_SPECS)


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
    spec = _spec(name)
    model = _instantiate(spec.class_name, spec.config, seed=seed)
    return _make_zoo_model(
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
    PixArtTransformer2DModel, SanaTransformer2DModel, or AutoencoderKL, which gives its decoder path) or a
    transformers CLIPTextModel.

    Facts the model's own config does not hold (prediction type, VAE scaling factor) get the family's usual
    values; :func:`load_local` reads them from the pipeline folder instead. The model is shared, not
    copied, and is put in eval mode with gradients off.
    """
    return _make_zoo_model(model, name=name or type(model).__name__, batch=batch, latent_size=latent_size)


def load_local(
    path: str | os.PathLike,
    *,
    batch: int = 1,
    latent_size: int | None = None,
    subfolder: str | None = None,
    seq_len: int | None = None,
) -> ZooModel:
    """Load real weights from a local diffusers folder, never touching the network.

    ``path`` is either a component folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or
    ``.bin``) or a pipeline folder (``model_index.json``), where ``subfolder`` picks the component: by default
    ``unet`` if present, else ``transformer``; ``vae`` gives the VAE decoder and ``text_encoder`` the CLIP
    text encoder (transformers weights: ``model.safetensors`` or ``pytorch_model.bin``). The pipeline's
    scheduler and vae configs, when found, supply the prediction type and VAE scaling factor; its
    ``tokenizer/`` supplies a text encoder's bos/eos/pad ids. ``seq_len`` is the number of text tokens
    (default: 77, 120 or 300 for a denoiser's conditioning by family, a text encoder's position count).
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "not a directory" if root.exists() else "no such directory"
        raise ModelNotFoundError(
            f"{root}: {what}; expected a diffusers model folder (config.json + weights) "
            "or a pipeline folder (model_index.json)"
        )
    pipeline_dir: Path | None = None
    if (root / "model_index.json").is_file():
        pipeline_dir = root
        if subfolder is None:
            subfolder = next(
                (s for s in ("unet", "transformer") if (root / s / "config.json").is_file()), None
            )
            if subfolder is None:
                raise ModelNotFoundError(
                    f"{root}: pipeline folder has neither unet/ nor transformer/ with a config.json; "
                    "pass subfolder= to pick a component"
                )
    elif subfolder is None and (root.parent / "model_index.json").is_file():
        pipeline_dir = root.parent  # a component folder inside a pipeline: still use its scheduler/vae
    component = root / subfolder if subfolder else root
    if not (component / "config.json").is_file():
        found = sorted(p.name for p in root.iterdir() if (p / "config.json").is_file())
        raise ModelNotFoundError(
            f"{component}: no config.json; expected a diffusers model folder"
            + (f" (components here: {', '.join(found)})" if found else "")
        )
    try:
        config = json.loads((component / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"{component / 'config.json'}: unreadable model config ({exc})") from exc
    class_name = _resolve_class_name(config)
    if class_name not in _WRAPPABLE:
        raise ModelNotFoundError(
            f"{component}: model class {class_name or None!r} is not supported; "
            f"expected one of {', '.join(_WRAPPABLE)}"
        )
    from_transformers = class_name in _TRANSFORMERS_CLASSES
    stems = _TRANSFORMERS_WEIGHTS if from_transformers else _DIFFUSERS_WEIGHTS
    variant = _weights_variant(component, stems)
    if variant is False:
        raise ModelNotFoundError(f"{component}: no weights; expected {' or '.join(stems)} with config.json")

    if from_transformers:
        import transformers

        cls = getattr(transformers, class_name)
        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": torch.float32, "variant": variant}
    else:
        import diffusers

        cls = getattr(diffusers, class_name)
        kwargs = {"local_files_only": True, "torch_dtype": torch.float32, "variant": variant}
        if importlib.util.find_spec("accelerate") is None:
            kwargs["low_cpu_mem_usage"] = False  # what diffusers falls back to anyway, minus its warning
    with _offline():
        try:
            model, info = cls.from_pretrained(str(component), output_loading_info=True, **kwargs)
        except (OSError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelNotFoundError(f"{component}: could not load {class_name} weights: {first}") from exc
    # diffusers and transformers fill weights missing from the checkpoint with random ones and only warn;
    # a compiled model with silently random layers is worse than no model.
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise ModelNotFoundError(
            f"{component}: weights do not match config.json: {len(missing)} missing, e.g. {missing[0]}"
        )

    family = _family(model)
    facts = _pipeline_info(pipeline_dir) if pipeline_dir is not None else {}
    # Pipeline components are named "<pipeline>-<component>" so that e.g. two pipelines' unets differ.
    if pipeline_dir is None:
        name = root.name
    elif pipeline_dir is root:
        name = f"{root.name}-{subfolder}"
    else:
        name = f"{pipeline_dir.name}-{root.name}"
    extra_meta: dict[str, Any] = {"source": str(component.resolve()), "tiny": False}
    if family == "text-encoder" and pipeline_dir is not None and (pipeline_dir / "tokenizer").is_dir():
        from edgediff.runtime.tokenizer import CLIPTokenizer

        tokenizer = CLIPTokenizer.from_directory(pipeline_dir / "tokenizer")
        extra_meta.update(
            {f"{k}_token_id": getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
        )
    return _make_zoo_model(
        model,
        name=name,
        batch=batch,
        latent_size=latent_size,
        seq_len=seq_len,
        prediction_type=facts.get("prediction_type") if family != "vae-decoder" else None,
        scaling_factor=facts.get("scaling_factor"),
        vae_scale_factor=facts.get("vae_scale_factor"),
        num_time_ids=facts.get("num_time_ids", 6),
        extra_meta=extra_meta,
    )


# --------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------


def _spec(name: str) -> _Spec:
    try:
        return _SPECS[name]
    except KeyError:
        close = difflib.get_close_matches(name, _SPECS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ModelNotFoundError(f"unknown zoo model {name!r}{hint} (valid: {', '.join(_SPECS)})") from None


def _instantiate(
    class_name: str, config: Mapping[str, Any], *, seed: int = 0, meta: bool = False
) -> nn.Module:
    """Build a diffusers (or transformers) model from ``config``; ``meta=True`` allocates no storage (to count
    parameters)."""
    if meta:
        with torch.device("meta"):
            return _new_model(class_name, config)
    # fork_rng keeps the caller's global RNG untouched while making the init reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _new_model(class_name, config)


def _new_model(class_name: str, config: Mapping[str, Any]) -> nn.Module:
    if class_name in _TRANSFORMERS_CLASSES:
        import transformers

        cls = getattr(transformers, class_name)
        return cls(cls.config_class(**config))
    import diffusers

    return getattr(diffusers, class_name).from_config(dict(config))


def _resolve_class_name(config: Mapping[str, Any]) -> str:
    # diffusers configs name their class in _class_name, transformers configs in architectures
    name = str(config.get("_class_name") or (config.get("architectures") or [""])[0])
    if name == "Transformer2DModel":
        return _TRANSFORMER2D_REMAP.get(config.get("norm_type", ""), name)
    return name


_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def _weights_variant(component: Path, stems: tuple[str, ...] = _DIFFUSERS_WEIGHTS) -> str | None | bool:
    """The ``variant`` to load (None: the plain file), or False when there are no weights."""
    for stem in stems:
        if (component / stem).is_file() or (component / f"{stem}.index.json").is_file():
            return None
    # Only e.g. diffusion_pytorch_model.fp16.safetensors: load that variant (upcast to float32 on load).
    for stem in stems:
        base, ext = stem.rsplit(".", 1)
        for candidate in sorted(component.glob(f"{base}.*.{ext}")):
            parts = candidate.name.split(".")
            if len(parts) == 3:
                return parts[1]
    return False


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Belt and braces with ``local_files_only``: tell huggingface_hub not to reach the network."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _pipeline_info(pipeline_dir: Path) -> dict[str, Any]:
    """Prediction type, VAE factors and SDXL time-id count recorded elsewhere in a pipeline folder."""
    info: dict[str, Any] = {}
    if _read_json(pipeline_dir / "model_index.json").get("requires_aesthetics_score"):
        info["num_time_ids"] = 5  # the SDXL refiner conditions on an aesthetic score, not a target size
    sched = _read_json(pipeline_dir / "scheduler" / "scheduler_config.json")
    if sched:
        pred = sched.get("prediction_type")
        if pred == "flow_prediction" or "FlowMatch" in str(sched.get("_class_name", "")):
            info["prediction_type"] = "flow"
        elif pred in ("epsilon", "v_prediction", "sample"):
            info["prediction_type"] = pred
    vae = _read_json(pipeline_dir / "vae" / "config.json")
    if vae:
        # AutoencoderKL's default, which old SD configs leave implicit.
        info["scaling_factor"] = float(vae.get("scaling_factor") or 0.18215)
        if vae.get("_class_name") == "AutoencoderKL" and vae.get("block_out_channels"):
            info["vae_scale_factor"] = 2 ** (len(vae["block_out_channels"]) - 1)
    return info


def _family(model: nn.Module) -> str:
    name = type(model).__name__
    families = {
        "UNet2DConditionModel": "unet",
        "DiTTransformer2DModel": "dit",
        "PixArtTransformer2DModel": "pixart",
        "SanaTransformer2DModel": "sana",
        "AutoencoderKL": "vae-decoder",
        "CLIPTextModel": "text-encoder",
    }
    if name not in families:
        raise ModelNotFoundError(f"cannot wrap {name}: expected one of {', '.join(families)}")
    return families[name]


def _jsonable(value: Any) -> Any:
    """Config values as plain JSON types (diffusers configs hold tuples and FrozenDicts)."""
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, (tuple, set)) else str(v)))


def _first(value: Any) -> Any:
    return value[0] if isinstance(value, (list, tuple)) else value


def _make_text_encoder(
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


def _make_zoo_model(
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
    family = _family(model)
    cfg = model.config
    if not isinstance(batch, int) or batch < 1:
        raise InputError(f"{name}: batch must be a positive integer, got {batch!r}")
    if family == "text-encoder":
        if latent_size is not None:
            raise InputError(f"{name}: latent_size does not apply to a text encoder")
        return _make_text_encoder(
            model, name=name, batch=batch, seed=seed, seq_len=seq_len, extra_meta=extra_meta
        )

    if family == "vae-decoder":
        n_up = len(cfg.block_out_channels) - 1
        default_latent = int(_first(cfg.sample_size)) // 2**n_up
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
    timestep = torch.randint(0, _NUM_TRAIN_TIMESTEPS, (batch,), generator=gen).to(torch.float32)
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
        tokens = seq_len or _DEFAULT_SEQ_LEN["unet"]
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
        tokens = seq_len or _DEFAULT_SEQ_LEN["pixart"]
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
        tokens = seq_len or _DEFAULT_SEQ_LEN["sana"]
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
        module = VAEDecoderWrapper(model)
        inputs = (sample,)
        names = ("latent",)
        out_names = ("image",)
        meta.update(
            scaling_factor=module.scaling_factor,
            shift_factor=module.shift_factor,
            image_channels=cfg.out_channels,
            output_range=[-1.0, 1.0],
        )

    if family != "vae-decoder":
        sdxl = family == "unet" and cfg.addition_embed_type == "text_time"
        scaling_key = "sdxl-unet" if sdxl else family
        latent_channels = int(cfg.in_channels)
        out_ch = int(cfg.out_channels or cfg.in_channels)
        learned_sigma = out_ch == 2 * latent_channels
        meta.update(
            prediction_type=prediction_type or _DEFAULT_PREDICTION[family],
            scaling_factor=scaling_factor if scaling_factor is not None else _DEFAULT_SCALING[scaling_key],
            num_train_timesteps=_NUM_TRAIN_TIMESTEPS,
            learned_sigma=learned_sigma,
            # Channels [start, stop) of the output that are the prediction proper; with learned sigma the
            # second half holds the variance interpolation values, which samplers other than DDPM ignore.
            noise_pred_channels=[0, latent_channels],
        )
    else:
        latent_channels = int(cfg.latent_channels)
        out_ch = int(cfg.out_channels)
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
