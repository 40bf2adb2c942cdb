"""``python -m vlp_jax.serve.beam_embed``: the former name of
``python -m vlp_jax.indexing.beam_embed``.

Why it exists: building the item index is offline work and moved to ``vlp_jax.indexing``;
scripts and pipelines written against the old command keep working through this alias (same
flags, same output).  New code should use the new name.
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("vlp_jax.indexing.beam_embed", run_name="__main__", alter_sys=True)
