"""The built-in product catalog: synthetic products whose images show what their titles omit.

``generate`` writes a catalog in the documented format (items.jsonl, images, pairs); ``vocab``,
``text``, ``queries`` and ``render`` are its attribute tables, titles, queries and pictures;
``relevance`` rebuilds the generator's ground truth for diagnostics.  Run it as
``python -m vlp_jax.data.catalog --out=DIR``.
"""

from vlp_jax.data.catalog.generate import BLOCK_SIZE, generate_catalog, item_attributes, item_id

__all__ = ["BLOCK_SIZE", "generate_catalog", "item_attributes", "item_id"]
