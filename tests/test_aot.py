"""The AOT report's parts that need no TPU compiler: HLO collective counting, topology names,
divisibility errors naming config fields, the step-time estimate and the chip table.

The golden compile for a real topology (libtpu) is in ``test_aot_golden.py``.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import pytest

from vlp_jax.aot import analysis, chips, estimate, hlo, report, topology

_HLO = "\n".join([
    'HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[8]{0})->f32[8]{0}}',
    '',
    '%body.1 (p: (s32[], f32[8])) -> (s32[], f32[8]) {',
    '  %p = (s32[], f32[8]{0}) parameter(0)',
    '  %all-reduce.2 = f32[8]{0:T(128)} all-reduce(%x), channel_id=2,'
    ' replica_groups={{0,1}}, to_apply=%add, metadata={op_name="jit(step)/while/body/psum"}',
    '}',
    '',
    '%async_collective_fusion.1 (param_0: s32[128,2]) -> s32[512,2] {',
    '  %all-gather.5 = s32[512,2]{0,1:T(2,128)} all-gather(%param_0), channel_id=1,'
    ' frontend_attributes={chain_id="0"}, metadata={op_name="jit(step)/shard_map/all_gather"}',
    '}',
    '',
    '%async_collective_fusion.2 (param_0: s32[128,2]) -> s32[512,2] {',
    '  %all-gather.6 = s32[512,2]{0,1:T(2,128)S(1)} all-gather(%param_0), channel_id=1,'
    ' frontend_attributes={chain_id="0"}, metadata={op_name="jit(step)/shard_map/all_gather"}',
    '}',
    '',
    'ENTRY %main.3 (a: f32[8]) -> f32[8] {',
    '  %fusion.1 = s32[512,2]{0,1} fusion(%a), kind=kCustom, calls=%async_collective_fusion.1',
    '  %fusion.2 = s32[512,2]{0,1} fusion(%a), kind=kCustom, calls=%async_collective_fusion.2',
    '  %while.4 = (s32[], f32[8]{0}) while(%t), condition=%cond.1, body=%body.1,'
    ' backend_config={"known_trip_count":{"n":"4"}}',
    '  %cp = (f32[16,4]{1,0}, f32[16,4]{1,0}) collective-permute-start(%y),'
    ' source_target_pairs={{0,1},{1,0}}',
    '  %ar = (f32[32,32]{1,0}, bf16[64]{0}) all-reduce(%g, %h), channel_id=3, to_apply=%add',
    '  ROOT %r = f32[8]{0} copy(%x)',
    '}',
    '',
])


def test_collectives_merge_async_fragments_and_multiply_loop_trips():
    found = hlo.collectives(_HLO)
    summary = hlo.summarise(found)
    # two fragments with one chain_id = one all-gather of 512 x 2 int32
    assert summary["all-gather"] == {"count": 1, "bytes": 512 * 2 * 4}
    # the psum in a 4-trip while body runs 4 times; the tuple all-reduce sums its operands
    assert summary["all-reduce"] == {"count": 4 + 1, "bytes": 4 * 8 * 4 + (32 * 32 * 4 + 64 * 2)}
    # a -start op's result tuple holds (operand, result): only the result counts
    assert summary["collective-permute"] == {"count": 1, "bytes": 16 * 4 * 4}
    assert summary["reduce-scatter"]["count"] == summary["all-to-all"]["count"] == 0
    ops = {c.op_name for c in found}
    assert "jit(step)/shard_map/all_gather" in ops
    assert analysis.origin("jit(step)/shard_map/all_gather", "s32[512,2]",
                           "all-gather").startswith("design")
    assert analysis.origin("", "(f32[32,32], bf16[64,8])").startswith("data parallel")
    assert analysis.origin("", "(f32[], f32[])").startswith("unnamed")


@pytest.mark.parametrize("name,hint", [("v5e-8", "v5e:2x4"), ("tpu", "GENERATION:AxB"),
                                       ("v5e:16", "GENERATION:AxB")])
def test_bad_topology_names_say_how_to_write_one(name, hint):
    with pytest.raises(topology.TopologyError, match=hint.replace(":", ":").split("[")[0]):
        topology.parse_name(name)


def test_accelerator_type_names_the_slice_compiled_for():
    # set for libtpu's start-up, which otherwise warns that it cannot find them (docs/aot.md)
    assert topology.accelerator_type("v5e", 256) == "v5litepod-256"
    assert topology.accelerator_type("v4", 128) == "v4-256"  # v4 / v5p count TensorCores
    assert topology.accelerator_type("v5p", 64) == "v5p-128"
    assert topology.accelerator_type("v6e", 64) == "v6e-64"


def test_unknown_generation_and_missing_libtpu_are_clear(monkeypatch):
    with pytest.raises(ValueError, match="no chip figures for TPU generation 'v9z'"):
        topology.get_topology("v9z:2x2")
    monkeypatch.setattr(topology, "libtpu_available", lambda: False)
    with pytest.raises(topology.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
        topology.get_topology("v5e:2x2")


def test_config_that_does_not_divide_the_topology_names_each_field(tiny_config):
    if jax.device_count() < 4:
        pytest.skip("needs 4 (fake) devices")
    fake = topology.Topology("v5e:2x2", chips.chip_for("v5e"), tuple(jax.devices()[:4]))
    config = tiny_config
    config.train.mesh_shape = (-1,)
    config.train.batch_size = 30
    config.eval.batch_size = 66
    config.negatives.bank_size = 6
    mesh = topology.make_mesh(config, fake)
    with pytest.raises(ValueError) as err:
        topology.check_divisible(config, mesh, fake)
    text = str(err.value)
    for field in ("train.batch_size=30", "eval.batch_size=66", "negatives.bank_size=6"):
        assert field in text
    config.train.mesh_shape = (8,)
    with pytest.raises(ValueError, match=r"train.mesh_shape=\(8,\) does not fit v5e:2x2"):
        topology.make_mesh(config, fake)


def test_invalid_config_fails_before_any_compile(tiny_config, monkeypatch):
    monkeypatch.setattr(topology, "get_topology", lambda name: pytest.fail("reached libtpu"))
    tiny_config.model.dtype = "float16"
    with pytest.raises(ValueError, match="model.dtype='float16'"):
        report.build_report(tiny_config, "v5e:2x2")
    with pytest.raises(ValueError, match="--programs"):
        report.build_report(tiny_config, "v5e:2x2", programs=("train", "nope"))


def _program(**kw):
    p = {"rows": 1000, "flops_per_device": 197e12 * 0.012, "bytes_accessed_per_device": 819e9
         * 0.050, "optimal_seconds": -3.0, "alias_bytes": int(1e9), "argument_bytes": int(1.1e9),
         "output_bytes": int(1e9), "temp_bytes": int(2e9),
         "collective_list": [{"kind": "all-reduce", "bytes": int(1e9), "executions": 1},
                             {"kind": "all-gather", "bytes": int(4e8), "executions": 2}]}
    p.update(kw)
    return p


def test_estimator_bounds_terms_and_names_the_dominating_one():
    chip = dataclasses.asdict(chips.chip_for("v5e"))
    e = estimate.estimate(_program(), chip, data_devices=4, model_flops=197e12 * 0.010)
    lo, hi = e["terms_lower_s"], e["terms_upper_s"]
    assert lo["compute"] == pytest.approx(0.010)  # model FLOPs at peak, not XLA's 12 ms
    # must move: state 1 GB read + written, 0.1 GB batch read, temp 2 GB written + read
    assert e["memory_lower_bytes"] == pytest.approx(2e9 + 0.1e9 + 0 + 4e9)
    assert lo["memory"] == pytest.approx(6.1e9 / 819e9) and hi["memory"] == pytest.approx(0.050)
    # ring volumes on 4 devices: all-reduce 2*3/4 of 1 GB, all-gather 3/4 of 0.4 GB twice
    assert e["ici_bytes_per_device"] == pytest.approx(1.5e9 + 0.6e9)
    assert lo["ici"] == pytest.approx(2.1e9 / 400e9)
    assert e["step_seconds_range"] == pytest.approx([0.010, 0.050])
    assert (e["bound_lower"], e["bound_upper"]) == ("compute", "memory")
    assert e["mfu_range"] == pytest.approx([0.2, 1.0])
    assert e["hfu_range"] == pytest.approx([0.24, 1.0])  # XLA's 12 ms of FLOPs bound it
    assert e["rows_per_second_range"] == pytest.approx([2e4, 1e5])
    assert e["cost_model_seconds"] == -3.0  # reported, never used
    line = report.format_estimate({"estimate": e})
    assert "10.00-50.00 ms (compute-bound at the low end, memory-bound" in line
    assert "XLA cost model unusable (-3 s)" in line
    v4 = estimate.estimate(_program(), dataclasses.asdict(chips.chip_for("v4")), 4, None)
    assert v4["terms_lower_s"]["ici"] == 0 and v4["ici_term"].startswith("n/a")
    assert v4["flops_source"].startswith("XLA")


def test_model_flops_follow_the_passes_the_step_runs(tiny_config):
    c = tiny_config
    c.loss.mlm_weight = c.loss.query_mlm_weight = c.loss.mpm_weight = 0.0
    c.negatives.bank_size, c.negatives.momentum = 0, 0.0
    parts = estimate.train_model_flops(c, vocab_size=100)
    assert set(parts) == {"query_tower", "item_tower", "projections", "scores", "total"}
    m, b = c.model, c.train.batch_size
    w, mlp, lq, lt = m.width, m.mlp_ratio * m.width, c.data.query_len, c.data.title_len
    n, pd = (c.data.image_size // m.patch_size) ** 2, m.patch_size ** 2 * 3

    def enc(t, depth):  # 2 x params per token x tokens + 4 T^2 W per layer, forward
        return 2 * depth * (4 * w * w + 2 * w * mlp) * t * b + 4 * depth * t * t * w * b

    assert parts["query_tower"] == pytest.approx(3 * enc(lq, m.query_depth))
    assert parts["item_tower"] == pytest.approx(3 * (enc(lt + n, m.depth) + 2 * pd * w * n * b))
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    c.loss.mlm_weight, c.negatives.momentum, c.negatives.bank_size = 0.5, 0.99, 64
    more = estimate.train_model_flops(c, vocab_size=100)
    assert {"masked_item_pass", "momentum_forward"} <= set(more)
    assert more["scores"] > parts["scores"]


def test_out_of_memory_message_is_parsed():
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (24.00G) exceeds available HBM (15.75G).")
    parsed = analysis._hbm_error(msg)
    assert parsed["required_bytes"] == pytest.approx(24 * 2**30)
    assert parsed["available_bytes"] == pytest.approx(15.75 * 2**30)


def test_chip_table_has_a_source_for_every_generation():
    table = chips.markdown_table()
    for gen in ("v4", "v5e", "v5p", "v6e"):
        row = next(line for line in table.splitlines() if line.startswith(f"| {gen} |"))
        assert "https://cloud.google.com/tpu/docs/" in row
    assert chips.chip_for("v5e").hbm_bytes == 16 * 2**30


def test_libtpu_without_chips_keeps_main_on_the_cpu(monkeypatch):
    """``runtime.skip_absent_tpu``: with libtpu installed, no Google PCI device and no other
    plugin, JAX is told to use the CPU instead of probing libtpu; any of those present, or
    JAX_PLATFORMS set, and it does nothing."""
    import importlib.util
    import types

    from vlp_jax.runtime import devices

    updates = []
    fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(
        jax_platforms=None, update=lambda k, v: updates.append((k, v))))
    monkeypatch.setattr(devices, "jax", fake_jax)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "libtpu" else real(name, *a))
    from vlp_jax import _tpu_host

    monkeypatch.setattr(_tpu_host.glob, "glob", lambda pattern: [])
    assert devices.skip_absent_tpu() and updates == [("jax_platforms", "cpu")]
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert not devices.skip_absent_tpu() and len(updates) == 1


def test_importing_vlp_jax_keeps_every_command_on_the_cpu():
    """With libtpu installed (the Makefile's venv) and no TPU chip, ``import vlp_jax`` sets
    JAX_PLATFORMS=cpu, so no command probes libtpu; a caller's own setting is kept."""
    pytest.importorskip("libtpu", reason="libtpu not installed (the .[tpu] extra)")
    code = ("import os, vlp_jax, jax; print(os.environ.get('JAX_PLATFORMS'), "
            "jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.split() == ["cpu", "cpu"]
    assert "libtpu" not in out.stderr and "TPU" not in out.stderr
    out = subprocess.run([sys.executable, "-c", "import os, vlp_jax; print(os.environ."
                          "get('JAX_PLATFORMS'))"], env={**env, "JAX_PLATFORMS": "tpu"},
                         capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == ["tpu"]


def test_calibration_config_is_the_published_siglip_b16_shape():
    """configs/calibration_siglip_b16.py (docs/aot.md, Calibration): the sigmoid loss alone on a
    ViT-B/16 item tower (2 title + 1 [CLS] + 196 patch positions) and a 16-token B-sized text
    tower at SigLIP's batch of 16,384 — the model FLOPs the calibration ratio rests on."""
    from configs import calibration_siglip_b16
    from vlp_jax.config import check

    c = calibration_siglip_b16.get_config()
    check.validate_config(c)
    assert (c.loss.qic_type, c.loss.mpm_type, c.model.remat) == ("sigmoid", "none", "block")
    parts = estimate.train_model_flops(c, vocab_size=c.data.vocab_size)
    assert set(parts) == {"query_tower", "item_tower", "projections", "scores", "total"}
    b, w, mlp = 16384, 768, 3072

    def enc(t):  # 12 layers: 2 x params per token x tokens + 4 T^2 W, forward
        return 2 * 12 * (4 * w * w + 2 * w * mlp) * t * b + 4 * 12 * t * t * w * b

    assert parts["item_tower"] == pytest.approx(3 * (enc(199) + 2 * 768 * w * 196 * b))
    assert parts["query_tower"] == pytest.approx(3 * enc(16))
    assert parts["total"] / 16 == pytest.approx(117.45e12, rel=1e-3)  # per v4 chip per step
