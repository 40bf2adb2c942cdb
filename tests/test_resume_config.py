"""The resume check (``train.resume_config``): which config changes a checkpoint refuses, warns
about or accepts, and how checkpoints written before a field existed still resume.  Pure
metadata comparisons; the end-to-end refusal is in test_faults.py."""

import ml_collections
import pytest

from vlp_jax.train import resume_config


def test_check_resume_classifies_fields(tiny_config):
    saved = resume_config.resume_metadata(tiny_config, num_devices=1, process_count=1)
    changed = ml_collections.ConfigDict(tiny_config.to_dict())
    changed.train.learning_rate = 5e-4
    changed.checkpoint.every_steps = 7
    warnings = resume_config.check_resume(saved, changed, 1, 1, "ckpt 4")
    assert warnings == ["resuming ckpt 4 with changed train.learning_rate: 0.001 (checkpoint) -> "
                        "0.0005 (now); from here on the run differs from an uninterrupted one"]
    for dotted, value in (("train.batch_size", 32), ("negatives.bank_size", 64),
                          ("loss.mlm_weight", 0.0), ("train.seed", 1)):
        bad = ml_collections.ConfigDict(tiny_config.to_dict())
        section, field = dotted.split(".")
        bad[section][field] = value
        with pytest.raises(resume_config.ConfigMismatchError, match=f"\n  {dotted}: "):
            resume_config.check_resume(saved, bad, 1, 1, "ckpt 4")
    with pytest.raises(resume_config.ConfigMismatchError, match="process count: 1 .* -> 2"):
        resume_config.check_resume(saved, tiny_config, 1, 2, "ckpt 4")
    assert resume_config.check_resume(None, changed, 1, 1, "old ckpt") == []


def test_checkpoints_written_before_the_negatives_fields_still_resume(tiny_config):
    """A checkpoint whose config predates a field resumes when the field keeps the value that
    reproduces the old behaviour; a memory bank of the old layout is refused with a message."""
    old = resume_config.resume_metadata(tiny_config, num_devices=1, process_count=1)
    for field in resume_config.ADDED_FIELDS:
        del old["config"][field]
    # Written without an MLM cap (the field's absence meant 1.0): refused at base.py's 0.3, ...
    with pytest.raises(resume_config.ConfigMismatchError,
                       match="data.mlm_max_fraction: '<absent>' .* -> 0.3"):
        resume_config.check_resume(old, tiny_config, 1, 1, "old ckpt")
    old["config"]["data.mlm_max_fraction"] = 0.3  # ... resumed when it had the cap
    assert resume_config.check_resume(old, tiny_config, 1, 1, "old ckpt") == []
    changed = ml_collections.ConfigDict(tiny_config.to_dict())
    changed.negatives.momentum_keys = True
    with pytest.raises(resume_config.ConfigMismatchError, match="negatives.momentum_keys"):
        resume_config.check_resume(old, changed, 1, 1, "old ckpt")
    # keyword_bits (default 256 -> 1,024) shapes the state only with keyword control on
    old["config"]["negatives.keyword_bits"] = 256
    assert resume_config.check_resume(old, tiny_config, 1, 1, "old ckpt") == []
    old["config"]["negatives.keyword_control"] = "positive"
    keywords = ml_collections.ConfigDict(tiny_config.to_dict())
    keywords.negatives.keyword_control = "positive"
    with pytest.raises(resume_config.ConfigMismatchError, match="keyword_bits: 256"):
        resume_config.check_resume(old, keywords, 1, 1, "old ckpt")
    keywords.negatives.keyword_bits = 256
    assert resume_config.check_resume(old, keywords, 1, 1, "old ckpt") == []
    del old["config"]["negatives.keyword_control"], old["config"]["negatives.keyword_bits"]
    old["config"]["negatives.bank_size"] = 64
    with_bank = ml_collections.ConfigDict(tiny_config.to_dict())
    with_bank.negatives.bank_size = 64
    with pytest.raises(resume_config.ConfigMismatchError, match="layout of an older vlp_jax"):
        resume_config.check_resume(old, with_bank, 1, 1, "old ckpt")
