"""Data: everything between a product catalog and a training batch.

Three parts, each importing only what is listed before it (tests/test_layout.py checks this):

1. The modules directly in this package, the contract both sides share: ``records`` (the
   catalog's user data format — what a valid item or pair record is, image decoding),
   ``tokenizer`` (the WordPiece vocabulary a build trains and training and serving load),
   ``store_commit`` (how a build on gs:// / s3:// is committed and read back through a verified
   local copy) and ``shard_check`` (a damaged build named before training).  They import
   neither subpackage.
2. ``input`` — step time: open a finished build (``dataset_reader``), the Grain pipeline,
   preprocessing and masking, device prefetch.  **Input never imports build.**
3. ``build`` — build time: catalog → TFDS dataset, in one process or on Apache Beam, its cache
   key, the commit to object stores, and ``from_config`` (``config.data`` → a checked, opened
   dataset, built if missing).  It imports ``input``: a build ends by opening its result with
   the reader training uses, so the cache-hit path and the fresh-build path return the same
   handle.

The direction follows the code: the builder needs the reader (``load_dataset``,
``DatasetHandle``), while nothing on the input side needs the builder — training asks
``build.from_config`` for a handle and feeds its sources to ``input.pipeline``.  So reading a
build never imports the TFDS builder or Beam.

``catalog`` is the synthetic built-in catalog (generator and its relevance oracle); ``build``
generates it when ``data.catalog_dir`` is empty, and it never imports ``build`` (its oracle
uses ``input.preprocess``).
"""
