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

from edgediff.zoo.builder import FAMILIES, ZooModel, build, instantiate, list_models, wrap
from edgediff.zoo.configs import (
    CLIP_TEXT_L14_CONFIG,
    CLIP_TOKEN_IDS,
    DIT_XL_2_CONFIG,
    PIXART_ALPHA_CONFIG,
    SANA_600M_CONFIG,
    SD15_UNET_CONFIG,
    SD_VAE_CONFIG,
    SDXL_UNET_CONFIG,
    SPECS,
    TINY_CLIP_TEXT_CONFIG,
    TINY_DIT_CONFIG,
    TINY_PIXART_CONFIG,
    TINY_SANA_CONFIG,
    TINY_SD15_UNET_CONFIG,
    TINY_SDXL_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from edgediff.zoo.local import load_local

__all__ = [
    "CLIP_TEXT_L14_CONFIG",
    "CLIP_TOKEN_IDS",
    "DIT_XL_2_CONFIG",
    "FAMILIES",
    "PIXART_ALPHA_CONFIG",
    "SANA_600M_CONFIG",
    "SD15_UNET_CONFIG",
    "SDXL_UNET_CONFIG",
    "SD_VAE_CONFIG",
    "SPECS",
    "TINY_CLIP_TEXT_CONFIG",
    "TINY_DIT_CONFIG",
    "TINY_PIXART_CONFIG",
    "TINY_SANA_CONFIG",
    "TINY_SD15_UNET_CONFIG",
    "TINY_SDXL_UNET_CONFIG",
    "TINY_VAE_CONFIG",
    "ZooModel",
    "build",
    "instantiate",
    "list_models",
    "load_local",
    "wrap",
]
