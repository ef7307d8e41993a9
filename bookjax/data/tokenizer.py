"""Character-level tokenizer with UTF-8 byte fallback.

Id layout (vocab_size = 4 + 256 + number of characters):
  0 PAD, 1 BOS, 2 EOS, 3 SEP      specials; '\\n' encodes to SEP (line / sentence
                                  boundary) and SEP decodes back to '\\n'
  4 .. 259                        byte tokens: byte b has id 4 + b
  260 ..                          characters, by count desc then code point

A character outside the vocabulary encodes to the ids of its UTF-8 bytes, so
every string round-trips exactly: decode(encode(s)) == s.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Iterable, Sequence

import numpy as np

PAD, BOS, EOS, SEP = 0, 1, 2, 3
NUM_SPECIAL = 4
NUM_BYTES = 256
BYTE_OFFSET = NUM_SPECIAL
CHAR_OFFSET = NUM_SPECIAL + NUM_BYTES
_UNICODE_SIZE = 0x110000


class CharTokenizer:
  """Characters (+ '\\n' as SEP) with byte fallback; see the module docstring."""

  PAD, BOS, EOS, SEP = PAD, BOS, EOS, SEP
  NUM_SPECIAL, NUM_BYTES, BYTE_OFFSET, CHAR_OFFSET = (
      NUM_SPECIAL, NUM_BYTES, BYTE_OFFSET, CHAR_OFFSET)

  def __init__(self, chars: Sequence[str], counts: Sequence[int] | None = None,
               min_count: int = 0):
    if any(len(c) != 1 or c == "\n" for c in chars):
      raise ValueError("vocabulary entries must be single characters other than '\\n'")
    if len(set(chars)) != len(chars):
      raise ValueError("duplicate characters in vocabulary")
    self.chars = list(chars)
    self.counts = list(counts) if counts is not None else [0] * len(chars)
    self.min_count = min_count
    self._char_to_id = {c: CHAR_OFFSET + i for i, c in enumerate(self.chars)}
    self._char_to_id["\n"] = SEP
    self._table = None  # code point -> id lookup, built on first encode_array

  # -- construction ---------------------------------------------------------

  @classmethod
  def build(cls, texts: Iterable[str], min_count: int = 2) -> "CharTokenizer":
    """Vocabulary of characters seen >= min_count times; '\\n' is SEP, not a char."""
    counter: collections.Counter = collections.Counter()
    for t in texts:
      counter.update(t)
    counter.pop("\n", None)
    kept = sorted(((c, n) for c, n in counter.items() if n >= min_count),
                  key=lambda cn: (-cn[1], ord(cn[0])))
    return cls([c for c, _ in kept], [n for _, n in kept], min_count)

  @property
  def vocab_size(self) -> int:
    return CHAR_OFFSET + len(self.chars)

  def __len__(self) -> int:
    return self.vocab_size

  def fingerprint(self) -> str:
    """A short hash of the vocabulary (cache keys, checkpoints)."""
    import hashlib
    return hashlib.sha1("".join(self.chars).encode("utf-8", "surrogatepass")).hexdigest()[:16]

  # -- encode / decode --------------------------------------------------------

  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no BOS/EOS added): [len(text) + bytes of unseen chars]."""
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    """Like `encode`, as an int32 array; vectorised over code points."""
    try:
      cp = np.frombuffer(text.encode("utf-32-le"), "<u4")
    except UnicodeEncodeError:  # lone surrogates: take the slow exact path
      return np.asarray(self._encode_slow(text), np.int32)
    ids = self._lookup()[cp]
    if not (ids < 0).any():
      return ids
    return np.asarray(self._encode_slow(text), np.int32)

  def _encode_slow(self, text: str) -> list[int]:
    out: list[int] = []
    get = self._char_to_id.get
    for ch in text:
      i = get(ch)
      if i is None:
        out.extend(BYTE_OFFSET + b for b in ch.encode("utf-8", "surrogatepass"))
      else:
        out.append(i)
    return out

  def _lookup(self) -> np.ndarray:
    if self._table is None:
      table = np.full(_UNICODE_SIZE, -1, np.int32)
      for ch, i in self._char_to_id.items():
        table[ord(ch)] = i
      self._table = table
    return self._table

  def decode(self, ids: Iterable[int]) -> str:
    """Inverse of `encode`. PAD/BOS/EOS are skipped; SEP -> '\\n'.

    Runs of byte tokens are decoded as UTF-8 ('surrogatepass', so lone
    surrogates round-trip); invalid byte runs (possible in model samples)
    decode with U+FFFD replacement.
    """
    out: list[str] = []
    buf = bytearray()
    chars, n_chars = self.chars, len(self.chars)
    for i in ids:
      i = int(i)
      if BYTE_OFFSET <= i < CHAR_OFFSET:
        buf.append(i - BYTE_OFFSET)
        continue
      if buf:
        out.append(_decode_bytes(buf))
        buf = bytearray()
      if i >= CHAR_OFFSET and i - CHAR_OFFSET < n_chars:
        out.append(chars[i - CHAR_OFFSET])
      elif i == SEP:
        out.append("\n")
    if buf:
      out.append(_decode_bytes(buf))
    return "".join(out)

  def id_to_char(self, i: int) -> str | None:
    """The character of a character id ('\\n' for SEP); None for specials/bytes."""
    if i == SEP:
      return "\n"
    if CHAR_OFFSET <= i < self.vocab_size:
      return self.chars[i - CHAR_OFFSET]
    return None

  def char_to_id(self, ch: str) -> int | None:
    return self._char_to_id.get(ch)

  # -- bits per character -------------------------------------------------------

  def char_count_weights(self) -> np.ndarray:
    """Characters each token represents: [vocab_size] float32.

    1 for character tokens and SEP ('\\n' is a character), 0 for PAD/BOS/EOS;
    byte tokens count 1 on UTF-8 lead bytes (0x00-0x7F, 0xC0-0xFF) and 0 on
    continuation bytes (0x80-0xBF). So the sum over encode(s) is len(s).
    """
    w = np.ones(self.vocab_size, np.float32)
    w[[PAD, BOS, EOS]] = 0.0
    w[BYTE_OFFSET + 0x80:BYTE_OFFSET + 0xC0] = 0.0
    return w

  # -- persistence --------------------------------------------------------------

  def save(self, dirpath: str) -> str:
    """Writes `dirpath/vocab.json`; returns its path."""
    os.makedirs(dirpath, exist_ok=True)
    path = os.path.join(dirpath, "vocab.json")
    blob = dict(format="bookjax.CharTokenizer", version=1,
                specials=dict(PAD=PAD, BOS=BOS, EOS=EOS, SEP=SEP),
                num_bytes=NUM_BYTES, char_offset=CHAR_OFFSET, min_count=self.min_count,
                chars=self.chars, counts=self.counts)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      json.dump(blob, f, ensure_ascii=True)  # ASCII escapes: surrogates survive
    os.replace(tmp, path)
    return path

  @classmethod
  def load(cls, dirpath: str) -> "CharTokenizer":
    with open(os.path.join(dirpath, "vocab.json"), encoding="utf-8") as f:
      blob = json.load(f)
    if blob.get("char_offset") != CHAR_OFFSET:
      raise ValueError(f"incompatible vocab.json in {dirpath}: {blob.get('char_offset')}")
    return cls(blob["chars"], blob.get("counts"), blob.get("min_count", 0))


def _decode_bytes(buf: bytes) -> str:
  try:
    return buf.decode("utf-8", "surrogatepass")
  except UnicodeDecodeError:
    return buf.decode("utf-8", "replace")
