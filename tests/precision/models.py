"""A tiny denoiser with one deliberately fragile layer, for the precision tests.

``FragileDenoiser`` maps ``(sample, timestep) -> noise prediction`` through convolutions, a timestep
embedding and a self-attention block. ``fragile`` is built so that per-channel int8 (or int4) weights
destroy it while the float model is unaffected: each of its output channels has one huge weight (50) on
an input channel that is always zero (``mid`` never writes channel 0), so the channel's scale is set by a
weight that never matters and every useful weight (~0.1) rounds to zero.
"""

from __future__ import annotations

import torch
from torch import nn

FRAGILE = "fragile"


class _Attention(nn.Module):
    """Self-attention over pixels with a ``processor`` attribute, as diffusers' Attention has."""

    processor = "sdpa"

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = (
            proj(tokens).reshape(b, h * w, 2, c // 2).transpose(1, 2)
            for proj in (self.to_q, self.to_k, self.to_v)
        )
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class FragileDenoiser(nn.Module):
    def __init__(self, channels: int = 16) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.time = nn.Linear(32, channels)
        self.attn = _Attention(channels)
        self.mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.fragile = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv_out = nn.Conv2d(channels, 4, 3, padding=1)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.1
        with torch.no_grad():
            self.mid.weight[0].zero_()
            self.mid.bias[0] = -20.0  # silu(-20) ~ -4e-8: input channel 0 of `fragile` is ~zero
            self.fragile.weight[:, 0] = 50.0
        self.eval().requires_grad_(False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        freqs = torch.exp(-torch.arange(16, dtype=torch.float32) * 0.5)
        angles = timestep.float()[:, None] * freqs[None] / 100.0
        embedding = self.time(torch.cat([angles.sin(), angles.cos()], dim=1))[:, :, None, None]
        h = nn.functional.silu(self.conv_in(sample)) + embedding
        h = self.attn(h)
        h = nn.functional.silu(self.mid(h))
        h = nn.functional.silu(self.fragile(h))
        return self.conv_out(h)


def fragile_model() -> tuple[FragileDenoiser, tuple[torch.Tensor, torch.Tensor], tuple[str, str]]:
    """The model, example inputs (one 8x8 latent at t=500) and input names."""
    gen = torch.Generator().manual_seed(1)
    inputs = (torch.randn(1, 4, 8, 8, generator=gen), torch.tensor([500.0]))
    return FragileDenoiser(), inputs, ("sample", "timestep")
