"""The CLIP BPE tokenizer (SD 1.x/2.x prompts -> token ids), torch-free: numpy and the standard library.

A device that runs the compiled text encoder has no transformers or tokenizers library, so the tokenizer is
re-implemented here and reads the same local folder transformers' ``CLIPTokenizer`` reads: ``vocab.json`` +
``merges.txt`` (how SD pipeline folders ship it) or ``tokenizer.json`` (what transformers 5 saves), plus
``tokenizer_config.json`` / ``special_tokens_map.json`` for the special tokens and ``model_max_length``.

It gives the ids transformers' ``CLIPTokenizer`` (the ``tokenizers``-backed one) gives, step by step:

1. special tokens (``<|startoftext|>``, ``<|endoftext|>``, the pad token, ...) are cut out of the text first,
   on the raw text or, for tokens marked ``normalized``, on the normalized text;
2. normalization: Unicode NFC, whitespace runs to one space, lowercase (character by character);
3. pre-tokenization: CLIP's split into letter runs, single digits, contractions and runs of other symbols
   (whitespace dropped), then GPT-2's byte-to-unicode mapping of each piece's UTF-8 bytes;
4. BPE with ``</w>`` marking a word's last symbol, merging the lowest-ranked (then leftmost) pair first;
5. ``bos + ids + eos``, truncated to ``max_length`` and padded with the pad token (as diffusers calls it:
   ``padding="max_length", truncation=True``).
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from edgediff.errors import InputError, ModelNotFoundError

END_OF_WORD = "</w>"
# CLIPTokenizer's defaults, used when the folder's config does not name a token.
DEFAULT_SPECIAL = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
}
# CLIP's pre-tokenizer regex matches these literally; GPT-2's byte-level split then cuts them into three.
_LITERAL_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS = ("s", "t", "re", "ve", "m", "ll", "d")  # after an apostrophe, in the regex's order
# Oniguruma's \s (tokenizers' regex engine): Unicode White_Space. Python's str.isspace() also counts the
# separators U+001C..U+001F, which tokenizers keeps as symbols.
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000" + "".join(map(chr, range(0x2000, 0x200B)))
)
_WHITESPACE_RUN = re.compile("[" + re.escape("".join(sorted(_WHITESPACE))) + "]+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the BPE alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_CHARS = bytes_to_unicode()
# The files from_directory reads (what an artifact set's tokenizer/ holds).
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def normalize(text: str) -> str:
    """CLIP's normalizer: NFC, every whitespace run to one space, lowercase one character at a time (like
    tokenizers; ``str.lower`` would turn a word-final sigma into a final sigma)."""
    text = _WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def _kind(char: str) -> str:
    """'L' (letter), 'N' (number), ' ' (whitespace) or '' (anything else), as CLIP's regex classes them."""
    if char in _WHITESPACE:
        return " "
    category = unicodedata.category(char)[0]
    return category if category in ("L", "N") else ""


