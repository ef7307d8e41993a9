"""Tests of bookjax.data.glyph: records from IDS / Unihan / pypinyin, features, I/O."""
import json

import numpy as np

from bookjax.data import glyph
from bookjax.data.tokenizer import BOS, BYTE_OFFSET, CHAR_OFFSET, CharTokenizer

TEXT = "江湖胡好王行。A😀江湖好"


def _table():
  tok = CharTokenizer.build([TEXT], min_count=1)
  return tok, glyph.build_glyph_table(tok)


def test_records_of_common_characters():
  jiang = glyph.glyph_record("江")
  assert jiang["ids"] == "⿰氵工" and jiang["components"] == ["氵", "工"]
  assert jiang["radical"] == 85 and jiang["residual_strokes"] == 3
  assert jiang["radical_char"] == "水" and jiang["pinyin"] == ["jiāng"]
  hao = glyph.glyph_record("好")
  assert hao["ids"] == "⿰女子" and hao["radical"] == 38 and hao["residual_strokes"] == 3
  assert set(hao["pinyin"]) == {"hǎo", "hào"}
  hu = glyph.glyph_record("湖")
  assert hu["components"] == ["氵", "胡"] and hu["radical"] == 85
  assert glyph.glyph_record("胡")["ids"] == "⿰古月"  # the G-tagged variant
  assert glyph.glyph_record("王")["residual_strokes"] == -1  # 玉 - 1, as in Unihan
  assert "háng" in glyph.glyph_record("行")["pinyin"]


def test_missing_data_is_marked_missing():
  for ch in ("。", "A", "😀", None):
    r = glyph.glyph_record(ch)
    assert r["ids"] is None and r["components"] is None and r["pinyin"] is None
    assert r["radical"] == -1 and r["residual_strokes"] == -1


def test_table_records_align_with_vocab():
  tok, table = _table()
  assert table.vocab_size == tok.vocab_size
  assert table.records[BOS]["char"] is None and table.records[BOS]["radical"] == -1
  assert table.records[BYTE_OFFSET + 65]["ids"] is None
  for i in range(CHAR_OFFSET, tok.vocab_size):
    assert table.records[i]["char"] == tok.id_to_char(i)


def test_feature_arrays():
  tok, table = _table()
  f = table.feature_arrays(max_components=4)
  V = tok.vocab_size
  assert f["component_ids"].shape == (V, 4) and f["component_ids"].dtype == np.int32
  assert f["radical"].shape == (V,) and f["strokes"].shape == (V,)
  jiang, hu, dot = tok.char_to_id("江"), tok.char_to_id("湖"), tok.char_to_id("。")
  assert f["radical"][jiang] == 85 and f["strokes"][jiang] == 4
  assert f["strokes"][tok.char_to_id("王")] == 1  # residual -1 clips to 1, not "unknown"
  # 江 and 湖 share the 氵 component id; the second slot differs
  assert f["component_ids"][jiang, 0] == f["component_ids"][hu, 0] > 0
  assert f["component_ids"][jiang, 1] != f["component_ids"][hu, 1]
  assert (f["component_ids"][jiang, 2:] == 0).all()
  assert (f["component_ids"][dot] == 0).all() and f["radical"][dot] == 0 and f["strokes"][dot] == 0
  assert (f["component_ids"][:CHAR_OFFSET] == 0).all() and (f["radical"][:CHAR_OFFSET] == 0).all()
  assert f["num_components"] == f["component_ids"].max() + 1 == len(table.component_vocab()) + 1
  assert f["radical"].max() <= 214 and f["strokes"].max() <= 31


def test_save_load_plain_files(tmp_path):
  tok, table = _table()
  table.save(str(tmp_path))
  json.loads((tmp_path / "glyph.json").read_text())
  with np.load(tmp_path / "glyph.npz", allow_pickle=False) as z:
    np.testing.assert_array_equal(z["component_ids"], table.feature_arrays()["component_ids"])
  back = glyph.GlyphTable.load(str(tmp_path))
  assert back.records == table.records
