"""Zoo configs: the published diffusers configs of each model, tiny versions, and per-family defaults."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

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


# stabilityai/stable-diffusion-xl-base-1.0, text_encoder_2/config.json: OpenCLIP ViT-bigG/14's text tower
# with its projection (694,659,840 parameters); SDXL takes its penultimate states and pooled projection.
CLIP_TEXT_BIGG14_CONFIG: dict[str, Any] = {
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "pad_token_id": 1,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

# PixArt-alpha/PixArt-XL-2-512x512, text_encoder/config.json (google/t5-v1_1-xxl), the encoder only
# (4,762,310,656 parameters: 19 GB in float32).
T5_V1_1_XXL_ENCODER_CONFIG: dict[str, Any] = {
    "d_ff": 10240,
    "d_kv": 64,
    "d_model": 4096,
    "dense_act_fn": "gelu_new",
    "dropout_rate": 0.1,
    "eos_token_id": 1,
    "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0,
    "is_encoder_decoder": False,
    "layer_norm_epsilon": 1e-06,
    "num_heads": 64,
    "num_layers": 24,
    "pad_token_id": 0,
    "relative_attention_max_distance": 128,
    "relative_attention_num_buckets": 32,
    "tie_word_embeddings": False,
    "use_cache": False,
    "vocab_size": 32128,
}

# Efficient-Large-Model/Sana_600M_1024px_diffusers, text_encoder/config.json (google/gemma-2-2b-it as a
# Gemma2Model: 2,614,341,888 parameters).
GEMMA_2_2B_CONFIG: dict[str, Any] = {
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "vocab_size": 256000,
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
class ZooSpec:
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

SPECS: dict[str, ZooSpec] = {
    "sd15-unet": ZooSpec(
        "unet",
        "UNet2DConditionModel",
        SD15_UNET_CONFIG,
        "runwayml/stable-diffusion-v1-5",
        seq_len=77,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "sdxl-unet": ZooSpec(
        "unet",
        "UNet2DConditionModel",
        SDXL_UNET_CONFIG,
        "stabilityai/stable-diffusion-xl-base-1.0",
        seq_len=77,
        prediction_type="epsilon",
        scaling_factor=_SDXL_VAE,
    ),
    "dit-xl-2": ZooSpec(
        "dit",
        "DiTTransformer2DModel",
        DIT_XL_2_CONFIG,
        "facebook/DiT-XL-2-256",
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    # 120: the T5 max_sequence_length of the PixArt-alpha pipeline
    "pixart-alpha": ZooSpec(
        "pixart",
        "PixArtTransformer2DModel",
        PIXART_ALPHA_CONFIG,
        "PixArt-alpha/PixArt-XL-2-512x512",
        seq_len=120,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    # 300: the Gemma-2 max_sequence_length of the SANA pipeline
    "sana-600m": ZooSpec(
        "sana",
        "SanaTransformer2DModel",
        SANA_600M_CONFIG,
        "Efficient-Large-Model/Sana_600M_1024px_diffusers",
        seq_len=300,
        prediction_type="flow",
        scaling_factor=_DC_AE,
        **_SANA,
    ),
    "sd-vae-decoder": ZooSpec(
        "vae-decoder", "AutoencoderKL", SD_VAE_CONFIG, "runwayml/stable-diffusion-v1-5 vae"
    ),
    "clip-text-l14": ZooSpec(
        "text-encoder",
        "CLIPTextModel",
        CLIP_TEXT_L14_CONFIG,
        "runwayml/stable-diffusion-v1-5 text_encoder (openai/clip-vit-large-patch14)",
        seq_len=77,
    ),
    # the other text encoders of the pipelines, as compile-pipeline wraps them (see zoo/pipelines.py)
    "clip-text-bigg14": ZooSpec(
        "text-encoder",
        "CLIPTextModelWithProjection",
        CLIP_TEXT_BIGG14_CONFIG,
        "stabilityai/stable-diffusion-xl-base-1.0 text_encoder_2 (OpenCLIP ViT-bigG/14)",
        seq_len=77,
    ),
    "t5-v1_1-xxl-encoder": ZooSpec(
        "text-encoder",
        "T5EncoderModel",
        T5_V1_1_XXL_ENCODER_CONFIG,
        "PixArt-alpha/PixArt-XL-2-512x512 text_encoder (google/t5-v1_1-xxl)",
        seq_len=120,  # PixArt-alpha's max_sequence_length
    ),
    "gemma-2-2b": ZooSpec(
        "text-encoder",
        "Gemma2Model",
        GEMMA_2_2B_CONFIG,
        "Efficient-Large-Model/Sana_600M_1024px_diffusers text_encoder (google/gemma-2-2b-it)",
        seq_len=300,  # SANA's max_sequence_length (its instruction adds more: see zoo/pipelines.py)
    ),
    "tiny-sd15-unet": ZooSpec(
        "unet",
        "UNet2DConditionModel",
        TINY_SD15_UNET_CONFIG,
        "tiny sd15-unet",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-sdxl-unet": ZooSpec(
        "unet",
        "UNet2DConditionModel",
        TINY_SDXL_UNET_CONFIG,
        "tiny sdxl-unet",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SDXL_VAE,
    ),
    "tiny-dit": ZooSpec(
        "dit",
        "DiTTransformer2DModel",
        TINY_DIT_CONFIG,
        "tiny dit-xl-2",
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-pixart": ZooSpec(
        "pixart",
        "PixArtTransformer2DModel",
        TINY_PIXART_CONFIG,
        "tiny pixart-alpha",
        seq_len=8,
        prediction_type="epsilon",
        scaling_factor=_SD_VAE,
    ),
    "tiny-sana": ZooSpec(
        "sana",
        "SanaTransformer2DModel",
        TINY_SANA_CONFIG,
        "tiny sana-600m",
        seq_len=8,
        prediction_type="flow",
        scaling_factor=_DC_AE,
        **_SANA,
    ),
    "tiny-vae-decoder": ZooSpec("vae-decoder", "AutoencoderKL", TINY_VAE_CONFIG, "tiny sd-vae-decoder"),
    "tiny-clip-text": ZooSpec(
        "text-encoder", "CLIPTextModel", TINY_CLIP_TEXT_CONFIG, "tiny clip-text-l14", seq_len=8
    ),
}

# Defaults for models that arrive without a zoo spec (wrap / load_local); load_local overrides them from
# the pipeline's scheduler and vae configs when it can find them.
DEFAULT_SEQ_LEN = {"unet": 77, "pixart": 120, "sana": 300}
DEFAULT_PREDICTION = {"unet": "epsilon", "dit": "epsilon", "pixart": "epsilon", "sana": "flow"}
DEFAULT_SCALING = {
    "unet": _SD_VAE,
    "sdxl-unet": _SDXL_VAE,
    "dit": _SD_VAE,
    "pixart": _SD_VAE,
    "sana": _DC_AE,
}
NUM_TRAIN_TIMESTEPS = 1000  # every supported family was trained with 1000 steps (flow: t = 1000 * sigma)
WRAPPABLE = (
    "UNet2DConditionModel",
    "DiTTransformer2DModel",
    "PixArtTransformer2DModel",
    "SanaTransformer2DModel",
    "AutoencoderKL",
    "AutoencoderDC",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "T5EncoderModel",
    "Gemma2Model",
)
TRANSFORMERS_CLASSES = (
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "T5EncoderModel",
    "Gemma2Model",
)  # built from the transformers library, not diffusers
# Older DiT / PixArt checkpoints name the generic class; diffusers picks the real one from norm_type.
TRANSFORMER2D_REMAP = {
    "ada_norm_zero": "DiTTransformer2DModel",
    "ada_norm_single": "PixArtTransformer2DModel",
}
