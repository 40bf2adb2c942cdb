"""Process plumbing: CPU device count and the compilation cache (``devices``), a caching
malloc for XLA:CPU (``allocator``), atomic file writes (``atomic_io``).

May import: nothing else of vlp_jax (it is the bottom layer).
"""
