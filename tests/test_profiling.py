"""vlp_jax.perf.profiling: HLO parsing (matmul FLOPs), attribution to model parts, trace reading."""

from __future__ import annotations

import gzip
import json

import jax
import jax.numpy as jnp
import pytest

from vlp_jax.perf import profiling


def _op(op_name: str, flops: float = 0.0, opcode: str = "fusion") -> profiling.HloOp:
    return profiling.HloOp("x", opcode, "f32[2]", op_name, flops)


def test_parse_hlo_counts_matmul_flops_of_the_compiled_dot():
    f = jax.jit(lambda x, w, v: jnp.tanh(x @ w) @ v)
    x, w, v = jnp.ones((64, 32)), jnp.ones((32, 16)), jnp.ones((16, 8))
    ops = profiling.parse_hlo(f.lower(x, w, v).compile().as_text())
    flops = sorted(op.matmul_flops for op in ops.values() if op.matmul_flops)
    # Wherever XLA puts them (plain dots or library fusions), exactly the two matmuls count.
    assert flops == [2 * 64 * 16 * 8, 2 * 64 * 32 * 16]


@pytest.mark.parametrize(("path", "flops", "expected"), [
    ("jit(guarded)/jvp(VLPModel)/VLPModel._item_hidden/item_encoder.transform/blocks_0/mlp/fc1/"
     "dot_general", 1.0, ("matmul", "forward")),
    ("jit(guarded)/transpose(jvp(VLPModel))/VLPModel._item_hidden/item_encoder.transform/"
     "blocks_1/attn/bqhd,bkhd->bhqk/dot_general", 1.0, ("attention core", "backward")),
    ("jit(guarded)/transpose(jvp(VLPModel))/VLPModel._item_hidden/item_encoder.transform/"
     "blocks_1/attn/transpose", 1.0, ("matmul", "backward")),  # a QKV weight gradient
    ("jit(guarded)/jvp(VLPModel)/VLPModel._item_hidden/item_encoder.transform/blocks_1/attn/"
     "reduce_max", 0.0, ("attention core", "forward")),
    ("jit(guarded)/jvp(VLPModel)/VLPModel._item_hidden/item_encoder.transform/blocks_1/attn/out/"
     "add", 0.0, ("bias + GELU", "forward")),
    ("jit(guarded)/transpose(jvp(VLPModel))/VLPModel._query_hidden/query_encoder.transform/"
     "blocks_0/attn_norm/reduce_sum", 0.0, ("layernorm", "backward")),
    ("jit(guarded)/jvp(VLPModel)/VLPModel._item_hidden/item_encoder.transform/blocks_0/mlp/mul",
     0.0, ("bias + GELU", "forward")),
    ("jit(guarded)/jvp(VLPModel)/VLPModel._item_hidden/item_encoder.transform/blocks_0/add",
     0.0, ("residual, embeddings, pooling", "forward")),
    ("jit(guarded)/jvp(VLPModel)/VLPModel._mlm_logits/mlm_head/dot_general", 2.0,
     ("MLM heads", "forward")),
    ("jit(guarded)/transpose(jvp())/mpm_head/transform/norm/reduce_sum", 0.0,
     ("MPM head", "backward")),
    ("jit(guarded)/jvp()/reduce_sum", 0.0, ("losses", "forward")),
    ("jit(guarded)/is_finite", 0.0, ("optimizer + update guard", "update")),
])
def test_categorize(path, flops, expected):
    if expected[0] == "matmul":  # the same op left to Eigen (a plain dot) has its own category
        assert profiling.categorize(_op(path, flops, "dot")) == ("matmul (Eigen)", expected[1])
    assert profiling.categorize(_op(path, flops)) == expected


def test_op_durations_skips_runtime_events_and_summary_adds_up(tmp_path):
    events = [
        {"ph": "X", "name": "ynn_fusion.1", "dur": 3000.0},
        {"ph": "X", "name": "ynn_fusion.1", "dur": 1000.0},
        {"ph": "X", "name": "add_fusion.2", "dur": 500.0},
        {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9e6},
        {"ph": "X", "name": "$profiler.py:307 trace", "dur": 9e6},
        {"ph": "i", "name": "ynn_fusion.1"},
        {"ph": "X", "name": "unknown.3", "dur": 200.0},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    total, count = profiling.op_durations(str(path))
    assert dict(count) == {"ynn_fusion.1": 2, "add_fusion.2": 1, "unknown.3": 1}
    ops = {
        "ynn_fusion.1": profiling.HloOp("ynn_fusion.1", "fusion", "f32[8,8]",
                                        "jit(f)/jvp(VLPModel)/blocks_0/mlp/fc1/dot_general", 4e9),
        "add_fusion.2": profiling.HloOp("add_fusion.2", "fusion", "f32[8]",
                                        "jit(f)/transpose(jvp(VLPModel))/blocks_0/mlp_norm/add",
                                        0.0),
    }
    s = profiling.summarize(total, count, ops, steps=2, wall_seconds_per_step=0.003)
    cats = s["categories"]
    assert cats["matmul"]["ms"] == pytest.approx(2.0)  # (3 + 1) ms over 2 steps
    assert cats["matmul"]["gflop"] == pytest.approx(4.0)  # 4 GFLOP per run, once per step
    assert cats["matmul"]["gflops_per_s"] == pytest.approx(2000.0)
    assert cats["layernorm"]["backward_ms"] == pytest.approx(0.25)
    assert s["unattributed_ms_per_step"] == pytest.approx(0.1)
    assert s["op_ms_per_step"] == pytest.approx(2.25)
    assert sum(c["share"] for c in cats.values()) == pytest.approx(1.0)
    assert [r["op"] for r in s["top_ops"]] == ["ynn_fusion.1", "add_fusion.2"]
    assert "matmul" in profiling.format_summary(s)
