"""Tiny diffusers pipeline folders of each model family, for compile-pipeline / generate tests.

Each folder is written by the diffusers pipeline's own ``save_pretrained`` (model_index.json, scheduler,
components), from tiny configs with seeded weights, so it is laid out exactly as a downloaded pipeline is.
The in-memory pipeline is returned too: it is the reference the compiled set is compared with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers import CLIPTokenizer as HFCLIPTokenizer

from edgediff import zoo
from tests.runtime.tokenizer_fixtures import CORPUS, write_tokenizer

SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
DIT_BETAS = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}  # facebook/DiT-XL-2-256
TEXT_TOKENS = 8  # every tiny text encoder's sequence length


def _seeded(seed: int, make: Any) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval()


def tiny_vae(scaling_factor: float = 0.18215) -> AutoencoderKL:
    return _seeded(
        0, lambda: AutoencoderKL.from_config({**zoo.TINY_VAE_CONFIG, "scaling_factor": scaling_factor})
    )


def clip_config(hidden: int, projection: int) -> CLIPTextConfig:
    # bos/eos are the vocabulary's last two ids, as write_tokenizer lays it out (and as in CLIP)
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,  # SDXL takes the penultimate layer's states: keep a layer after it
        num_attention_heads=2,
        max_position_embeddings=TEXT_TOKENS,
        projection_dim=projection,
        hidden_act="quick_gelu",
        bos_token_id=998,
        eos_token_id=999,
        pad_token_id=999,
    )


# zoo.TINY_SDXL_UNET_CONFIG with one level fewer (the compile is the slowest part of the SDXL test): still
# text_time added conditioning, per-block head counts, linear projections, two transformer layers deep down.
SDXL_UNET_CONFIG = {
    **zoo.TINY_SDXL_UNET_CONFIG,
    "attention_head_dim": [1, 2],
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "transformer_layers_per_block": [1, 2],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


def write_sdxl_pipeline(folder: Path) -> StableDiffusionXLPipeline:
    """SDXL: CLIP ViT-L-like ``text_encoder`` (16 wide) and OpenCLIP-bigG-like ``text_encoder_2`` with a
    32-wide projection (16 wide), whose penultimate states concatenate to the UNet's 32-wide cross-attention
    and whose pooled projection + 6 time ids fill its 80-wide added embedding. ``tokenizer_2`` pads with "!"
    as SDXL's second tokenizer does."""
    tokenizers = folder / "_tokenizers"
    tok1 = write_tokenizer(tokenizers / "tokenizer", vocab_size=1000, model_max_length=TEXT_TOKENS)
    tok2 = write_tokenizer(
        tokenizers / "tokenizer_2", vocab_size=1000, model_max_length=TEXT_TOKENS, pad_token="!"
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(0.13025),
        text_encoder=_seeded(1, lambda: CLIPTextModel(clip_config(16, 16))),
        text_encoder_2=_seeded(2, lambda: CLIPTextModelWithProjection(clip_config(16, 32))),
        tokenizer=HFCLIPTokenizer.from_pretrained(tok1),
        tokenizer_2=HFCLIPTokenizer.from_pretrained(tok2),
        unet=_seeded(3, lambda: UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)),
        scheduler=EulerDiscreteScheduler(**SD_BETAS, timestep_spacing="leading", steps_offset=1),
        force_zeros_for_empty_prompt=True,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    for name in ("tokenizer", "tokenizer_2"):  # the pipeline saved them; drop the sources
        for file in (tokenizers / name).iterdir():
            file.unlink()
        (tokenizers / name).rmdir()
    tokenizers.rmdir()
    return pipe


def write_dit_pipeline(folder: Path) -> DiTPipeline:
    """DiT: a tiny class-conditional transformer (learned sigma, 1000 classes + the null class) and VAE."""
    pipe = DiTPipeline(
        transformer=_seeded(0, lambda: DiTTransformer2DModel.from_config(zoo.TINY_DIT_CONFIG)),
        vae=tiny_vae(),
        scheduler=DPMSolverMultistepScheduler(**DIT_BETAS, algorithm_type="dpmsolver++"),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    return pipe


def write_t5_tokenizer(folder: Path) -> Path:
    """A T5-style tokenizer.json built with ``tokenizers``: a unigram model trained on the test corpus,
    Metaspace pre-tokenization, ``</s>`` appended, ids 0/1/2 = pad/eos/unk as in T5."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Replace(" {2,}", " ")
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=200, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>"
    )
    tokenizer.train_from_iterator(CORPUS.split("\n"), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 512}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "T5Tokenizer"}))
    return folder


def t5_config(vocab_size: int = 256, d_model: int = 32) -> T5Config:
    """A tiny T5 v1.1 encoder (gated GELU, relative position buckets), ``d_model`` = the captions' width."""
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )


