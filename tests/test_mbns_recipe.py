"""configs/mbns.py: the recipe's fields, its bank-free twin, config errors, and one tiny run that
exercises the momentum key path, the bank diagnostics and the false-negative oracle end to end."""

import json
import os

import numpy as np
import pytest

from configs import base, mbns
from vlp_jax.config import check as config_check
from vlp_jax.config.overrides import apply_overrides
from vlp_jax.experiments import grids
from vlp_jax.parallel import memory_bank
from vlp_jax.train import loop as train


def test_recipe_is_base_plus_the_declared_fields():
    recipe, plain = mbns.get_config().to_dict(), base.get_config().to_dict()
    changed = {f"{sec}.{k}" for sec in plain for k in plain[sec]
               if plain[sec][k] != recipe[sec][k]}
    assert changed == set(grids.MBNS_RECIPE) - {"negatives.bank_warmup_steps"}  # base: -1 too
    config_check.validate_config(mbns.get_config())
    # bank_size=0 on it: the same recipe without a bank (the grid's CDNS baseline).
    no_bank = apply_overrides(mbns.get_config(), {"negatives.bank_size": 0})
    config_check.validate_config(no_bank)
    assert grids.get_grid("mbns").variant("cdns_kw").overrides == {
        **grids.MBNS_RECIPE, "negatives.bank_size": 0}


def test_bank_starts_after_the_lr_warmup_unless_set():
    config = mbns.get_config()
    assert memory_bank.bank_start_step(config) == config.train.warmup_steps == 100
    config.negatives.bank_warmup_steps = 7
    assert memory_bank.bank_start_step(config) == 7


@pytest.mark.parametrize("overrides,message", [
    ({"negatives.momentum": 0.0}, "momentum_keys=True needs negatives.momentum > 0"),
    ({"loss.symmetric": False}, "needs loss.symmetric=True"),
    ({"loss.qic_type": "sigmoid"}, "implemented for the softmax kinds"),
    ({"negatives.ring": True, "negatives.filter_margin": 0.1}, "ring supports only"),
    ({"negatives.keyword_control": "some"}, "keyword_control"),
    ({"negatives.keyword_bits": 100}, "power of two"),
    ({"negatives.bank_warmup_steps": -2}, "or -1 for the end of the learning-rate warm-up"),
    ({"negatives.bank_item_grad": "half"}, "bank_item_grad"),
])
def test_config_errors_name_the_field(overrides, message):
    config = apply_overrides(mbns.get_config(), overrides)
    with pytest.raises(ValueError, match=message):
        config_check.validate_config(config)


def test_tiny_mbns_run_logs_the_bank_diagnostics(tiny_config, tmp_path):
    config = apply_overrides(tiny_config, {**grids.MBNS_RECIPE, "negatives.bank_size": 64,
                                           "negatives.keyword_control": "mask",
                                           "train.num_steps": 6, "train.warmup_steps": 2})
    workdir = str(tmp_path / "run")
    results = train.train_and_evaluate(config, workdir)
    assert 0.0 <= results["overall"]["R@10"] <= 1.0
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = {r["step"]: r for r in map(json.loads, f) if "loss" in r}
    for key in ("qic_batch_fn_count", "qic_fn_mass", "item_mean_norm", "query_mean_norm"):
        assert np.isfinite(rows[1][key]), key
    assert "qic_bank_mass" in rows[6] and rows[2]["qic_bank_mass"] == 0.0  # off before step 2
    assert 0.0 < rows[6]["qic_bank_mass"] < 1.0
    assert rows[6]["bank_fill"] == 1.0 and rows[6]["bank_age_mean"] > 0
    assert rows[6]["qic_bank_neg_logit_mean"] != 0.0
