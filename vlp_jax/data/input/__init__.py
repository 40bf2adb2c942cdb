"""Step time: a finished dataset build → device batches.

``dataset_reader`` opens a build (splits as random-access sources, checked for length; a build
on gs:// / s3:// through its verified local copy), ``pipeline`` is the Grain training and eval
pipeline, ``preprocess`` the pure-numpy tokenising, masking and patching shared with evaluation
and serving, ``device_prefetch`` the read-ahead that keeps resume exact.

Imports only the shared modules of ``vlp_jax.data`` (``records``, ``tokenizer``,
``store_commit``, ``shard_check``), never ``vlp_jax.data.build``: see ``vlp_jax.data``.
"""
