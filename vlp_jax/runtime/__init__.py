"""Process plumbing: CPU device count and the compilation cache (``devices``), a caching
malloc for XLA:CPU (``allocator``), atomic file writes (``atomic_io``).

May import: nothing else of vlp_jax but the leaf `_tpu_host` (it is the bottom layer).
"""
