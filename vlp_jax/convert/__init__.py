"""Converters from other frameworks' checkpoints to vlp_jax parameters.

``hf_bert``: Hugging Face BERT-family checkpoints -> our text transformer (+ its tokenizer), and
``load_text_encoder`` for using a converted encoder on its own (sentence embeddings).
"""
