"""One source of truth for config fields: configs/base.py defines every field the code reads,
code reads them as attributes (no ``get(key, default)`` with a second, diverging default), a
misspelt or unknown field is refused naming it, and configs saved by older code (checkpoint
metadata, a bundle's or workdir's config.json) still resume and load."""

import ast
import json
import pathlib
import subprocess
import sys

import jax
import ml_collections
import pytest

from configs import base
from vlp_jax.config import saved
from vlp_jax.config.overrides import apply_overrides, load_config_file
from vlp_jax.experiments import grids
from vlp_jax.models import build
from vlp_jax.train import resume_config

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")
# Names the code gives a config or one of its sections (``neg = config.negatives``); a ``.get``
# on any of them, or on an attribute chain through a section, is a config read with a default.
_CONFIG_NAMES = {"config", "cfg", "neg", "neg_cfg", "lcfg", "lo", "m", "c", "data_cfg",
                 "model_cfg", "model", "data", "loss", "negatives", "train", "checkpoint", "eval"}


def _flat(config) -> dict:
    return resume_config.flatten_config(config)


def _names(node: ast.AST) -> list[str]:
    """Identifiers along a receiver like ``run.config.negatives`` (innermost first)."""
    out = []
    while isinstance(node, ast.Attribute):
        out.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        out.append(node.id)
    return out


def test_no_config_read_has_a_default_of_its_own():
    found = []
    for path in sorted((ROOT / "vlp_jax").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and node.args
                    and set(_names(node.func.value)) & _CONFIG_NAMES):
                found.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert found == [], "read config fields as attributes (configs/base.py defines them all)"


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_has_exactly_the_base_fields(name):
    """A field a config file sets that base.py lacks would be a misspelling nothing reads."""
    module = __import__(f"configs.{name}", fromlist=["get_config"])
    assert set(_flat(module.get_config())) == set(_flat(base.get_config()))


# What the entry points do with --config (python -m vlp_jax.main, .aot, .data.build).
_FLAGS_SCRIPT = """
from absl import app, flags
from ml_collections import config_flags
config_flags.DEFINE_config_file("config", None, "config file")
app.run(lambda argv: print(flags.FLAGS.config.to_json()))
"""


def _parse_config_flags(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT, "--config=configs/base.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_a_misspelt_command_line_field_is_refused_naming_it():
    proc = _parse_config_flags("--config.negatives.bank_sise=8")
    assert proc.returncode != 0
    assert "bank_sise" in proc.stderr and 'Did you mean "bank_size"' in proc.stderr


def test_typed_unset_fields_take_command_line_values():
    proc = _parse_config_flags("--config.model.embed_norm=True", "--config.model.query_num_heads=2")
    model = json.loads(proc.stdout.splitlines()[-1])["model"]
    assert model["embed_norm"] is True and model["query_num_heads"] == 2


def test_a_misspelt_override_is_refused_naming_the_closest_field():
    with pytest.raises(KeyError, match=r"'negatives.bank_sise' \(did you mean "
                                       r"'negatives.bank_size'\?\)"):
        apply_overrides(base.get_config(), {"negatives.bank_sise": 8})
    for grid in grids.GRIDS.values():  # every grid variant names existing fields only
        for variant in grid.variants:
            apply_overrides(base.get_config(), {**grid.common, **variant.overrides})


def test_loaded_configs_are_locked_against_new_fields():
    config = load_config_file(str(ROOT / "configs" / "mbns.py"))
    config.negatives.bank_size = 64  # existing fields stay writable
    with pytest.raises(AttributeError, match="bank_sise"):
        config.negatives.bank_sise = 8
    with pytest.raises(AttributeError, match="bank_sise"):
        apply_overrides(config, {}).negatives.bank_sise = 8


def test_unset_query_layout_follows_the_item_tower():
    config = base.get_config()
    config.model.num_heads, config.model.query_activation = 8, "quick_gelu"
    layout = build.query_layout(config.model)
    assert layout["query_num_heads"] == 8 and layout["query_activation"] == "quick_gelu"
    assert layout["query_pre_norm"] is True and layout["query_embed_norm"] is None


# ---------------------------------------------------------------- configs saved by older code

def _before_schema() -> dict:
    """config.json of a configs/base.py run written before every field was in base.py."""
    with open(ROOT / "tests" / "data" / "config_json_before_schema.json") as f:
        return json.load(f)


def _current_like_it() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.train.num_steps = 20  # what that run was started with
    return config


def test_a_checkpoint_saved_before_the_new_fields_resumes():
    old = _before_schema()
    assert "patch_pos_emb" not in old["model"]  # it predates the fields added to base.py
    saved_meta = {"config": _flat(ml_collections.ConfigDict(old))}
    assert resume_config.check_resume(saved_meta, _current_like_it(), 1, 1, "old ckpt") == []
    changed = _current_like_it()
    changed.model.image_cls = True  # a field it lacks, at a value the old code never ran
    with pytest.raises(resume_config.ConfigMismatchError, match="model.image_cls: '<absent>'"):
        resume_config.check_resume(saved_meta, changed, 1, 1, "old ckpt")


def test_a_checkpoint_with_a_field_this_code_lacks_is_refused_naming_it():
    old = _before_schema()
    old["negatives"]["bank_sise"] = 8
    old["eval"]["old_setting"] = 1  # bookkeeping (eval.*): ignored like any eval change
    saved_meta = {"config": _flat(ml_collections.ConfigDict(old))}
    with pytest.raises(resume_config.ConfigMismatchError,
                       match=r"\['negatives.bank_sise'\] that this version of vlp_jax does not "
                             "know"):
        resume_config.check_resume(saved_meta, _current_like_it(), 1, 1, "old ckpt")


def test_a_bundle_config_saved_before_the_new_fields_builds_the_same_model():
    old = ml_collections.ConfigDict(saved.complete(_before_schema()))
    assert old.model.patch_pos_emb == "learned" and old.model.query_num_heads is None

    def shapes(config):
        model = build.make_model(config, vocab_size=50)
        return jax.eval_shape(lambda: build.init_params(model, config, jax.random.key(0)))

    assert jax.tree_util.tree_map(lambda s: s.shape, shapes(old)) == jax.tree_util.tree_map(
        lambda s: s.shape, shapes(_current_like_it()))


def test_only_a_bank_of_past_online_keys_is_warned_about(caplog):
    """The drift was measured with bank keys from the online tower's past steps; EMA bank keys
    beside online in-batch keys won the declared bank-vs-base selection: no warning there."""
    from vlp_jax.config.check import validate_config

    def warnings(**neg) -> list[str]:
        caplog.clear()
        validate_config(apply_overrides(base.get_config(), {
            f"negatives.{k}": v for k, v in neg.items()}))
        return [r.getMessage() for r in caplog.records if "makes training drift" in r.getMessage()]

    assert len(warnings(bank_size=2048)) == 1  # momentum 0: past online keys
    assert warnings(bank_size=2048, momentum=0.99) == []  # EMA bank, online in-batch keys
    assert warnings(bank_size=2048, momentum=0.99, momentum_keys=True) == []
    assert warnings(bank_size=2048, bank_item_grad="batch") == []  # the partial fix
