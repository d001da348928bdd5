"""Prompt text -> a denoiser's conditioning for the families beyond SD 1.x/2.x, torch-free.

Each class reproduces what its diffusers pipeline's ``encode_prompt`` (and the rest of its ``__call__`` up
to the denoiser call) feeds the denoiser, on compiled text encoders:

- SDXL (``StableDiffusionXLPipeline``): two CLIP encoders; the penultimate layer's states of both,
  concatenated along the width, are ``encoder_hidden_states``; the second encoder's pooled projection is
  ``text_embeds``; ``time_ids`` are (original height, width, crop top, left, target height, width), here the
  generated size with no crop. Without a negative prompt the negative conditioning is all zeros
  (``force_zeros_for_empty_prompt``), else the negative prompt's.
- PixArt-alpha (``PixArtAlphaPipeline``): a T5 encoder on the lower-cased, stripped prompt padded to
  ``max_sequence_length``, with its attention mask, which the transformer also takes (padding is masked out
  of cross-attention). The negative prompt defaults to "".
- SANA (``SanaPipeline``): a Gemma-2 encoder; the prompt is prefixed with the complex human instruction,
  encoded at ``instruction tokens + max_sequence_length - 2`` tokens, and the first state plus the last
  ``max_sequence_length - 1`` are kept (with the mask). The negative prompt has no instruction and is
  encoded at ``max_sequence_length`` tokens; since Gemma is causal and the padding is on the right, its
  states are the first ``max_sequence_length`` of the same encoder run at the longer length.

An artifact set records its family and these options in ``conditioning.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import InputError
from edgediff.runtime.artifact import CompiledModule
from edgediff.runtime.tensor_info import TensorInfo
from edgediff.runtime.text_tokenizer import JSONTokenizer
from edgediff.runtime.tokenizer import CLIPTokenizer

CONDITIONING_FILE = "conditioning.json"
FAMILIES = ("sdxl", "pixart", "sana")

Arrays = dict[str, np.ndarray]


def _check_inputs(takes: Sequence[TensorInfo], makes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """The denoiser must take exactly the conditioning ``makes`` (name -> shape past the batch)."""
    got = {info.name: tuple(info.shape[1:]) for info in takes}
    if got != dict(makes):
        expected = ", ".join(f"{n}: [B, {', '.join(map(str, s))}]" for n, s in makes.items())
        raise InputError(
            f"{where} make {expected}; the denoiser takes "
            + (", ".join(i.describe() for i in takes) or "no conditioning")
        )


def _one_int_input(module: CompiledModule, count: int, where: str) -> int:
    """The sequence length of a text encoder whose ``count`` inputs are int ``[1, seq]`` (ids, mask)."""
    inputs = module.inputs
    if len(inputs) != count or any(
        len(i.shape) != 2 or i.shape[0] != 1 or not i.dtype.startswith("int") or i.shape != inputs[0].shape
        for i in inputs
    ):
        what = "token ids" if count == 1 else "token ids and attention mask"
        raise InputError(
            f"{where}: expected {count} integer input(s) ({what}) of shape [1, seq], got "
            + "; ".join(i.describe() for i in inputs)
        )
    return int(inputs[0].shape[1])


class PromptConditioner:
    """Base: the compiled text encoders of one family and how prompts become the denoiser's inputs."""

    family = ""

    def __init__(self, encoders: Mapping[str, CompiledModule], options: Mapping[str, Any]) -> None:
        self.encoders = dict(encoders)
        self.options = dict(options)

    def check(self, conditioning: Sequence[TensorInfo]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(
        self, prompt: str, negative_prompt: str | None, *, use_cfg: bool, height: int, width: int
    ) -> tuple[Arrays, Arrays | None]:  # pragma: no cover - abstract
        raise NotImplementedError


class SDXLConditioner(PromptConditioner):
    """Two CLIP encoders: ``text_encoder`` (penultimate states) and ``text_encoder_2`` (penultimate states,
    pooled projection)."""

    family = "sdxl"

    def __init__(
        self,
        encoders: Mapping[str, CompiledModule],
        tokenizers: Mapping[str, CLIPTokenizer],
        options: Mapping[str, Any],
    ) -> None:
        super().__init__(encoders, options)
        self.tokenizers = dict(tokenizers)
        self.force_zeros = bool(options.get("force_zeros_for_empty_prompt", True))
        for role in ("text_encoder", "text_encoder_2"):
            if role not in self.encoders or role not in self.tokenizers:
                raise InputError(f"an SDXL set needs {role}/ and its tokenizer; it has none")
            self.tokenizers[role].check_fits(
                self.encoders[role].manifest["model"].get("meta") or {}, f"{role} {self.encoders[role].path}"
            )
        one, two = self.encoders["text_encoder"], self.encoders["text_encoder_2"]
        self.seq_len = _one_int_input(one, 1, f"text_encoder {one.path}")
        if _one_int_input(two, 1, f"text_encoder_2 {two.path}") != self.seq_len:
            raise InputError(
                f"text_encoder_2 {two.path} takes {two.inputs[0].shape[1]} tokens, not {self.seq_len}"
            )
        if len(one.outputs) != 1 or len(two.outputs) != 2:
            raise InputError(
                f"SDXL text encoders: text_encoder must make 1 output (hidden states), text_encoder_2 two "
                f"(hidden states, pooled projection); they make {len(one.outputs)} and {len(two.outputs)}"
            )
        self.widths = (one.outputs[0].shape[-1], two.outputs[0].shape[-1])
        self.pooled = two.outputs[1].shape[-1]

    def check(self, conditioning: Sequence[TensorInfo]) -> None:
        makes = {
            "encoder_hidden_states": (self.seq_len, sum(self.widths)),
            "text_embeds": (self.pooled,),
            "time_ids": (6,),
        }
        _check_inputs(conditioning, makes, "the SDXL text encoders")

    def _embed(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        states = []
        pooled = None
        for role in ("text_encoder", "text_encoder_2"):
            ids = self.tokenizers[role].encode(text, self.seq_len)[None]
            out = self.encoders[role](ids)
            if isinstance(out, tuple):
                out, pooled = out
            states.append(np.asarray(out))
        assert pooled is not None
        return np.concatenate(states, axis=-1), np.asarray(pooled)

    def encode(
        self, prompt: str, negative_prompt: str | None, *, use_cfg: bool, height: int, width: int
    ) -> tuple[Arrays, Arrays | None]:
        time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
        states, pooled = self._embed(prompt)
        cond = {"encoder_hidden_states": states, "text_embeds": pooled, "time_ids": time_ids}
        if not use_cfg:
            return cond, None
        if negative_prompt is None and self.force_zeros:
            neg_states, neg_pooled = np.zeros_like(states), np.zeros_like(pooled)
        else:
            neg_states, neg_pooled = self._embed(negative_prompt or "")
        return cond, {"encoder_hidden_states": neg_states, "text_embeds": neg_pooled, "time_ids": time_ids}


class MaskedTextConditioner(PromptConditioner):
    """One encoder taking ``(input_ids, attention_mask)`` whose states and mask the transformer takes as
    ``encoder_hidden_states`` and ``encoder_attention_mask``: PixArt-alpha (T5) and SANA (Gemma-2)."""

    def __init__(
        self, encoder: CompiledModule, tokenizer: JSONTokenizer, options: Mapping[str, Any], family: str
    ) -> None:
        super().__init__({"text_encoder": encoder}, options)
        self.family = family
        self.tokenizer = tokenizer
        where = f"text_encoder {encoder.path}"
        tokenizer.check_fits(encoder.manifest["model"].get("meta") or {}, where)
        self.encoder_len = _one_int_input(encoder, 2, where)
        self.max_len = int(options.get("max_sequence_length") or self.encoder_len)
        self.instruction = (
            "\n".join(options.get("complex_human_instruction") or []) if family == "sana" else ""
        )
        if self.instruction:
            # what the encoder must be compiled for: the instruction's tokens + the prompt's, less bos/eos
            needed = tokenizer.count(self.instruction) + self.max_len - 2
            if needed != self.encoder_len:
                raise InputError(
                    f"{where} takes {self.encoder_len} tokens; the complex human instruction and "
                    f"max_sequence_length {self.max_len} need {needed}"
                )
        elif self.max_len != self.encoder_len:
            raise InputError(
                f"{where} takes {self.encoder_len} tokens, max_sequence_length is {self.max_len}"
            )
        self.width = encoder.outputs[0].shape[-1]

    def check(self, conditioning: Sequence[TensorInfo]) -> None:
        makes = {
            "encoder_hidden_states": (self.max_len, self.width),
            "encoder_attention_mask": (self.max_len,),
        }
        _check_inputs(conditioning, makes, f"the {self.family} text encoder")

    def _embed(self, text: str, instruction: bool) -> Arrays:
        text = text.lower().strip()  # the pipelines' _text_preprocessing without clean_caption
        if instruction and self.instruction:
            text = self.instruction + text
        ids, mask = self.tokenizer.encode(text, self.encoder_len if instruction else self.max_len)
        if len(ids) < self.encoder_len:  # a SANA negative prompt: its states are the run's first ones
            pad = self.encoder_len - len(ids)
            ids = np.concatenate([ids, np.full(pad, self.tokenizer.pad_token_id, dtype=np.int64)])
            mask = np.concatenate([mask, np.zeros(pad, dtype=np.int64)])
        states = np.asarray(self.encoders["text_encoder"](ids[None], mask[None]))
        if instruction and self.instruction:
            # SANA keeps the first state and the last max_sequence_length - 1 (its paper, section 3.1)
            keep = np.r_[0, np.arange(self.encoder_len - self.max_len + 1, self.encoder_len)]
        else:
            keep = np.arange(self.max_len)
        return {
            "encoder_hidden_states": states[:, keep],
            "encoder_attention_mask": mask[None, keep].astype(np.float32),
        }

    def encode(
        self, prompt: str, negative_prompt: str | None, *, use_cfg: bool, height: int, width: int
    ) -> tuple[Arrays, Arrays | None]:
        cond = self._embed(prompt, instruction=True)
        return cond, self._embed(negative_prompt or "", instruction=False) if use_cfg else None


def read_conditioning(root: str | os.PathLike) -> dict[str, Any] | None:
    """The set's ``conditioning.json`` (None for an SD 1.x/2.x or DiT set, which has none)."""
    file = Path(root) / CONDITIONING_FILE
    if not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(data, dict) or data.get("family") not in FAMILIES:
        raise InputError(f"{file}: 'family' must be one of {', '.join(FAMILIES)}")
    return data


def load_conditioner(
    root: str | os.PathLike, options: Mapping[str, Any], *, verify: bool = True, lazy: bool = False
) -> PromptConditioner:
    """The conditioner of artifact set ``root`` from its ``conditioning.json`` ``options``."""
    root = Path(root)

    def module(role: str) -> CompiledModule:
        if not (root / role).is_dir():
            raise InputError(f"{root}: a {options['family']} set needs {role}/")
        return CompiledModule(root / role, verify=verify, lazy=lazy)

    family = options["family"]
    if family == "sdxl":
        encoders = {role: module(role) for role in ("text_encoder", "text_encoder_2")}
        tokenizers = {
            "text_encoder": CLIPTokenizer.from_directory(root / "tokenizer"),
            "text_encoder_2": CLIPTokenizer.from_directory(root / "tokenizer_2"),
        }
        return SDXLConditioner(encoders, tokenizers, options)
    return MaskedTextConditioner(module("text_encoder"), JSONTokenizer(root / "tokenizer"), options, family)
