"""WordPiece training, CJK handling, save/load round trip and errors of vlp_jax.data.tokenizer."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest

from vlp_jax.data import tokenizer as tokenizer_lib

COLOURS = ["red", "blue", "green", "black", "white", "pink"]
THINGS = ["shirt", "dress", "jacket", "sneakers", "handbag", "scarf"]
STYLES = ["striped", "cotton", "slim", "vintage", "leather", "summer"]
ZH_COLOURS = ["红色", "蓝色", "绿色", "黑色", "白色"]
ZH_THINGS = ["条纹T恤", "连衣裙", "牛仔裤", "运动鞋", "手提包"]


def _corpus() -> list[str]:
    en = [f"{s} {c} {t} for men" for s, c, t in itertools.product(STYLES, COLOURS, THINGS)]
    zh = [f"{c}{t} 纯棉 男款" for c, t in itertools.product(ZH_COLOURS, ZH_THINGS)]
    return en + zh


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tok"))
    return out, tokenizer_lib.train_wordpiece(_corpus(), 600, out)


def _unk(tok, text: str) -> int:
    return tok(text, add_special_tokens=False)["input_ids"].count(tok.unk_token_id)


def test_special_tokens_and_template(trained):
    _, tok = trained
    assert [tok.convert_ids_to_tokens(i) for i in range(5)] == list(tokenizer_lib.SPECIAL_TOKENS)
    assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id) == (0, 1, 2, 3, 4)
    ids = tok("red shirt")["input_ids"]
    assert ids[0] == 2 and ids[-1] == 3
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["red", "shirt"]
    assert tok("RED Shirt")["input_ids"] == ids  # uncased
    pair = tok("red", "shirt", return_token_type_ids=True)
    assert pair["input_ids"] == [2, ids[1], 3, ids[2], 3]
    assert pair["token_type_ids"] == [0, 0, 0, 1, 1]
    batch = tok(["red", "red striped shirt"], padding=True)["input_ids"]
    assert batch[0][-1] == 0 and len(batch[0]) == len(batch[1])  # [PAD] = 0


def test_catalog_text_has_no_unk(trained):
    _, tok = trained
    # New combinations of known words: zero [UNK].
    unseen_combos = ["pink leather sneakers", "vintage white scarf for men", "黑色连衣裙 纯棉"]
    assert [_unk(tok, t) for t in unseen_combos] == [0, 0, 0]
    assert tokenizer_lib.unk_fraction(tok, _corpus()) == 0.0
    # Unseen ASCII words are spelled out from the always-present alphabet, not dropped.
    assert _unk(tok, "zyx-42 qwerty!") == 0
    assert "##q" in tok.get_vocab() and len(tok) <= 600
    # A character never seen (emoji) is one [UNK], and only that word.
    assert _unk(tok, "red 🙂 shirt") == 1


def test_cjk_is_split_into_characters(trained):
    _, tok = trained
    ids = tok("红色条纹T恤", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["红", "色", "条", "纹", "t", "恤"]
    # Unseen Chinese characters cost one [UNK] each, not the whole phrase.
    assert _unk(tok, "紫色条纹T恤") == 1  # 紫 never seen; the other 5 characters are known
    assert _unk(tok, "红色条纹T恤") == 0


def test_save_load_round_trip(trained):
    out, tok = trained
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    loaded = tokenizer_lib.load_tokenizer(out)
    texts = _corpus()[::7] + ["红色条纹T恤", "zyx-42 qwerty!", "red 🙂 shirt"]
    assert loaded(texts)["input_ids"] == tok(texts)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert loaded.mask_token_id == 4 and loaded.pad_token_id == 0


def test_bert_vocab_txt_folder_loads_without_unk_flood(trained, tmp_path):
    # The transformers-5 trap (BertTokenizerFast(vocab_file=...) maps all to [UNK]) must not
    # bite a plain BERT folder (vocab.txt + tokenizer_config.json) loaded via load_tokenizer.
    _, tok = trained
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "do_lower_case": True}))
    bert = tokenizer_lib.load_tokenizer(str(tmp_path))
    for text in ["red striped shirt", "红色条纹T恤 纯棉"]:
        assert bert(text)["input_ids"] == tok(text)["input_ids"]
        assert _unk(bert, text) == 0


def test_bad_tokenizer_folders_raise(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("hello")
    with pytest.raises(ValueError, match="has no tokenizer files"):
        tokenizer_lib.load_tokenizer(str(empty))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="could not load the tokenizer"):
        tokenizer_lib.load_tokenizer(str(broken))
    no_mask = tmp_path / "no_mask"
    no_mask.mkdir()
    (no_mask / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nred\nshirt\n")
    (no_mask / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "BertTokenizer", "mask_token": None}))
    with pytest.raises(ValueError, match="lacks special tokens.*mask"):
        tokenizer_lib.load_tokenizer(str(no_mask))
    with pytest.raises(ValueError, match="too small"):
        tokenizer_lib.train_wordpiece(["a b"], 3, str(tmp_path / "small"))


_TRAIN_IN_FRESH_PROCESS = """
import json, sys
from vlp_jax.data import tokenizer
tokenizer.train_wordpiece(json.load(open(sys.argv[1])), 600, sys.argv[2])
"""


def test_fresh_processes_train_byte_identical_vocabularies(tmp_path):
    # The trainer alone numbered its "##" pieces in a per-process hash order and broke merge ties
    # by those numbers: on this corpus every fresh process got another vocab (tokenizers#1794).
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps(_corpus()))
    outs = []
    for seed in ("0", "1", "2"):
        out = tmp_path / f"tok{seed}"
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run(
            [sys.executable, "-c", _TRAIN_IN_FRESH_PROCESS, str(corpus), str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        outs.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    assert "tokenizer.json" in outs[0]
    assert outs[1] == outs[0] and outs[2] == outs[0]


def test_trained_vocab_lists_specials_then_characters_then_merges(trained):
    _, tok = trained
    vocab = sorted(tok.get_vocab(), key=tok.get_vocab().get)
    assert vocab[:5] == list(tokenizer_lib.SPECIAL_TOKENS)
    n_single = sum(len(p) == 1 for p in vocab) + sum(len(p) == 3 and p[:2] == "##" for p in vocab)
    singles = vocab[5 : 5 + n_single]
    plain = [p for p in singles if not p.startswith("##")]
    assert singles == plain + sorted(p for p in singles if p.startswith("##"))
    assert plain == sorted(plain) and {"a", "##a", "红", "色", "~", "##~"} <= set(singles)
    assert all(len(p.removeprefix("##")) > 1 for p in vocab[5 + n_single :])
    # Only the BERT specials are added tokens: "##a" in raw text is text, not a token.
    assert sorted(tok.added_tokens_encoder) == sorted(tokenizer_lib.SPECIAL_TOKENS)
    ids = tok("x##a", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["x", "#", "#", "a"]
