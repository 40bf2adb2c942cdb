"""A TPU topology's compile-only devices on a machine without TPUs, and the config checks that
a run on it would hit (divisibility by devices and hosts), named by config field.

``jax.experimental.topologies.get_topology_desc`` asks libtpu for a topology's devices; they
can be compiled for but never run, so nothing is allocated.  v4 and v5p are described as
"megacore" chips (one JAX device per chip), the way JAX runs them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from vlp_jax.aot import chips
from vlp_jax.parallel import mesh as mesh_lib

_NAME = re.compile(r"^(v[0-9]+[a-z]*):([0-9]+(?:x[0-9]+){1,2})$")


class TopologyError(ValueError):
    """The topology name is unusable, or libtpu is missing."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """A topology's compile-only devices and what the report needs to know about them."""

    name: str
    chip: chips.Chip
    devices: tuple[jax.Device, ...]

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_hosts(self) -> int:
        return len({d.process_index for d in self.devices})


def libtpu_available() -> bool:
    """True when the libtpu package is importable (``pip install -e ".[tpu]"``)."""
    return importlib.util.find_spec("libtpu") is not None


def parse_name(name: str) -> tuple[str, tuple[int, ...]]:
    """``"v5e:16x16"`` -> ``("v5e", (16, 16))``; a clear error for other spellings."""
    match = _NAME.match(name.strip())
    if not match:
        hint = ""
        if re.match(r"^v[0-9]+[a-z]*-[0-9]+$", name.strip()):
            hint = " (accelerator-type names such as v5e-8 are not topologies: use v5e:2x4)"
        raise TopologyError(
            f"--topology={name!r} is not GENERATION:AxB[xC], e.g. v5e:2x2, v5e:16x16, "
            f"v4:4x4x8, v5p:4x4x4{hint}")
    return match.group(1), tuple(int(x) for x in match.group(2).split("x"))


def accelerator_type(generation: str, num_chips: int) -> str:
    """Cloud TPU's accelerator-type name of a slice (v4 and v5p count TensorCores)."""
    prefix = {"v5e": "v5litepod"}.get(generation, generation)
    cores = 2 * num_chips if generation in chips.MEGACORE else num_chips
    return f"{prefix}-{cores}"


def get_topology(name: str) -> Topology:
    """The compile-only devices of ``name``; raises ``TopologyError`` with what to do."""
    generation, dims = parse_name(name)
    chip = chips.chip_for(generation)
    if not libtpu_available():
        raise TopologyError(
            "compiling for a TPU topology needs libtpu: pip install -e \".[tpu]\" "
            "(it runs on a CPU-only machine; nothing is executed on a TPU)")
    # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) meant for processes that drive
    # real chips; compile-only processes share nothing, so several may load it at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # libtpu's start-up asks the cloud metadata server which slice it is part of; on a machine
    # that is not a TPU VM it prints "could not determine TPU accelerator type / worker
    # hostnames" warnings and an INVALID_ARGUMENT trace.  A compile-only topology uses neither
    # value (the compiled program is byte-identical either way): name the slice compiled for.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", accelerator_type(generation, math.prod(dims)))
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if generation in chips.MEGACORE else {}
    try:
        desc = topologies.get_topology_desc(topology_name=name.strip(), platform="tpu",
                                            **kwargs)
    except Exception as e:  # libtpu's own message says which shapes exist
        raise TopologyError(f"libtpu has no topology {name!r}: {e}") from e
    devices = tuple(desc.devices)
    if len(devices) != math.prod(dims):
        raise TopologyError(f"topology {name!r} gave {len(devices)} devices, expected "
                            f"{math.prod(dims)} (one per chip)")
    return Topology(name=name.strip(), chip=chip, devices=devices)


def make_mesh(config: ml_collections.ConfigDict, topo: Topology) -> Mesh:
    """The run's ``data`` mesh (``train.mesh_shape``) over the topology's devices."""
    shape = tuple(int(n) for n in config.train.mesh_shape)
    size = topo.num_devices if shape == (-1,) else (shape[0] if len(shape) == 1 else -1)
    if len(shape) != 1 or not 0 < size <= topo.num_devices:
        raise ValueError(f"train.mesh_shape={shape} does not fit {topo.name} "
                         f"({topo.num_devices} devices): use (-1,) for all of them")
    devices = topo.devices[:size]
    return Mesh(np.asarray(devices), (mesh_lib.DATA_AXIS,))


def check_divisible(config: ml_collections.ConfigDict, mesh: Mesh, topo: Topology) -> None:
    """Every problem a launch on ``topo`` would hit, each naming its field, raised at once."""
    n = mesh.shape[mesh_lib.DATA_AXIS]
    hosts = len({d.process_index for d in mesh.devices.flat})
    t, neg = config.train, config.negatives
    problems = []
    k = int(t.accum_steps)
    if t.batch_size % (n * k):
        what = f"the {n} data devices" + (f" × train.accum_steps={k} = {n * k}" if k > 1 else "")
        problems.append(f"train.batch_size={t.batch_size} must be divisible by {what} of "
                        f"{topo.name}: use a multiple of {n * k}")
    if t.batch_size % hosts:
        problems.append(f"train.batch_size={t.batch_size} must be divisible by the {hosts} "
                        f"hosts of {topo.name} (each host feeds its own rows)")
    if config.eval.batch_size % n:
        problems.append(f"eval.batch_size={config.eval.batch_size} must be divisible by the {n}"
                        f" data devices of {topo.name}")
    if neg.bank_size and neg.bank_size % n:
        problems.append(f"negatives.bank_size={neg.bank_size} must be divisible by the {n} "
                        f"data devices of {topo.name} (each holds bank_size/{n} rows)")
    if problems:
        raise ValueError(f"config does not divide topology {topo.name}:\n  "
                         + "\n  ".join(problems))
