"""The flat item table of a loaded index: every row, label and item id found as the rows of
``items.jsonl`` say, for dense and sparse labels, odd values and repeated ids."""

import json

import numpy as np
import pytest

from vlp_jax.indexing import ann
from vlp_jax.serve.item_table import ItemRow, ItemTable


def _write(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return str(path)


@pytest.mark.parametrize("spread", [3, 100_000])  # gaps: a row-per-label array / a search
def test_every_row_and_lookup_matches_the_jsonl_rows(tmp_path, spread):
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.arange(0, 1000 * spread, spread))[:700]  # unsorted, with gaps
    rows = [{"item_id": f"it-{i}-é", "title": f"title {i} 中文", "image": f"img/{i}.jpg",
             "id": int(label)} for i, label in enumerate(labels)]
    path = _write(tmp_path / "items.jsonl", rows)
    table = ItemTable(path)
    assert len(table) == 700 and not table._dense
    assert (table._row_by_label is None) == (spread > 3)
    assert [r["item_id"] for r in ann.read_rows(str(tmp_path))] == [
        table.item(row).item_id for row in range(len(table))]
    for row, want in enumerate(rows):
        assert table.item(row) == ItemRow(want["item_id"], want["title"], want["image"])
        assert table.row_of_label(want["id"]) == row
        assert table.row_of_item(want["item_id"]) == row
    assert table.row_of_label(-1) is None and table.row_of_label(1) is None  # not a label
    assert table.row_of_label(10**12) is None
    assert table.row_of_item("it-0") is None and table.row_of_item("") is None
    np.testing.assert_array_equal(table.ids, labels)


def test_dense_labels_odd_values_and_repeated_ids(tmp_path):
    rows = [{"item_id": "a", "title": "x", "image": "1.jpg"},  # format 1: id = row
            {"item_id": "b", "title": None, "image": "2.jpg"},  # a null title stays null
            {"item_id": "c", "title": "lone \ud800 surrogate", "image": "3.jpg"},
            {"item_id": "a", "title": "again", "image": "4.jpg"}]
    with open(tmp_path / "items.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)  # ASCII escapes keep the surrogate
    table = ItemTable(str(tmp_path / "items.jsonl"))
    assert table._dense and len(table) == 4
    assert table.item(1).title is None
    assert table.item(2).title == "lone \ud800 surrogate"
    assert table.row_of_item("a") == 3  # the last row with that id, as a dict would keep
    assert [table.row_of_label(x) for x in (0, 3, 4, -1)] == [0, 3, None, None]


def test_an_empty_file_is_an_empty_table(tmp_path):
    table = ItemTable(_write(tmp_path / "items.jsonl", []))
    assert len(table) == 0 and table.row_of_label(0) is None and table.row_of_item("a") is None
