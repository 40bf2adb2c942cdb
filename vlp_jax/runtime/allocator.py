"""Run training under a caching malloc (tcmalloc or jemalloc) instead of glibc's.

Why: XLA:CPU allocates each step's temporary buffers (1.6 GB for the base config at batch 256)
with ``malloc`` and frees them when the step ends.  glibc serves allocations that large with
``mmap`` and returns them with ``munmap``, so every step page-faults all of its activations in
again: measured on the 2-core CI box, 406,000 minor faults and ~1 s of kernel time per 1.9 s
step.  A caching allocator that keeps freed memory mapped removes both (0 faults, 1.3-1.5 s
per step; ``benchmarks/train_throughput.py`` records which allocator a figure was taken with).
PyTorch's and TensorFlow's CPU performance guides give the same advice.

The allocator must be in place before the process starts (``LD_PRELOAD``), so
:func:`reexec_with_fast_allocator` re-executes the current command once with it preloaded.
``VLP_ALLOCATOR`` chooses: unset or ``auto`` = the first library found in
:data:`CANDIDATES`, ``system`` = keep glibc (no re-exec), or an explicit path to a ``.so``.
Nothing changes on platforms without ``LD_PRELOAD`` (macOS, Windows) or when no library is found.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

ENV_CHOICE = "VLP_ALLOCATOR"
_ENV_DONE = "VLP_ALLOCATOR_PRELOADED"  # set in the re-executed process: never loop
_LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
             "/usr/local/lib")
# (file name, environment that stops it from handing freed memory back to the kernel)
CANDIDATES: tuple[tuple[str, dict[str, str]], ...] = (
    ("libtcmalloc_minimal.so.4", {"TCMALLOC_RELEASE_RATE": "0",
                                  "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 40)}),
    ("libjemalloc.so.2", {"MALLOC_CONF": "dirty_decay_ms:-1,muzzy_decay_ms:-1"}),
)


def find_allocator(
    choice: str | None = None, lib_dirs: Sequence[str] = _LIB_DIRS
) -> tuple[str, dict[str, str]] | None:
    """(library path, extra environment) for ``choice`` (default: ``$VLP_ALLOCATOR``), or None.

    Raises ValueError for an explicit path that does not exist, so a typo is not silently
    ignored.
    """
    choice = os.environ.get(ENV_CHOICE, "auto") if choice is None else choice
    if choice == "system":
        return None
    if choice not in ("", "auto"):
        if not os.path.isfile(choice):
            raise ValueError(f"{ENV_CHOICE}={choice!r}: no such file (use 'auto' or 'system')")
        name = os.path.basename(choice)
        extra = next((env for lib, env in CANDIDATES if name.startswith(lib.split(".so")[0])), {})
        return choice, dict(extra)
    for name, extra in CANDIDATES:
        for directory in lib_dirs:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                return path, dict(extra)
    return None


def preload_environment(env: dict[str, str], path: str, extra: dict[str, str]) -> dict[str, str]:
    """A copy of ``env`` with ``path`` first in LD_PRELOAD and ``extra`` set (user values win)."""
    out = dict(env)
    preload = [p for p in out.get("LD_PRELOAD", "").split(":") if p and p != path]
    out["LD_PRELOAD"] = ":".join([path, *preload])
    for key, value in extra.items():
        out.setdefault(key, value)
    out[_ENV_DONE] = path
    return out


def active_allocator() -> str:
    """The allocator this process runs with, for logs: a library path, or a "system" note."""
    path = os.environ.get(_ENV_DONE)
    if path:
        return path
    if os.environ.get(ENV_CHOICE) == "system" or not sys.platform.startswith("linux"):
        return "system"
    return ("system (no tcmalloc/jemalloc found: `apt-get install libtcmalloc-minimal4` makes "
            "CPU train steps ~1.3x faster, see README)")


def reexec_with_fast_allocator(argv: Sequence[str] | None = None) -> None:
    """Re-execute this Python command with a caching allocator preloaded (see module doc).

    Returns normally (nothing to do) when already preloaded, when ``VLP_ALLOCATOR=system``,
    on non-Linux platforms or when no allocator library is installed.  Call it first thing in a
    ``__main__`` block, before any JAX computation.  ``argv`` defaults to the interpreter's
    original command line (``python -m vlp_jax.main ...`` is re-run as such).
    """
    if os.environ.get(_ENV_DONE) or not sys.platform.startswith("linux"):
        return
    found = find_allocator()
    if found is None:
        return
    path, extra = found
    argv = list(sys.orig_argv if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]],
              preload_environment(dict(os.environ), path, extra))
