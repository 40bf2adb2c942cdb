"""The Beam dataset build equals the single-process build: same folder, records, vocabulary and
report counts, on the builder tests' catalog of every kind of bad record, read in many small
byte ranges by 2 DirectRunner worker processes."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("apache_beam", reason="Beam is the optional extra: pip install -e '.[beam]'")

from test_builder import KEPT_IDS, S, _item, _line, make_catalog  # noqa: E402

from vlp_jax.data import records  # noqa: E402
from vlp_jax.data.build import beam_pipeline, beam_stages, beam_write, tfds_builder  # noqa: E402
from vlp_jax.data.input import dataset_reader  # noqa: E402

TWO_WORKERS = ("--direct_num_workers=2", "--direct_running_mode=multi_processing")
# The engine whose multi-process mode the options above select, named: "DirectRunner" first
# tries Prism for some pipelines, which fetches a binary over the network on first use.
RUNNER = "FnApiRunner"
TIMING = ("build_seconds", "items_per_sec", "beam")


def _records(handle):
    out = {}
    for split, source in handle.sources.items():
        out[split] = [{k: (v.tobytes() if k == "image" else v) for k, v in r.items()}
                      for r in source]
    return out


def _read_file(path):
    with open(path, "rb") as f:
        return f.read()


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    d = make_catalog(str(tmp_path_factory.mktemp("beam") / "catalog"))
    # The builder catalog's test split is all bad (left out); give it one good pair, and a
    # duplicate id whose first line is text-bad, so the winner is a later line.
    with open(os.path.join(d, "test.jsonl"), "ab") as f:
        f.write(_line({"query": "last", "item_id": "i24"}))
    with open(os.path.join(d, "items.jsonl"), "ab") as f:
        f.write(_item("i12", "second i12 wins"))
    return d


def test_beam_build_equals_single_process_build(catalog, tmp_path):
    single = tfds_builder.build_dataset(catalog, str(tmp_path / "single"), image_size=S,
                                        vocab_size=300)
    beam = beam_pipeline.build_dataset_beam(catalog, str(tmp_path / "beam"), image_size=S,
                                            vocab_size=300, runner=RUNNER,
                                            pipeline_args=TWO_WORKERS, chunk_bytes=256)
    assert not beam.cache_hit
    assert os.path.relpath(beam.dataset_dir, tmp_path / "beam") == os.path.relpath(
        single.dataset_dir, tmp_path / "single")  # same config name: each other's cache hit
    got, want = _records(beam), _records(single)
    assert [r["item_id"] for r in got["items"]] == KEPT_IDS + ["i12"]
    assert got == want
    strip = lambda r: {k: v for k, v in r.items() if k not in TIMING}  # noqa: E731
    assert strip(beam.report) == strip(single.report)
    assert beam.report["splits"]["items"]["skipped"]["duplicate_item_id"] == 1
    assert beam.report["beam"]["item_blocks"] > 4  # really split: 256-byte ranges
    for name in ("tokenizer.json", "vocab.txt"):
        path = os.path.join(beam.tokenizer_dir, name)
        if os.path.exists(path):
            assert _read_file(path) == _read_file(os.path.join(single.tokenizer_dir, name))
    files = os.listdir(beam.dataset_dir)
    assert not [n for n in files if n.startswith(("stage-", beam_write.SHARD_PREFIX))]
    # Written by the workers, one shard per staged block, under TFDS's names.
    item_shards = sorted(n for n in files if n.startswith("vlp_catalog-items.array_record-"))
    assert len(item_shards) == beam.report["beam"]["item_blocks"]
    assert item_shards[-1].endswith(f"-of-{len(item_shards):05d}")
    # Built by Beam, reused by the single-process entry point (what training calls).
    again = tfds_builder.build_dataset(catalog, str(tmp_path / "beam"), image_size=S,
                                       vocab_size=300)
    assert again.cache_hit and again.report == beam.report


def test_byte_ranges_read_every_line_once(tmp_path):
    path = tmp_path / "f.jsonl"
    lines = [b"a" * n + b"\n" for n in (0, 3, 10, 1, 7, 0, 25)] + [b"no newline"]
    path.write_bytes(b"".join(lines))
    for chunk in (1, 2, 5, 8, 64):
        got = [x for rng in beam_stages.byte_ranges(str(path), chunk)
               for x in beam_stages.ReadLines().process(rng)]
        offsets = [sum(map(len, lines[:i])) for i in range(len(lines))]
        assert got == list(zip(offsets, lines, strict=True)), chunk


def test_stats_merge_round_trip():
    st = records.SplitStats(lines=5, kept=2)
    st.skipped.update({"invalid_json": 2, "empty_title": 1})
    st.fixed["tiny_image"] = 1
    rows = [(tuple(json.loads(json.dumps(t.value))[0]), t.value[1])
            for t in beam_stages.stat_rows("items", st)]
    merged = beam_stages.merge_stats(rows + rows, dataset_reader.SPLITS)
    assert merged["items"].as_dict() == {"lines": 10, "kept": 4,
                                         "skipped": {"empty_title": 2, "invalid_json": 4},
                                         "fixed": {"tiny_image": 2}}


def test_finish_shards_refuses_a_unit_written_twice(tmp_path):
    rows = [("items", 3, 1, 10, str(tmp_path / "a")), ("items", 3, 1, 10, str(tmp_path / "b"))]
    with pytest.raises(RuntimeError, match="split 'items': a unit was written twice"):
        beam_write.finish_shards(rows, template_of=None, split_info=None)
