"""Is libtpu installed on a host without TPU chips?  Decided without importing JAX.

The Makefile installs libtpu (the ``.[tpu]`` extra) so that ``python -m vlp_jax.aot`` can
compile for TPU topologies on any machine.  With it installed and ``JAX_PLATFORMS`` unset,
JAX's first device query loads libtpu to look for chips, finds none and falls back to the CPU:
0.1-0.5 s and a screen of libtpu errors on stderr in every command (docs/aot.md).  This module
only answers the question; ``vlp_jax/__init__`` and ``runtime.skip_absent_tpu`` act on it.
"""

from __future__ import annotations

import glob
import importlib.util
import pkgutil

_GOOGLE_PCI_VENDOR = "0x1ae0"  # the PCI vendor id of TPU chips


def libtpu_without_chips() -> bool:
    """True when libtpu is importable, no PCI device is Google's (not a TPU VM) and no other
    JAX accelerator plugin (CUDA, ROCm) is installed: the only backend to probe is absent."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return False
        except OSError:
            return False
    try:
        spec = importlib.util.find_spec("jax_plugins")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        if any("tpu" not in m.name for m in pkgutil.iter_modules(spec.submodule_search_locations)):
            return False
    return True
