"""Performance tooling used by ``benchmarks/``: model FLOPs and MFU (``mfu``), step profiles
(``profiling``), a harness that times one compiled train step (``step_harness``) and random
batches with the train-batch contract (``synthetic``).

What it may import: docs/architecture.md ("Packages"), checked by tests/test_layout.py.
"""