def write_pixart_pipeline(folder: Path) -> PixArtAlphaPipeline:
    """PixArt-alpha: a tiny T5 encoder (32 wide = the transformer's caption_channels), its unigram
    tokenizer, the tiny PixArt transformer (learned sigma) and VAE."""
    tokenizer = T5Tokenizer.from_pretrained(write_t5_tokenizer(folder / "_tokenizer"))
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(1, lambda: T5EncoderModel(t5_config())),
        vae=tiny_vae(),
        transformer=_seeded(2, lambda: PixArtTransformer2DModel.from_config(zoo.TINY_PIXART_CONFIG)),
        scheduler=DPMSolverMultistepScheduler(**DIT_BETAS, algorithm_type="dpmsolver++"),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    for file in (folder / "_tokenizer").iterdir():
        file.unlink()
    (folder / "_tokenizer").rmdir()
    return pipe


def write_gemma_tokenizer(folder: Path) -> Path:
    """A Gemma-style tokenizer.json built with ``tokenizers``: byte-fallback BPE over "\u2581"-joined words
    (no pre-tokenizer), ``<bos>`` prepended, ids 0-3 = pad/eos/bos/unk as in Gemma; trained on the test
    corpus and SANA's instruction so that the instruction takes 303 tokens, not thousands."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    from edgediff.zoo.pipelines import SANA_INSTRUCTION

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    alphabet = [f"<0x{b:02X}>" for b in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=specials + alphabet, show_progress=False)
    tokenizer.train_from_iterator((CORPUS + "\n".join(SANA_INSTRUCTION)).split("\n"), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)]
    )
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "bos_token": "<bos>",
        "unk_token": "<unk>",
        "model_max_length": 8192,
        "padding_side": "left",  # as Gemma ships it; SanaPipeline pads on the right
    }
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "GemmaTokenizer"}))
    return folder


def gemma_config(vocab_size: int = 704, hidden_size: int = 32) -> Gemma2Config:
    """A tiny Gemma-2 (grouped-query attention, soft-capping, a sliding window shorter than SANA's 309
    tokens so that the sliding layers' mask matters)."""
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )


def tiny_dc_ae() -> AutoencoderDC:
    """A DC-AE with three levels (4x) and one linear-attention block, 8 latent channels."""
    blocks = ("ResBlock", "ResBlock", "EfficientViTBlock")
    return _seeded(
        0,
        lambda: AutoencoderDC(
            latent_channels=8,
            attention_head_dim=8,
            encoder_block_types=blocks,
            decoder_block_types=blocks,
            encoder_block_out_channels=(8, 16, 16),
            decoder_block_out_channels=(8, 16, 16),
            encoder_layers_per_block=(1, 1, 1),
            decoder_layers_per_block=(1, 1, 1),
            encoder_qkv_multiscales=((), (), (5,)),
            decoder_qkv_multiscales=((), (), (5,)),
            scaling_factor=0.41407,
        ),
    )


def write_sana_pipeline(folder: Path) -> SanaPipeline:
    """SANA: a tiny Gemma-2 encoder (32 wide = caption_channels), its BPE tokenizer, the tiny SANA
    transformer, a tiny DC-AE and SANA's flow-matching scheduler with shift 3."""
    tokenizer = GemmaTokenizer.from_pretrained(write_gemma_tokenizer(folder / "_tokenizer"))
    pipe = SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=_seeded(1, lambda: Gemma2Model(gemma_config())),
        vae=tiny_dc_ae(),
        transformer=_seeded(2, lambda: SanaTransformer2DModel.from_config(zoo.TINY_SANA_CONFIG)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(folder)
    for file in (folder / "_tokenizer").iterdir():
        file.unlink()
    (folder / "_tokenizer").rmdir()
    return pipe
