"""metrics.jsonl rows, averaging, and the non-finite-loss stop that names the step."""

import json
import math

import jax.numpy as jnp
import pytest

from vlp_jax.train import metrics_log


def test_rows_average_the_interval_and_report_throughput(tmp_path):
    logger = metrics_log.MetricsLogger(str(tmp_path), total_steps=10, global_batch=32)
    for step, loss in ((1, 4.0), (2, 2.0)):
        logger.record(step, {"loss": jnp.float32(loss), "qic_loss": jnp.float32(loss / 2)})
    row = logger.flush()
    logger.close()
    assert row["step"] == 2 and row["loss"] == 3.0 and row["qic_loss"] == 1.5
    assert row["examples_per_sec"] == pytest.approx(32 * row["steps_per_sec"])
    written = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert written == [row]
    assert logger.flush() is None  # nothing pending


def test_non_finite_loss_names_the_first_bad_step(tmp_path):
    logger = metrics_log.MetricsLogger(str(tmp_path), total_steps=10, global_batch=8)
    logger.record(5, {"loss": jnp.float32(1.0), "mlm_loss": jnp.float32(1.0)})
    logger.record(6, {"loss": jnp.float32(math.inf), "mlm_loss": jnp.float32(math.nan)})
    logger.record(7, {"loss": jnp.float32(math.nan), "mlm_loss": jnp.float32(math.nan)})
    expected = r"non-finite loss at step 6: .*mlm_loss"
    with pytest.raises(metrics_log.NonFiniteLossError, match=expected):
        logger.flush()
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()  # the bad interval is not logged as data


def test_format_duration():
    assert metrics_log.format_duration(59) == "0:59"
    assert metrics_log.format_duration(3725) == "1:02:05"
