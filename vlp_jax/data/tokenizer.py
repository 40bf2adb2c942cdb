"""BERT-style WordPiece tokenizer: train one on the catalog, or load an existing HF folder.

Training and serving must share one vocabulary, so the tokenizer is always saved as an HF
folder (``save_pretrained``) beside the dataset and loaded back with ``load_tokenizer``.  The
folder may be on gs:// or s3://: transformers reads local folders only, so it is staged to local
disk first (``runtime.staging``, verified and reused while current).

Built directly with the ``tokenizers`` library and wrapped in ``PreTrainedTokenizerFast``
(``tokenizer_object=``).  Not with ``BertTokenizerFast(vocab_file=...)``: in transformers 5 that
constructor silently maps every token to [UNK].
"""

from __future__ import annotations

import collections
import functools
import hashlib
import os
import string
from collections.abc import Iterable, Iterator, Mapping

import tokenizers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlp_jax.data import store_commit
from vlp_jax.runtime import fs, staging

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # [PAD] = id 0
MODEL_MAX_LENGTH = 512
# Any one of these makes a folder loadable by AutoTokenizer (fast json, or a BERT vocab).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")
_REQUIRED = ("pad", "unk", "cls", "sep", "mask")
_ALPHABET = string.ascii_lowercase + string.digits + string.punctuation
_ASCII_PIECES = frozenset(_ALPHABET) | {"##" + c for c in _ALPHABET}
# Names how train_wordpiece turns texts into a vocabulary; dataset builds key their cache on it
# (with the library version), so a build made by another recipe is never reused.
WORDPIECE_TRAINER = f"code-point-alphabet-v2/tokenizers-{tokenizers.__version__}"


def _base_tokenizer(vocab: dict[str, int] | None = None) -> Tokenizer:
    """An uncased BERT WordPiece pipeline (empty model when ``vocab`` is None).

    CJK characters are split into single characters by the normalizer (as in Chinese BERT), so a
    vocab trained on Chinese text covers unseen Chinese words character by character.
    """
    if vocab is None:
        model = models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100)
    else:
        model = models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100)
    tok = Tokenizer(model)
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


@functools.cache
def _word_splitter() -> Tokenizer:
    """One normalizer + pre-tokenizer per process (``word_counts`` is called per record)."""
    return _base_tokenizer()