def pre_tokenize(text: str) -> list[str]:
    """Split normalized text as CLIP's regex ``<|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|
    [\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+`` does (dropping the whitespace between matches), followed by
    GPT-2's byte-level split, which only changes the two literal special tokens."""
    pieces = []
    i, n = 0, len(text)
    while i < n:
        kind = _kind(text[i])
        literal = next((s for s in _LITERAL_SPECIALS if text.startswith(s, i)), None)
        contraction = (
            next((c for c in _CONTRACTIONS if text.startswith(c, i + 1)), None) if text[i] == "'" else None
        )
        if kind == " ":
            i += 1
            continue
        if literal is not None:
            pieces += ["<|", literal[2:-2], "|>"]
            end = i + len(literal)
        elif contraction is not None:
            end = i + 1 + len(contraction)
            pieces.append(text[i:end])
        elif kind == "N":
            end = i + 1
            pieces.append(text[i])
        else:  # a run of letters, or a run of symbols (neither letter, number nor whitespace)
            end = i + 1
            while end < n and _kind(text[end]) == kind:
                end += 1
            pieces.append(text[i:end])
        i = end
    return pieces


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer, giving the ids of transformers' ``CLIPTokenizer``.

    ``vocab`` maps tokens to ids; ``merges`` are the BPE merges in rank order; ``special_tokens`` maps each
    token cut out of the text before BPE to whether it is matched on the normalized text (transformers'
    ``AddedToken.normalized``). ``model_max_length`` is the default length :meth:`encode` pads to.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Iterable[tuple[str, str]],
        *,
        bos_token: str = DEFAULT_SPECIAL["bos_token"],
        eos_token: str = DEFAULT_SPECIAL["eos_token"],
        pad_token: str = DEFAULT_SPECIAL["pad_token"],
        unk_token: str = DEFAULT_SPECIAL["unk_token"],
        special_tokens: Mapping[str, bool] | None = None,
        model_max_length: int | None = None,
        path: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.vocab = dict(vocab)
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.model_max_length = model_max_length
        where = f"{self.path}: " if self.path else ""
        ids = {}
        for role, token in (("bos", bos_token), ("eos", eos_token), ("pad", pad_token), ("unk", unk_token)):
            if token not in self.vocab:
                raise ModelNotFoundError(f"{where}the {role} token {token!r} is not in the vocabulary")
            ids[role] = self.vocab[token]
        self.bos_token_id, self.eos_token_id = ids["bos"], ids["eos"]
        self.pad_token_id, self.unk_token_id = ids["pad"], ids["unk"]
        specials = dict.fromkeys((bos_token, eos_token, pad_token, unk_token), False)
        specials.update(special_tokens or {})
        self.special_tokens = specials
        self._special_ids = {token: self.vocab[token] for token in specials if token in self.vocab}
        # Longest first: among tokens starting at the same place the longest wins (tokenizers' matcher).
        raw = [t for t, normalized in specials.items() if not normalized and t in self._special_ids]
        norm = [t for t, normalized in specials.items() if normalized and t in self._special_ids]
        self._raw_split = _alternation(raw)
        self._normalized_split = _alternation([normalize(t) for t in norm])
        self._special_ids.update({normalize(t): self._special_ids[t] for t in norm})
        self._bpe = lru_cache(maxsize=65536)(self._bpe_word)

    @property
    def vocab_size(self) -> int:
        """One more than the largest id (what a text encoder's embedding table must hold)."""
        return max(self.vocab.values()) + 1

    @classmethod
    def from_directory(cls, path: str | os.PathLike) -> CLIPTokenizer:
        """Read a tokenizer folder as transformers' ``CLIPTokenizer.from_pretrained`` does."""
        root = Path(path)
        # transformers 5 prefers tokenizer.json (its added tokens' flags included) when a folder has both
        if (root / "tokenizer.json").is_file():
            data = _read_json(root / "tokenizer.json")
            model = data.get("model") or {}
            if model.get("type") != "BPE" or model.get("end_of_word_suffix") != END_OF_WORD:
                raise ModelNotFoundError(f"{root / 'tokenizer.json'}: not a CLIP BPE tokenizer")
            vocab, merges = model.get("vocab") or {}, _parse_merges(model.get("merges") or [])
            added: list[dict[str, Any]] = list(data.get("added_tokens") or [])
        elif (root / "vocab.json").is_file() and (root / "merges.txt").is_file():
            vocab = _read_json(root / "vocab.json")
            merges = _parse_merges((root / "merges.txt").read_text(encoding="utf-8").splitlines())
            added = []
        else:
            raise ModelNotFoundError(
                f"{root}: not a tokenizer folder; expected vocab.json + merges.txt or tokenizer.json "
                "(a CLIP tokenizer as transformers saves it)"
            )
        config = {
            **_read_json(root / "special_tokens_map.json"),
            **_read_json(root / "tokenizer_config.json"),
        }
        special_tokens = {
            str(t["content"]): bool(t.get("normalized", False)) for t in added if t.get("special")
        }
        for entry in (config.get("added_tokens_decoder") or {}).values():
            if isinstance(entry, Mapping) and entry.get("special"):
                special_tokens.setdefault(str(entry["content"]), bool(entry.get("normalized", False)))
        # Tokens listed in tokenizer.json or added_tokens_decoder keep their flags. The others are defined in
        # transformers' order (bos, eos, unk, pad) and a later definition wins: SD 1.5's pad_token
        # "<|endoftext|>" (a plain string: not normalized) overrides its eos_token's "normalized": true.
        listed = set(special_tokens)
        names = {}
        for key, default in DEFAULT_SPECIAL.items():
            token, normalized = _token(config.get(key), default)
            names[key] = token
            if token not in listed and (key in config or token not in special_tokens):
                special_tokens[token] = normalized
        for value in config.get("additional_special_tokens") or []:
            token, normalized = _token(value, "")
            if token:
                special_tokens.setdefault(token, normalized)
        max_length = config.get("model_max_length")
        return cls(
            vocab,
            merges,
            **names,
            special_tokens=special_tokens,
            # transformers stores "no limit" as a huge integer
            model_max_length=int(max_length)
            if isinstance(max_length, int) and max_length < 1 << 30
            else None,
            path=root,
        )

    def check_fits(self, meta: Mapping[str, Any], what: str) -> None:
        """Raise :class:`InputError` unless this tokenizer suits the text encoder ``meta`` describes (its zoo
        metadata): every id inside its embedding table (a compiled gather does not bounds-check), the bos/eos
        ids it was trained with, and its sequence length."""
        where = f"tokenizer {self.path or '(in memory)'}"
        if self.vocab_size > meta.get("vocab_size", self.vocab_size):
            raise InputError(
                f"{where} has ids up to {self.vocab_size - 1}; {what} embeds {meta['vocab_size']} tokens"
            )
        for token in ("bos", "eos"):
            expected, got = meta.get(f"{token}_token_id"), getattr(self, f"{token}_token_id")
            if expected is not None and expected != got:
                raise InputError(f"{where} has {token} id {got}; {what} expects {expected}")
        # diffusers pads prompts to model_max_length: another length would give other embeddings
        if (
            self.model_max_length is not None
            and meta.get("seq_len", self.model_max_length) != self.model_max_length
        ):
            raise InputError(
                f"{where} pads prompts to {self.model_max_length} tokens; {what} takes {meta['seq_len']}"
            )

    # ------------------------------------------------------------------------------------------- encoding

    def _bpe_word(self, word: str) -> tuple[str, ...]:
        symbols = list(word)
        symbols[-1] += END_OF_WORD
        never = len(self.ranks)  # rank of a pair no merge makes
        while len(symbols) > 1:
            rank, i = min((self.ranks.get((a, b), never), i) for i, (a, b) in enumerate(pairwise(symbols)))
            if rank == never:
                break
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
        return tuple(symbols)

    def _segments(self, text: str) -> list[tuple[str, bool]]:
        """``(piece, is_special)`` pairs: special tokens cut out, the other pieces normalized."""
        out = []
        for raw, raw_special in _split(self._raw_split, text):
            if raw_special:
                out.append((raw, True))
            else:
                out.extend(_split(self._normalized_split, normalize(raw)))
        return out

    def tokenize(self, text: str) -> list[str]:
        """The tokens of ``text``: special tokens as written, BPE symbols otherwise (no bos/eos added)."""
        tokens: list[str] = []
        for segment, special in self._segments(text):
            if special:
                tokens.append(segment)
                continue
            for piece in pre_tokenize(segment):
                tokens.extend(self._bpe("".join(_BYTE_CHARS[b] for b in piece.encode("utf-8"))))
        return tokens

    def ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without bos/eos; symbols missing from the vocabulary become the unk id."""
        out: list[int] = []
        for segment, special in self._segments(text):
            if special:
                out.append(self._special_ids[segment])
                continue
            for piece in pre_tokenize(segment):
                symbols = self._bpe("".join(_BYTE_CHARS[b] for b in piece.encode("utf-8")))
                out.extend(self.vocab.get(symbol, self.unk_token_id) for symbol in symbols)
        return out

    def encode(self, text: str, max_length: int | None = None) -> np.ndarray:
        """``bos + ids + eos`` as int64, truncated and padded to ``max_length`` (default
        ``model_max_length``): what ``tokenizer(text, padding="max_length", truncation=True)`` gives."""
        length = max_length if max_length is not None else self.model_max_length
        if length is None or length < 2:
            raise ValueError(f"max_length must be at least 2 (bos + eos), got {length}")
        ids = [self.bos_token_id, *self.ids(text)[: length - 2], self.eos_token_id]
        return np.array(ids + [self.pad_token_id] * (length - len(ids)), dtype=np.int64)

    def __call__(self, texts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
        """``(len(texts), max_length)`` int64 ids (a single string gives one row)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        return np.stack([self.encode(t, max_length) for t in texts])

    def __repr__(self) -> str:
        return (
            f"CLIPTokenizer({self.path or 'in memory'}, {len(self.vocab)} tokens, {len(self.ranks)} merges)"
        )


