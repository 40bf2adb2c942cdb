"""Per-chip figures of the TPU generations the AOT report compares against.

Why a table and not the runtime: a compile-only topology (``jax.experimental.topologies``)
has no live device to ask for its memory or speed, and XLA's own cost model does not expose
the peaks it assumes.  The numbers are the vendor's published per-chip specifications; each
row names its page.  HBM is what one JAX device addresses: on v4 and v5p the report compiles
for "megacore" devices (one device per chip, both TensorCores), as JAX runs those chips.
"""

from __future__ import annotations

import dataclasses

GIB = 1024**3
GB = 1000**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip peaks: memory in bytes, compute in FLOP/s, bandwidths in bytes/s."""

    generation: str
    device_kind: str  # jax Device.device_kind of a compile-only device of this generation
    hbm_bytes: int
    peak_bf16_flops: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float | None  # bidirectional ICI per chip; None = not published per chip
    source: str


# device_kind strings as libtpu 0.0.42 reports them for compile-only topologies.
CHIPS: dict[str, Chip] = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12, 1200 * GB, None,
               "https://cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16; HBM2 32 GiB, "
               "1200 GBps; per-chip ICI bandwidth not listed)"),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12, 819 * GB, 400 * GB,
                "https://cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16; 16 GiB, 819 GBps; "
                "ICI 400 GBps bidirectional)"),
    "v5p": Chip("v5p", "TPU v5", 95 * GB, 459e12, 2765 * GB, 600 * GB,
                "https://cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16; HBM2e 95 GB, "
                "2765 GBps; ICI 4800 Gbps)"),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GB, 918e12, 1638 * GB, 800 * GB,
                "https://cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16; 32 GB, 1638 GBps; "
                "ICI 800 GBps bidirectional)"),
}

# Generations whose chips hold two TensorCores that JAX drives as one "megacore" device.
MEGACORE = ("v4", "v5p")


def chip_for(generation: str) -> Chip:
    """The table row of a topology prefix (``v5e`` of ``v5e:16x16``)."""
    try:
        return CHIPS[generation]
    except KeyError:
        raise ValueError(
            f"no chip figures for TPU generation {generation!r}; known: {sorted(CHIPS)} "
            "(vlp_jax/aot/chips.py)") from None


def markdown_table() -> str:
    """The table as Markdown (docs/aot.md prints the same rows)."""
    rows = ["| generation | HBM per chip | peak bf16 | HBM bandwidth | ICI (bidir.) | source |",
            "|---|---:|---:|---:|---:|---|"]
    for c in CHIPS.values():
        ici = "n/a" if c.ici_bytes_per_s is None else f"{c.ici_bytes_per_s / GB:.0f} GB/s"
        rows.append(f"| {c.generation} | {c.hbm_bytes / GIB:.1f} GiB | "
                    f"{c.peak_bf16_flops / 1e12:.0f} TFLOP/s | {c.hbm_bytes_per_s / GB:.0f} GB/s "
                    f"| {ici} | {c.source} |")
    return "\n".join(rows)
