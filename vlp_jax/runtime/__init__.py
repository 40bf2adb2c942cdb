"""Process plumbing: CPU device count and the compilation cache (``devices``), a caching
malloc for XLA:CPU (``allocator``), locations and file operations on local disks and object
stores (``fs``), atomic writes (``atomic_io``), storage faults (``storage``), peers and
supervision of multi-process runs (``peers``, ``supervise``).

What it may import: docs/architecture.md ("Packages"), checked by tests/test_layout.py.
"""
