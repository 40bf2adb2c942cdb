"""Data: the built-in product catalog, the TFDS builder, tokenizer and input pipeline."""
