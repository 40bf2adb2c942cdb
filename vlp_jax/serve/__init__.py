"""Serving, the online side: the HTTP search service over a bundle's query tower and an index
directory (service, HTTP and admin apps, batching, hot index swap, metrics, worker processes).

``python -m vlp_jax.serve.server`` is the command line.  ``load_bundle(path)`` (``encode_queries``
/ ``encode_items``) is this package's public entry point for encoding; it is defined in
``vlp_jax.indexing.bundle`` because the offline item embedding, one layer below, loads bundles
too.  Building and updating indexes is ``vlp_jax.indexing``'s.
"""

from vlp_jax.indexing.bundle import Bundle, load_bundle

__all__ = ["Bundle", "load_bundle"]
