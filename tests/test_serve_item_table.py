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


@pytest.mark.parametrize("other", [7, -5, 10**12])  # row-per-label array / sorted search
def test_a_repeated_label_names_its_last_row_on_every_lookup_path(tmp_path, other):
    rows = [{"item_id": x, "title": x, "image": x, "id": i}
            for x, i in [("a", 0), ("b", 2), ("c", 2), ("d", other)]]
    table = ItemTable(_write(tmp_path / "items.jsonl", rows))
    assert table.row_of_label(2) == 2 and table.row_of_label(other) == 3


def test_an_empty_file_is_an_empty_table(tmp_path):
    table = ItemTable(_write(tmp_path / "items.jsonl", []))
    assert len(table) == 0 and table.row_of_label(0) is None and table.row_of_item("a") is None


def test_odd_rows_give_answers_and_no_image_rather_than_errors(tmp_path):
    """A hand-edited row with a number for its id or a null image: the answers that contain
    it are still built (answer.py's promise) and its image route finds no file."""
    from vlp_jax.serve import answer, policy
    from vlp_jax.serve.search_index import SearchIndex

    table = ItemTable(_write(tmp_path / "items.jsonl", [
        {"item_id": 12345, "title": "t", "image": None}]))
    class Index:  # a SearchIndex's answer-facing side over the table (weak-referenceable)
        kind, version = "flat", 1
        shown = SearchIndex.shown

        def item(self, label):
            return table.item(table.row_of_label(label))

    fake = Index()
    body = answer.encode("q", 1, 1.0, fake, np.ones(1, np.float32), np.zeros(1, np.int64))
    assert json.loads(body.body)["results"][0] == {
        "item_id": 12345, "score": 1.0, "title": "t", "image_url": "/items/12345/image"}
    assert policy.image_path(str(tmp_path), table.item(0).image) is None
