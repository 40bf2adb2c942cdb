"""Test setup: 8 fake CPU devices so sharded code paths are exercised on a laptop/CI box.

Must run before JAX initialises its backends, hence module level in conftest.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
