"""Serving, the offline side: bundle export, catalog item embedding, index build and incremental
update (single-process or on Apache Beam).

``python -m vlp_jax.indexing.index`` and ``python -m vlp_jax.indexing.beam_embed`` are the command
lines; ``export.export_bundle`` is called by training (``--mode=export`` and the end of a run).

The two on-disk formats both sides share live here too, with their readers: the bundle
(``export`` writes it, ``bundle`` loads it) and the index directory (``ann``), plus staging them
from object storage (``locations``) and the identity an index records of its bundle
(``provenance``).  The online service (``vlp_jax.serve``) sits one layer above and imports them;
nothing here imports ``serve``, because the offline jobs load bundles and read finished indexes
exactly as the service does.
"""
