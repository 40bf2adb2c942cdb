"""Process-wide runtime settings applied once at start-up by ``main`` (and the tests).

Kept in one place so library code never mutates global JAX/logging state behind a caller.
"""

from __future__ import annotations

import logging
import os

import jax


class _DropLibraryInfo(logging.Filter):
    """Orbax logs every save phase at INFO; keep its warnings, drop its chatter."""

    NOISY = ("orbax", "tensorflow_datasets", "tensorboardX")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(part in record.pathname for part in self.NOISY)


def quiet_library_logs() -> None:
    """Install the filter on absl's handler (used by ``main``; tests keep full logs)."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().addFilter(_DropLibraryInfo())


def enable_compilation_cache(cache_dir: str = "") -> str:
    """Persist compiled XLA programs so a rerun (resume, eval, tests) skips recompiling.

    On this 2-core CPU a train-step compile costs 10-20 s; the cache makes the second start of
    the same config nearly free.  Returns the directory used.
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "vlp_jax", "xla")
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return cache_dir
