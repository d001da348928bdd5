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
    AutoencoderKL,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
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
        unet=_seeded(3, lambda: UNet2DConditionModel.from_config(zoo.TINY_SDXL_UNET_CONFIG)),
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
