"""``python -m vlp_jax.data.catalog --out=DIR [--num_items=N ...]``: write a built-in catalog."""

from absl import app

# The importable module's functions (not a __main__ copy), so worker processes find them.
from vlp_jax.data.catalog.cli import _define_flags, _main

if __name__ == "__main__":
    _define_flags()
    app.run(_main)
