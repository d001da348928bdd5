"""Tokenizers read from a ``tokenizer.json`` through the ``tokenizers`` library (T5's unigram, Gemma's BPE).

``tokenizers`` is torch-free and ships aarch64 wheels, so a device runs it as it is; it gives the ids
transformers' tokenizers give, because transformers 5 drives this same library. The padding and truncation
are those diffusers asks for: ``padding="max_length", truncation=True`` with special tokens, padding on the
right, and an attention mask of ones on real tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import InputError, ModelNotFoundError

JSON_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class JSONTokenizer:
    """A ``tokenizer.json`` tokenizer with its folder's pad token and ``model_max_length``."""

    def __init__(self, path: str | os.PathLike) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - a dependency of edgediff
            raise ModelNotFoundError(
                "reading tokenizer.json needs the 'tokenizers' package (pip install tokenizers)"
            ) from exc
        self.path = Path(path)
        file = self.path / "tokenizer.json"
        if not file.is_file():
            raise ModelNotFoundError(
                f"{self.path}: no tokenizer.json (a T5 or Gemma tokenizer folder has one)"
            )
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed files
            raise ModelNotFoundError(f"{file}: unreadable tokenizer ({exc})") from exc
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            try:
                data = json.loads((self.path / name).read_text())
            except (OSError, ValueError):
                continue
            config.update(data if isinstance(data, dict) else {})
        pad = config.get("pad_token")
        pad = pad.get("content") if isinstance(pad, Mapping) else pad
        padding = self._tokenizer.padding or {}
        pad = pad or padding.get("pad_token")
        pad_id = self._tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:
            raise ModelNotFoundError(f"{self.path}: the pad token {pad!r} is not in the vocabulary")
        self.pad_token, self.pad_token_id = str(pad), int(pad_id)
        length = config.get("model_max_length")
        self.model_max_length = int(length) if isinstance(length, int) and length < 1 << 30 else None
        self.kind = str((json.loads(file.read_text()).get("model") or {}).get("type"))

    @property
    def vocab_size(self) -> int:
        """One more than the largest id, added tokens included (what the embedding table must hold)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def count(self, text: str) -> int:
        """Number of ids of ``text`` with special tokens, untruncated (``len(tokenizer.encode(text))``)."""
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        return len(self._tokenizer.encode(text, add_special_tokens=True).ids)

    def encode(self, text: str, max_length: int) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, int64 of ``max_length``: special tokens added, truncated to ``max_length`` (the
        special tokens kept), padded on the right; the mask is 1 on real tokens."""
        if max_length < 1:
            raise InputError(f"max_length must be positive, got {max_length}")
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length)
        ids = self._tokenizer.encode(text, add_special_tokens=True).ids
        mask = np.zeros(max_length, dtype=np.int64)
        mask[: len(ids)] = 1
        out = np.full(max_length, self.pad_token_id, dtype=np.int64)
        out[: len(ids)] = ids
        return out, mask

    def check_fits(self, meta: Mapping[str, Any], what: str) -> None:
        """Every id inside the text encoder's embedding table (a compiled gather does not bounds-check)."""
        if self.vocab_size > meta.get("vocab_size", self.vocab_size):
            raise InputError(
                f"tokenizer {self.path} has ids up to {self.vocab_size - 1}; {what} embeds "
                f"{meta['vocab_size']} tokens"
            )

    def __repr__(self) -> str:
        return f"JSONTokenizer({self.path}, {self.kind}, {self.vocab_size} ids)"
