"""Build time: a catalog → a TFDS dataset (array_record splits, tokenizer, build report), cached
under a fingerprint of its inputs.

- ``tfds_builder``: the TFDS builder ``VLPCatalog`` (registered name ``vlp_catalog``, version
  1.0.0) and the single-process build, local or published to an object store.
- ``beam_pipeline``: the same build on Apache Beam; its check stage is ``beam_stages``, its
  write stage ``beam_write``, and ``beam_commit`` commits it when ``data_dir`` is on a store.
- ``beam_io``: file access for every Beam job, through Beam's ``FileSystems``.
- ``fingerprint``: the cache key both builds name their output folder by.
- ``from_config``: ``config.data`` → a checked, opened dataset (generates the built-in
  catalog, builds if missing); what training, export and conversion call.
- ``cli`` / ``python -m vlp_jax.data.build``: build ahead of training.

Shared Beam I/O.  ``beam_io`` and the catalog-reading DoFns of ``beam_stages`` (``ReadLines``,
``ParseItems``, ``FirstOfId``, ``byte_ranges``, ``localize_images``) also serve the offline Beam
embedding job, which reads items.jsonl by the build's rules; that job imports them from here.
They stay in this package rather than a package of their own because ``beam_stages`` is mostly
the build's check stage and applies ``records``' rules, and one Beam layer that both jobs
import keeps "how a worker reads the catalog" in one place.  Apache Beam (the ``beam`` extra)
is imported by the ``beam_*`` modules only; this ``__init__`` imports nothing.

Imports the shared modules of ``vlp_jax.data``, ``vlp_jax.data.input`` and
``vlp_jax.data.catalog``; nothing in ``vlp_jax.data.input`` imports this package.
"""
