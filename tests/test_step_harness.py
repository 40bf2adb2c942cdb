"""vlp_jax.perf.step_harness: compiler options for per-variant compilation (benchmarks/step_ab)."""

from __future__ import annotations

import pytest

from vlp_jax.perf import step_harness


def test_parse_compiler_options_types_values_like_xla_expects():
    fusions = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
    got = step_harness.parse_compiler_options([
        "xla_cpu_use_onednn=true", "xla_cpu_enable_fast_math=False",
        "xla_cpu_prefer_vector_width=128", f"xla_cpu_experimental_ynn_fusion_type={fusions}",
    ])
    assert got == {
        "xla_cpu_use_onednn": True, "xla_cpu_enable_fast_math": False,
        "xla_cpu_prefer_vector_width": 128, "xla_cpu_experimental_ynn_fusion_type": fusions,
    }


@pytest.mark.parametrize("bad", ["use_onednn=true", "xla_cpu_use_onednn"])
def test_parse_compiler_options_refuses_malformed_items(bad):
    with pytest.raises(ValueError, match="a compiler option is xla_NAME=VALUE"):
        step_harness.parse_compiler_options([bad])
