"""runtime.devices.cpu_devices_for / set_cpu_devices: one CPU device per core, sized to divide."""

import os
import subprocess
import sys
import textwrap

import pytest

from configs import base
from vlp_jax.runtime import devices as runtime

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(batch=128, accum=1, eval_batch=256, bank=0, cpu_devices=0, mesh=(-1,)):
    c = base.get_config()
    c.train.batch_size, c.train.accum_steps, c.train.cpu_devices = batch, accum, cpu_devices
    c.train.mesh_shape = mesh
    c.eval.batch_size, c.negatives.bank_size = eval_batch, bank
    return c


@pytest.mark.parametrize(
    "kwargs, cores, expected",
    [
        ({}, 2, 2),  # one per core
        ({}, 6, 4),  # 6 does not divide 128: the largest count <= 6 that does
        ({"batch": 96, "accum": 4}, 8, 8),  # micro-batch 24 and eval 256 both divide by 8
        ({"batch": 96, "accum": 8}, 8, 4),  # micro-batch 12: 4, not 8
        ({"bank": 1000}, 16, 8),  # the bank is sharded too: 1000 % 16 != 0
        ({"batch": 7, "eval_batch": 7}, 4, 1),
        ({"cpu_devices": 3}, 2, 3),  # explicit count wins
        ({"mesh": (4,)}, 2, 4),  # an explicit mesh gets exactly its devices
    ],
)
def test_cpu_devices_for(kwargs, cores, expected):
    assert runtime.cpu_devices_for(_config(**kwargs), cores=cores) == expected


def test_negative_count_is_rejected():
    with pytest.raises(ValueError, match="train.cpu_devices must be >= 0"):
        runtime.cpu_devices_for(_config(cpu_devices=-2), cores=2)


def test_set_cpu_devices_gives_jax_that_many_devices_unless_xla_flags_fix_it(tmp_path):
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {REPO!r})
        import jax
        from configs import base
        from vlp_jax.runtime import devices as runtime
        c = base.get_config()
        c.train.cpu_devices = 3
        c.train.batch_size = 3
        set_to = runtime.set_cpu_devices(c)
        print(set_to, jax.device_count())
    """))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = lambda e: subprocess.run([sys.executable, str(script)], env=e, capture_output=True,  # noqa: E731
                                   text=True, check=True).stdout.split()
    assert run(env) == ["3", "3"]
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=5"
    assert run(env) == ["0", "5"]  # the user's XLA_FLAGS win
