"""vlp_jax: vision-language pre-training for text-to-multimodal product retrieval (JAX/Flax).

Importing the package does one thing to the process: on a host where libtpu is installed but
there is no TPU chip (``_tpu_host``), it sets ``JAX_PLATFORMS=cpu`` unless the caller set it, so
every command, benchmark and worker runs on the CPU as it would without libtpu instead of
probing for chips first.  ``python -m vlp_jax.aot`` compiles for TPU topologies regardless.
"""

import os as _os

if not _os.environ.get("JAX_PLATFORMS"):
    from vlp_jax._tpu_host import libtpu_without_chips as _libtpu_without_chips

    if _libtpu_without_chips():
        _os.environ["JAX_PLATFORMS"] = "cpu"