def word_counts(texts: Iterable[str]) -> collections.Counter:
    """How often each normalized, pre-tokenized word occurs in ``texts``: all the trainer
    learns from, so counts made in parts (Beam workers) and summed train the same vocabulary."""
    tok = _word_splitter()
    counts: collections.Counter = collections.Counter()
    for text in texts:
        if text:
            counts.update(word for word, _ in
                          tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    return counts


def _corpus_pieces(words: Iterable[str]) -> set[str]:
    """The trainer's alphabet: every character of every word as a piece, and every non-initial
    one as a ``##`` continuation piece."""
    pieces: set[str] = set()
    for word in words:
        pieces.update(word)
        pieces.update("##" + c for c in word[1:])
    return pieces


def _repeated_words(counts: Mapping[str, int], per_text: int = 4096) -> Iterator[str]:
    """Each word ``count`` times, as space-separated texts of at most ``per_text`` words (the
    trainer takes texts, not counts; words never contain whitespace)."""
    for word in sorted(counts):
        left = int(counts[word])
        while left > 0:
            n = min(left, per_text)
            yield " ".join([word] * n)
            left -= n


def _code_point_order(pieces: set[str]) -> list[str]:
    """Single-character pieces, then ``##`` pieces, each by code point: ids from the set alone.

    The trainer would number the ``##`` pieces in the iteration order of a Rust hash map (random
    per process) and break merge ties by those numbers, so fresh builds of one catalog got
    different vocabularies (huggingface/tokenizers#1794).
    """
    return sorted(p for p in pieces if len(p) == 1) + sorted(p for p in pieces if len(p) > 1)


def train_wordpiece(
    texts: Iterable[str], vocab_size: int, out_dir: str, *, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train an uncased BERT WordPiece vocab on ``texts`` and save it to ``out_dir``: the
    vocabulary of :func:`train_wordpiece_counts` on the texts' :func:`word_counts`."""
    return train_wordpiece_counts(word_counts(texts), vocab_size, out_dir,
                                  min_frequency=min_frequency)


def train_wordpiece_counts(
    counts: Mapping[str, int], vocab_size: int, out_dir: str, *, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train an uncased BERT WordPiece vocab on word counts and save it to ``out_dir``.

    Deterministic: the same counts (hence the same texts) give the same files byte for byte in
    any process.  The special tokens and every single-character piece get fixed ids before
    training (``_code_point_order``), which leaves the trainer nothing ordered by hashing: merges
    are chosen by count, ties broken by the ids of the merged pieces.  ``WORDPIECE_TRAINER``
    names this recipe in build caches.

    Every ASCII letter/digit/punctuation is a piece, alone and as ``##`` continuation: WordPiece
    turns a whole word into [UNK] when one of its characters has no piece, so an unseen brand
    name or model number in a query ("xz7") would otherwise vanish.  Tiny vocabs (tests) skip
    that alphabet rather than spend most of their budget on it.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small (need > {len(SPECIAL_TOKENS)})")
    pieces = _corpus_pieces(counts)
    budget = vocab_size
    if vocab_size >= 4 * len(_ASCII_PIECES):
        # As many merges as the first recipe made (it trained vocab_size - len(_ASCII_PIECES)
        # tokens, then appended the ASCII pieces the corpus lacked): a config keeps its vocab
        # size, hence its parameter count and the shapes of its checkpoints.
        budget += len(_ASCII_PIECES - pieces) - len(_ASCII_PIECES)
        pieces |= _ASCII_PIECES
    fixed = list(SPECIAL_TOKENS) + _code_point_order(pieces)
    trainer = trainers.WordPieceTrainer(
        vocab_size=budget,
        min_frequency=min_frequency,
        special_tokens=fixed,  # registered first, in this order: ids 0 .. len(fixed) - 1
        continuing_subword_prefix="##",
        show_progress=False,
    )
    # The words are already normalized and pre-tokenized: split on spaces only.
    trainer_tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    trainer_tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer_tok.train_from_iterator(_repeated_words(counts), trainer=trainer)
    vocab = trainer_tok.get_vocab(with_added_tokens=False)
    for i, piece in enumerate(fixed):  # checked, not assumed: the determinism rests on it
        if vocab.get(piece) != i:
            raise RuntimeError(f"piece {piece!r} got id {vocab.get(piece)}, expected {i}")
    # A fresh pipeline on the trained vocab: the trainer also made every fixed piece an added
    # (special) token, which would match "##a" in raw text; only the BERT specials stay special.
    tok = _base_tokenizer(vocab)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=MODEL_MAX_LENGTH,
    )
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def local_folder(path: str, staging_dir: str = "") -> str:
    """``path`` itself when local; else a verified local copy of the gs:// / s3:// folder."""
    if not path or not fs.is_remote(path):
        return path
    try:
        return staging.stage(path, staging_dir or store_commit.default_staging_dir(),
                             what="tokenizer folder")
    except staging.StagingError as e:
        raise ValueError(f"tokenizer folder {path!r} does not exist or is empty ({e})") from e


def load_tokenizer(path: str, staging_dir: str = "") -> PreTrainedTokenizerFast:
    """Load an HF tokenizer folder (never the hub) and check it has the BERT special tokens.

    ``path`` may be gs:// or s3:// (staged under ``staging_dir`` first; error messages name
    ``path``)."""
    shown = path
    path = local_folder(path, staging_dir)
    if not path or not os.path.isdir(path):
        raise ValueError(f"tokenizer folder {shown!r} does not exist or is not a directory")
    present = [f for f in _TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
    if not present:
        raise ValueError(
            f"tokenizer folder {shown!r} has no tokenizer files (expected one of "
            f"{', '.join(_TOKENIZER_FILES)}); pass a folder written by save_pretrained"
        )
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; name the folder
        raise ValueError(f"could not load the tokenizer in {shown!r}: {e}") from e
    if not isinstance(tok, PreTrainedTokenizerFast):
        raise ValueError(f"tokenizer in {shown!r} is not a fast tokenizer ({type(tok).__name__})")
    missing = [n for n in _REQUIRED if getattr(tok, f"{n}_token_id", None) is None]
    if missing:
        raise ValueError(
            f"tokenizer in {shown!r} lacks special tokens {missing}; a BERT-style vocab with "
            "[PAD], [UNK], [CLS], [SEP] and [MASK] is needed"
        )
    return tok


def unk_fraction(tok: PreTrainedTokenizerFast, texts: Iterable[str]) -> float:
    """Fraction of non-special tokens that are [UNK]: a quick check that a vocab fits the text."""
    texts = [t for t in texts if t]
    if not texts:
        return 0.0
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    total = sum(len(x) for x in ids)
    unk = sum(x.count(tok.unk_token_id) for x in ids)
    return unk / total if total else 0.0


def vocab_fingerprint(tok: PreTrainedTokenizerFast) -> str:
    """sha256 of the vocabulary as ``id<TAB>token`` lines in id order: two tokenizers with the
    same fingerprint map every token to the same embedding row (what a checkpoint depends on)."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    text = "\n".join(f"{i}\t{t}" for t, i in vocab)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