def _alternation(tokens: Sequence[str]) -> re.Pattern[str] | None:
    if not tokens:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(set(tokens), key=len, reverse=True)))


def _split(pattern: re.Pattern[str] | None, text: str) -> list[tuple[str, bool]]:
    """``text`` cut at the matches of ``pattern``: ``(piece, matched)`` pairs, empty pieces dropped."""
    if pattern is None:
        return [(text, False)] if text else []
    out, start = [], 0
    for match in pattern.finditer(text):
        if match.start() > start:
            out.append((text[start : match.start()], False))
        out.append((match.group(), True))
        start = match.end()
    if start < len(text):
        out.append((text[start:], False))
    return out


def _parse_merges(lines: Iterable[Any]) -> list[tuple[str, str]]:
    """``merges.txt`` lines (``"a b"``, a ``#version`` header) or tokenizer.json entries (``[a, b]``)."""
    merges = []
    for line in lines:
        if isinstance(line, str):
            if not line.strip() or line.startswith("#version"):
                continue
            parts = line.split(" ")
        else:
            parts = list(line)
        if len(parts) != 2:
            raise ModelNotFoundError(f"malformed BPE merge {line!r}: expected two symbols")
        merges.append((parts[0], parts[1]))
    return merges


def _token(value: Any, default: str) -> tuple[str, bool]:
    """A special token from a config: a string, or an AddedToken dict with ``content`` / ``normalized``."""
    if isinstance(value, Mapping):
        return str(value.get("content", default)), bool(value.get("normalized", False))
    return (str(value), False) if value else (default, False)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"{path}: unreadable tokenizer file ({err})") from err
    if not isinstance(data, dict):
        raise ModelNotFoundError(f"{path}: expected a JSON object")
    return data
