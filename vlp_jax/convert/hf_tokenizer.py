"""The tokenizer of a Hugging Face BERT folder, loaded offline and checked before it is used.

A converted encoder is only as good as its token ids, and the failure mode is silent: in
transformers 5, ``BertTokenizerFast(vocab_file=...)`` (which ``AutoTokenizer`` falls back to for
folders with only ``vocab.txt``) maps every token to [UNK].  So a folder with ``tokenizer.json``
is loaded as is, a ``vocab.txt``-only folder is rebuilt with the ``tokenizers`` library from its
``tokenizer_config.json`` settings (lower-casing, CJK character split, accents), and either way
:func:`check_tokenizer` fails loudly on an [UNK] flood or ids outside the embedding table.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

_SPECIALS = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
             "sep_token": "[SEP]", "mask_token": "[MASK]"}


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _special_names(src: str) -> dict[str, str]:
    names = dict(_SPECIALS)
    for settings in (_read_json(os.path.join(src, "tokenizer_config.json")),
                     _read_json(os.path.join(src, "special_tokens_map.json"))):
        for key in names:
            value = settings.get(key)
            if isinstance(value, dict):  # {"content": "[UNK]", ...}
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    return names


def build_from_vocab(src: str) -> PreTrainedTokenizerFast:
    """A BERT WordPiece tokenizer from ``vocab.txt`` + ``tokenizer_config.json`` settings."""
    settings = _read_json(os.path.join(src, "tokenizer_config.json"))
    with open(os.path.join(src, "vocab.txt"), encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    names = _special_names(src)
    missing = [n for n in names.values() if n not in vocab]
    if missing:
        raise ValueError(f"vocab.txt in {src!r} lacks the special tokens {missing}")
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=names["unk_token"],
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        strip_accents=settings.get("strip_accents"),
        lowercase=settings.get("do_lower_case", True),
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls, sep = names["cls_token"], names["sep_token"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}",
        pair=f"{cls} $A {sep} $B:1 {sep}:1",
        special_tokens=[(cls, vocab[cls]), (sep, vocab[sep])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=int(settings.get("model_max_length", 512)), **names
    )


def load_hf_tokenizer(src: str) -> PreTrainedTokenizerFast:
    """The folder's tokenizer (never from the hub); ValueError when it has none."""
    if os.path.isfile(os.path.join(src, "tokenizer.json")):
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
        except Exception as e:  # noqa: BLE001 - many exception types; name the folder
            raise ValueError(f"could not load the tokenizer in {src!r}: {e}") from e
        if not isinstance(tok, PreTrainedTokenizerFast):
            raise ValueError(f"tokenizer in {src!r} is not a fast tokenizer ({type(tok).__name__})")
        return tok
    if os.path.isfile(os.path.join(src, "vocab.txt")):
        return build_from_vocab(src)
    raise ValueError(f"{src!r} has neither tokenizer.json nor vocab.txt: no tokenizer to convert")


def check_tokenizer(tok: PreTrainedTokenizerFast, vocab_size: int, src: str) -> None:
    """Specials present, every id inside the embedding table, vocab words not read as [UNK]."""
    missing = [k for k in _SPECIALS if getattr(tok, f"{k}_id", None) is None]
    if missing:
        raise ValueError(f"tokenizer in {src!r} lacks special tokens {missing}")
    top = max(tok.get_vocab().values())
    if top >= vocab_size:
        raise ValueError(
            f"tokenizer in {src!r} produces ids up to {top} but the checkpoint's embedding table "
            f"has {vocab_size} rows (vocab_size in config.json)"
        )
    words = sorted(t for t in tok.get_vocab() if t.isalpha() and t.islower())[:200:4]
    if words:
        ids = tok(" ".join(words), add_special_tokens=False)["input_ids"]
        unk = ids.count(tok.unk_token_id)
        if unk:
            raise ValueError(
                f"tokenizer in {src!r} maps {unk} of {len(words)} of its own vocabulary words to "
                f"{tok.unk_token}: it is broken (e.g. a vocab.txt/normalizer mismatch)"
            )
