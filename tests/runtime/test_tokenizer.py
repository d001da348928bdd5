"""The torch-free CLIP tokenizer gives transformers' CLIPTokenizer ids, on folders in both saved layouts."""

from __future__ import annotations

import json
import random
import unicodedata

import numpy as np
import pytest
from transformers import CLIPTokenizer as HFCLIPTokenizer

from edgediff.errors import ModelNotFoundError
from edgediff.runtime.tokenizer import CLIPTokenizer
from tests.runtime.tokenizer_fixtures import CORPUS, write_tokenizer

FIXED = [
    "",
    " ",
    "a red fox",
    "A RED FOX",
    "  a \t red\n\nfox  ",
    "It's a cat; isn't it? We'll see, they're here, I'm sure you've heard: she'd said so!",
    "'s 't 're 've 'm 'll 'd ''s '' 'x 'S",
    "8k uhd, 35mm film, 1234567890, 3.14159, -2e10, 1/2, ½ ² ٣ 〇 Ⅻ",
    "!!!??? ... --- ((matte painting)), [oil:1.2] {x|y} <lora:x> #hashtag @user $5 100% a_b a-b",
    "café naïve Ünïcödé résumé ﬁ Å Å",  # precomposed and combining (NFC), ligature
    "ΟΔΟΣ Σ σς",  # final sigma: lowercased one character at a time
    "İstanbul ẞ ǅ",  # lowercase that changes length
    "東京の夜景、美しい 한국어 텍스트 中文",
    "emoji 🦊🔥 👩‍👩‍👧 🇫🇷",
    "a\u3000b\u00a0c\u2009d\x1ce\x85f\u200bg",  # ideographic/no-break/thin spaces, U+001C, NEL, ZWSP
    "tab\tnew\nline\r\nend\x0b\x0c",
    "<|startoftext|>a red fox<|endoftext|>",
    "<|ENDOFTEXT|>! <|endoftext|>! x<|endoftext|>y !<|startoftext|>",
    "<|STARTOFTEXT|>a <|StartOfText|>!<|EndOfText|>",
    "<|endoftext",
    "a " * 100,  # truncated
    CORPUS,
    CORPUS.upper(),
]


def _random_strings(count: int, seed: int = 0) -> list[str]:
    pool = list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 ''\",.;:!?-_()[]<>|/\\\t\n") + list(
        "éüßΣσ東京🦊½"
    )
    pool += ["<|endoftext|>", "<|startoftext|>", "'s", "'ll", " the ", " fox", "  "]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(0, 40))) for _ in range(count)]


STRINGS = FIXED + _random_strings(300)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    sd = write_tokenizer(root / "sd15")
    saved = root / "saved"  # transformers 5 writes tokenizer.json + tokenizer_config.json
    HFCLIPTokenizer.from_pretrained(sd).save_pretrained(saved)
    assert (saved / "tokenizer.json").is_file() and not (saved / "vocab.json").exists()
    # a transformers-4 style config listing the special tokens' flags, which then win over the token keys
    decoder = write_tokenizer(root / "decoder")
    config = json.loads((decoder / "tokenizer_config.json").read_text())
    vocab = json.loads((decoder / "vocab.json").read_text())
    config["added_tokens_decoder"] = {
        str(vocab[token]): {"content": token, "normalized": normalized, "special": True}
        for token, normalized in (("<|startoftext|>", False), ("<|endoftext|>", True))
    }
    (decoder / "tokenizer_config.json").write_text(json.dumps(config))
    # both layouts in one folder, tokenizer.json's flags differing from the config's: tokenizer.json wins
    both = write_tokenizer(root / "both")
    HFCLIPTokenizer.from_pretrained(decoder).backend_tokenizer.save(str(both / "tokenizer.json"))
    return {
        "sd15": sd,
        "both": both,
        "saved": saved,
        "pad-bang": write_tokenizer(root / "pad-bang", pad_token="!", model_max_length=12),  # SD 2.x's pad
        "unk": write_tokenizer(root / "unk", drop_chars="zé東"),
        "decoder": decoder,
    }


@pytest.mark.parametrize("layout", ["sd15", "saved", "pad-bang", "unk", "decoder", "both"])
def test_ids_equal_transformers(folders, layout):
    ours = CLIPTokenizer.from_directory(folders[layout])
    theirs = HFCLIPTokenizer.from_pretrained(folders[layout])
    assert (ours.bos_token_id, ours.eos_token_id) == (theirs.bos_token_id, theirs.eos_token_id)
    assert (ours.pad_token_id, ours.model_max_length) == (theirs.pad_token_id, theirs.model_max_length)
    mismatches = []
    for text in STRINGS:
        for length in (ours.model_max_length, 8):
            expected = theirs(text, padding="max_length", max_length=length, truncation=True).input_ids
            got = ours.encode(text, length)
            assert got.dtype == np.int64 and got.shape == (length,)
            if got.tolist() != expected:
                mismatches.append((text, length, got.tolist(), expected))
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[0]}"
    # untruncated: the BPE itself, over the long strings too
    for text in STRINGS:
        assert ours.ids(text) == theirs(text, add_special_tokens=False).input_ids, text


def test_unicode_classes_equal_tokenizers(folders):
    """Every assigned code point (in this Python's Unicode database) is normalized and split as tokenizers
    does: a letter, number, whitespace or symbol between letters, digits, symbols and an apostrophe.
    (Code points this Python does not know yet may differ: tokenizers may use a newer Unicode version.)"""
    from edgediff.runtime.tokenizer import normalize, pre_tokenize

    backend = HFCLIPTokenizer.from_pretrained(folders["sd15"]).backend_tokenizer
    chars = [chr(c) for c in range(0x10000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    text = "".join(f"x{c}y1{c}2!{c}!'{c} " for c in chars)
    normalized = backend.normalizer.normalize_str(text)
    assert normalize(text) == normalized
    expected = [piece for piece, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    # both sides in tokenizers' byte-level alphabet: compare through our byte mapping
    from edgediff.runtime.tokenizer import bytes_to_unicode

    table = bytes_to_unicode()
    got = ["".join(table[b] for b in piece.encode("utf-8")) for piece in pre_tokenize(normalized)]
    assert got == expected


def test_batch_call_and_bad_folders(folders, tmp_path):
    tok = CLIPTokenizer.from_directory(folders["sd15"])
    batch = tok(["a red fox", ""], max_length=8)
    assert batch.shape == (2, 8) and batch.dtype == np.int64
    assert batch[1].tolist() == [tok.bos_token_id] + [tok.eos_token_id] * 7  # empty prompt: bos, eos, pads
    assert tok.vocab_size == len(tok.vocab)
    with pytest.raises(ModelNotFoundError, match="not a tokenizer folder"):
        CLIPTokenizer.from_directory(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "vocab.json").write_text('{"a": 0}')
    (broken / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ModelNotFoundError, match="bos token '<\\|startoftext\\|>' is not in the vocabulary"):
        CLIPTokenizer.from_directory(broken)
