"""Export-friendly wrappers: positional tensors in, one tensor out, for each diffusers model family."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

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


class DCAEDecoderWrapper(nn.Module):
    """AutoencoderDC (SANA's DC-AE) decoder: ``(latent) -> image``, i.e.
    ``vae.decode(latent / scaling_factor).sample`` without tiling; only the decoder's weights are kept."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.decoder = vae.decoder
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = 0.0

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent / self.scaling_factor)


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


class CLIPPenultimateWrapper(nn.Module):
    """An SDXL CLIP encoder: ``(input_ids) -> penultimate hidden states`` and, for ``text_encoder_2``
    (``CLIPTextModelWithProjection``), also ``-> pooled projection`` (``text_embeds``)."""

    def __init__(self, text_encoder: nn.Module, pooled: bool) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.text_encoder(input_ids, output_hidden_states=True)
        if self.pooled:
            return out.hidden_states[-2], out.text_embeds
        return out.hidden_states[-2]


class MaskedEncoderWrapper(nn.Module):
    """T5 or Gemma-2 encoder: ``(input_ids, attention_mask) -> last_hidden_state``."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


class MaskedPixArtWrapper(PixArtWrapper):
    """PixArt-alpha with its text's attention mask: ``(sample, timestep, encoder_hidden_states,
    encoder_attention_mask) -> noise_pred`` (the mask keeps padding out of cross-attention, as the pipeline
    passes it)."""

    def forward(  # type: ignore[override]
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
        if self.transformer.use_additional_conditions:
            batch, _, height, width = sample.shape
            height, width = height * self.vae_scale_factor, width * self.vae_scale_factor
            added["resolution"] = torch.tensor([[float(height), float(width)]]).expand(batch, 2)
            added["aspect_ratio"] = torch.tensor([[height / width]]).expand(batch, 1)
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


class MaskedSanaWrapper(nn.Module):
    """SANA with its text's attention mask: ``(sample, timestep, encoder_hidden_states,
    encoder_attention_mask) -> flow prediction``."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.transformer(
            sample,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            # SanaPipeline scales the timestep by the config's timestep_scale (1 for SANA 600M / 1.6B)
            timestep=timestep * float(self.transformer.config.timestep_scale),
            return_dict=False,
        )[0]
