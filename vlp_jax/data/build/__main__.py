"""``python -m vlp_jax.data.build [--config=... | --catalog_dir= --data_dir=] [--runner=...]``:
build (or reuse) a catalog's TFDS dataset (``cli``)."""

from absl import app

# The importable module's functions (not a __main__ copy), so Beam workers find them.
from vlp_jax.data.build.cli import _define_flags, _main

if __name__ == "__main__":
    _define_flags()
    app.run(_main)
