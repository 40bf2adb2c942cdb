"""Serving: per-tower bundle export, bundle loading, offline item index, HTTP search service.

``load_bundle(path)`` is the public entry point (``encode_queries`` / ``encode_items``);
``python -m vlp_jax.serve.index`` and ``python -m vlp_jax.serve.server`` are the command lines.
"""

from vlp_jax.serve.bundle import Bundle, load_bundle

__all__ = ["Bundle", "load_bundle"]
