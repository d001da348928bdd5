"""Small CLIP tokenizer folders for tests: a BPE vocabulary trained on a little corpus, saved as SD pipeline
folders ship it (vocab.json + merges.txt + configs), so transformers and edgediff can both load it."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from edgediff.runtime.tokenizer import bytes_to_unicode, normalize, pre_tokenize

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
CORPUS = """
A photograph of an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation.
The quick brown fox jumps over the lazy dog. It's a beautiful day; isn't it? We'll see, they're here,
I'm sure you've heard: she'd said so! Portrait of a red fox in a snowy forest at sunset, oil painting by
a famous painter, 35mm film, bokeh, golden hour. A castle on a hill (matte painting), cinematic lighting,
ultra realistic, 8k uhd, sharp focus. Two cats and three dogs playing in the garden near the river.
An old man with a long white beard reading a book by the fireplace, warm colors, studio ghibli style.
"""


def train_bpe(corpus: str, num_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE over the corpus's CLIP pre-tokenized words (most frequent pair first, ties by the pair)."""
    chars = bytes_to_unicode()
    words: Counter[tuple[str, ...]] = Counter()
    for piece in pre_tokenize(normalize(corpus)):
        symbols = [chars[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] += 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


def write_tokenizer(
    folder: Path,
    *,
    vocab_size: int | None = None,
    num_merges: int = 300,
    model_max_length: int = 77,
    pad_token: str = EOS,
    drop_chars: str = "",
) -> Path:
    """Write an SD-style CLIP tokenizer folder laid out like CLIP's vocabulary: the 256 byte symbols, the
    same with ``</w>``, the merged symbols, then bos and eos. ``vocab_size`` pads with unused tokens before
    bos/eos so that they are the last two ids (as in CLIP); ``drop_chars`` leaves symbols out (unk tests)."""
    alphabet = list(bytes_to_unicode().values())
    merges = train_bpe(CORPUS, num_merges)
    tokens = [c for c in alphabet if c not in drop_chars] + [
        c + "</w>" for c in alphabet if c not in drop_chars
    ]
    for a, b in merges:
        if a + b not in tokens:
            tokens.append(a + b)
    if vocab_size is not None:
        assert len(tokens) + 2 <= vocab_size, f"{len(tokens) + 2} tokens do not fit in {vocab_size}"
        tokens += [f"<unused{i}>" for i in range(vocab_size - 2 - len(tokens))]
    tokens += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merge_lines = [f"{a} {b}" for a, b in merges if a in tokens and b in tokens]
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merge_lines) + "\n", encoding="utf-8")

    def added(content: str) -> dict:
        # how the SD 1.5 tokenizer_config.json records its special tokens
        return {
            "__type": "AddedToken",
            "content": content,
            "lstrip": False,
            "normalized": True,
            "rstrip": False,
        }

    specials = {
        "bos_token": added(BOS),
        "eos_token": added(EOS),
        "unk_token": added(EOS),
        "pad_token": pad_token,
    }
    config = {**specials, "do_lower_case": True, "model_max_length": model_max_length, "errors": "replace"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "tokenizer_class": "CLIPTokenizer"}))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder
