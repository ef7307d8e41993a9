"""grain input pipeline: mixture sampling, packing, batches with structure labels.

Every document is encoded once as [BOS] + tokens + [EOS] (cached per
tokenizer and document list). Rows of seq_len + 1 tokens are filled greedily:

  * a document that fits in the rest of the row is placed whole;
  * one that does not is split at the row end, unless fewer than
    max(2, (seq_len + 1) // 8) slots remain, in which case the row is padded
    and the document starts the next row (so short tails are not wasted on
    tiny fragments, and padding is at most 1/8 of a row);
  * the continuation chunk of a split document repeats the last token of the
    previous chunk as its first (input-only) token, so every token after BOS is
    a target exactly once: per-token losses over a pass add up to the
    document's log-likelihood;
  * every chunk is its own segment: `positions` and `sentence_ids` restart at
    0 in a continuation chunk (attention never crosses segments, so nothing
    needs absolute offsets beyond the row).

Batch format (all [batch_size, seq_len]; row r of the packed tokens gives
inputs = row[:-1], targets = row[1:]):
  inputs        int32    token ids
  targets       int32    next token ids
  weights       float32  1 where the target is a real token of the input's
                         segment (0 for padding and across segments)
  segment_ids   int32    1, 2, ... per packed segment; 0 = padding
  positions     int32    position inside the segment, from 0
  sentence_ids  int32    sentence index inside the segment: increments after
                         each run of 。！？；… (and !?;) or a line break (SEP),
                         with closing quotes/brackets kept in the sentence
  domain        int32    index into corpus.DOMAINS; -1 = padding
  chars         float32  characters the target stands for (bits/char
                         denominators): char_count_weights()[targets] * weights

Training documents are drawn with replacement: a domain with probability
proportional to mixture[domain] / (mean tokens per document of the domain),
then a document uniformly inside it, so `mixture` sets the expected fraction
of *tokens* per domain (weight 0 excludes the domain). Draw i depends only on
(seed, i), and the iterator state is (draw index, pending split document): a
resumed iterator yields exactly the batches of an uninterrupted one.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import sys
from typing import Iterator, Sequence

import grain
import numpy as np

from bookjax.data import corpus as corpus_lib
from bookjax.data import tokenizer as tok_lib

TERMINATORS = "。！？；…!?;"
CLOSERS = "”’」』）)》〉】\"'"
_SAMPLE_BLOCK = 4096
_NO_THREADS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)

# ----------------------------------------------------------------------------
# Sentence ids
# ----------------------------------------------------------------------------


def token_classes(tokenizer: tok_lib.CharTokenizer) -> np.ndarray:
  """Per id: 0 other, 1 sentence terminator (incl. SEP), 2 closer (incl. EOS): [V] int8.

  EOS counts as a closer so that it stays in the document's last sentence.
  """
  cls = np.zeros(tokenizer.vocab_size, np.int8)
  for chars, value in ((CLOSERS, 2), (TERMINATORS, 1)):
    for ch in chars:
      i = tokenizer.char_to_id(ch)
      if i is not None:
        cls[i] = value
  cls[tok_lib.SEP] = 1
  cls[tok_lib.EOS] = 2
  return cls


def _sentence_ids_from_classes(c: np.ndarray) -> np.ndarray:
  """Sentence index per token from token classes [T] -> [T] int32.

  A boundary follows the last token of a run of terminators/closers that
  contains at least one terminator; the id counts boundaries before a token.
  """
  n = len(c)
  if n == 0:
    return np.zeros(0, np.int32)
  is_term, is_cont = c == 1, c >= 1
  run_end = is_cont & ~np.append(is_cont[1:], False)
  term_cum = np.cumsum(is_term)
  last_other = np.maximum.accumulate(np.where(~is_cont, np.arange(n), -1))
  before = np.where(last_other >= 0, term_cum[np.maximum(last_other, 0)], 0)
  boundary = run_end & (term_cum - before > 0)
  sid = np.zeros(n, np.int64)
  sid[1:] = np.cumsum(boundary)[:-1]
  return sid.astype(np.int32)


def sentence_ids_for(ids: Sequence[int], tokenizer: tok_lib.CharTokenizer) -> np.ndarray:
  """Sentence ids of one token sequence treated as one document: [len(ids)] int32."""
  ids = np.asarray(ids, np.int64)
  return _sentence_ids_from_classes(_classes_cached(tokenizer)[ids])


_CLASS_CACHE: dict[int, tuple[tok_lib.CharTokenizer, np.ndarray]] = {}


def _classes_cached(tokenizer: tok_lib.CharTokenizer) -> np.ndarray:
  hit = _CLASS_CACHE.get(id(tokenizer))
  if hit is None or hit[0] is not tokenizer:
    hit = (tokenizer, token_classes(tokenizer))
    _CLASS_CACHE[id(tokenizer)] = hit
  return hit[1]


# ----------------------------------------------------------------------------
# Encoded documents
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EncodedDocs:
  """All documents as one flat token array.

  tokens        [T] int32  every document as [BOS] + ids + [EOS], concatenated
  sentence_ids  [T] int32  sentence index inside the token's document
  offsets       [N+1] int64  document i is tokens[offsets[i]:offsets[i+1]]
  domains       [N] int32  index into corpus.DOMAINS
  """
  tokens: np.ndarray
  sentence_ids: np.ndarray
  offsets: np.ndarray
  domains: np.ndarray

  @property
  def num_docs(self) -> int:
    return len(self.domains)

  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)


_ENCODE_CACHE: "collections.OrderedDict[tuple, EncodedDocs]" = collections.OrderedDict()


def _docs_key(docs, tokenizer) -> tuple:
  h = hashlib.sha1()
  for d in docs:
    h.update(d.doc_id.encode("utf-8", "surrogatepass"))
    h.update(b"\0%d\0" % len(d.text))
  return tokenizer.fingerprint(), h.hexdigest()


def encode_documents(docs, tokenizer: tok_lib.CharTokenizer) -> EncodedDocs:
  """Encodes `docs` (cached in-process by tokenizer and doc ids/lengths)."""
  key = _docs_key(docs, tokenizer)
  if key in _ENCODE_CACHE:
    _ENCODE_CACHE.move_to_end(key)
    return _ENCODE_CACHE[key]
  dom_index = {name: i for i, name in enumerate(corpus_lib.DOMAINS)}
  parts, lengths = [], []
  bos, eos = np.array([tok_lib.BOS], np.int32), np.array([tok_lib.EOS], np.int32)
  for d in docs:
    ids = tokenizer.encode_array(d.text)
    parts += [bos, ids, eos]
    lengths.append(len(ids) + 2)
  tokens = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  offsets = np.zeros(len(lengths) + 1, np.int64)
  offsets[1:] = np.cumsum(lengths)
  # BOS is class 'other' and EOS a closer, so runs never span two documents
  # and per-document ids are the flat ids minus the id at the document start.
  sid = _sentence_ids_from_classes(_classes_cached(tokenizer)[tokens])
  if len(lengths):
    sid = sid - np.repeat(sid[offsets[:-1]], lengths)
  enc = EncodedDocs(tokens, sid.astype(np.int32), offsets,
                    np.array([dom_index.get(d.domain, -1) for d in docs], np.int32))
  _ENCODE_CACHE[key] = enc
  while len(_ENCODE_CACHE) > 4:
    _ENCODE_CACHE.popitem(last=False)
  return enc


# ----------------------------------------------------------------------------
# Mixture sampling
# ----------------------------------------------------------------------------


def natural_mixture(docs) -> dict[str, float]:
  """Each domain's share of characters in `docs` (a mixture that changes nothing)."""
  count = collections.Counter()
  for d in docs:
    count[d.domain] += len(d.text)
  total = sum(count.values()) or 1
  return {name: count[name] / total for name in corpus_lib.DOMAINS}


def domain_probabilities(enc: EncodedDocs, mixture: dict[str, float]) -> np.ndarray:
  """Per-draw domain probabilities that give `mixture` as token fractions: [D]."""
  unknown = set(mixture) - set(corpus_lib.DOMAINS)
  if unknown:
    raise ValueError(f"unknown mixture domains {sorted(unknown)}; known {corpus_lib.DOMAINS}")
  w = np.array([float(mixture.get(name, 0.0)) for name in corpus_lib.DOMAINS])
  if (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"mixture weights must be >= 0 with a positive sum, got {mixture}")
  lengths = enc.lengths()
  p = np.zeros(len(w))
  for d, name in enumerate(corpus_lib.DOMAINS):
    if w[d] == 0:
      continue
    mine = lengths[enc.domains == d]
    if not len(mine):
      raise ValueError(f"mixture gives domain {name!r} weight {w[d]} but it has no documents")
    p[d] = w[d] / mine.mean()
  return p / p.sum()


class MixtureSampler:
  """Draw i -> document index; a pure function of (seed, i).

  Draws are made in blocks of _SAMPLE_BLOCK from a generator seeded by
  (seed, block), so random access costs one block and resuming needs no state.
  """

  def __init__(self, enc: EncodedDocs, mixture: dict[str, float], seed: int):
    self.probs = domain_probabilities(enc, mixture)
    # Only domains with positive probability get a cdf interval, so a weight-0
    # domain can never be drawn, not even through float rounding.
    self.active = np.flatnonzero(self.probs > 0)
    self.cdf = np.cumsum(self.probs[self.active])
    self.cdf[-1] = 1.0
    self.by_domain = np.argsort(enc.domains, kind="stable")  # doc ids grouped by domain
    counts = np.bincount(enc.domains, minlength=len(self.probs))
    self.counts = counts
    self.starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    self.seed = int(seed)
    self._cache: tuple[int, np.ndarray] = (-1, np.zeros(0, np.int64))

  def block(self, b: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([self.seed, b]))
    u, v = rng.random(_SAMPLE_BLOCK), rng.random(_SAMPLE_BLOCK)
    dom = self.active[np.minimum(np.searchsorted(self.cdf, u, side="right"),
                                 len(self.active) - 1)]
    within = np.minimum((v * self.counts[dom]).astype(np.int64), self.counts[dom] - 1)
    return self.by_domain[self.starts[dom] + within]

  def __call__(self, i: int) -> int:
    b, r = divmod(int(i), _SAMPLE_BLOCK)
    cached = self._cache  # one atomic read: safe if grain ever calls from threads
    if cached[0] != b:
      cached = (b, self.block(b))
      self._cache = cached
    return int(cached[1][r])


# ----------------------------------------------------------------------------
# Packing (a grain IterDataset transformation)
# ----------------------------------------------------------------------------


def min_split(row_len: int) -> int:
  """Fewest free slots worth starting a split document in."""
  return max(2, row_len // 8)


class _PackIterator(grain.DatasetIterator):
  """Parent yields document indices; this yields packed rows of row_len tokens.

  State: the parent's state plus the pending split document (index, offset of
  the next chunk's first token), so rows resume exactly.
  """

  def __init__(self, parent, enc: EncodedDocs, row_len: int):
    super().__init__(parent)
    self._enc, self._row_len = enc, row_len
    self._doc, self._pos = -1, 0

  def __next__(self) -> dict[str, np.ndarray]:
    R, enc = self._row_len, self._enc
    row = dict(tokens=np.zeros(R, np.int32), segment_ids=np.zeros(R, np.int32),
               positions=np.zeros(R, np.int32), sentence_ids=np.zeros(R, np.int32),
               domain=np.full(R, -1, np.int32))
    fill, seg = 0, 0
    while fill < R:
      if self._doc < 0:
        try:
          self._doc, self._pos = int(next(self._parent)), 0
        except StopIteration:
          if fill == 0:
            raise
          break
      start = int(enc.offsets[self._doc]) + self._pos
      left, space = int(enc.offsets[self._doc + 1]) - start, R - fill
      if left <= space:
        take, done = left, True
      elif fill > 0 and space < min_split(R):
        break  # pad: the document starts the next row
      else:
        take, done = space, False
      seg += 1
      sl = slice(fill, fill + take)
      row["tokens"][sl] = enc.tokens[start:start + take]
      row["segment_ids"][sl] = seg
      row["positions"][sl] = np.arange(take)
      sid = enc.sentence_ids[start:start + take]
      row["sentence_ids"][sl] = sid - sid[0]
      row["domain"][sl] = enc.domains[self._doc]
      fill += take
      if done:
        self._doc, self._pos = -1, 0
      else:
        self._pos += take - 1  # overlap: the last token starts the next chunk
    return row

  def get_state(self) -> dict:
    return dict(parent=self._parent.get_state(), doc=int(self._doc), pos=int(self._pos))

  def set_state(self, state: dict) -> None:
    self._parent.set_state(state["parent"])
    self._doc, self._pos = int(state["doc"]), int(state["pos"])


class PackIterDataset(grain.IterDataset):
  """Packs a dataset of document indices into rows of `row_len` tokens."""

  def __init__(self, parent: grain.IterDataset, enc: EncodedDocs, row_len: int):
    super().__init__(parent)
    if row_len < 2:
      raise ValueError(f"row_len must be >= 2, got {row_len}")
    self._enc, self._row_len = enc, row_len

  def __iter__(self) -> _PackIterator:
    return _PackIterator(self._parent.__iter__(), self._enc, self._row_len)

  def __str__(self) -> str:
    return f"PackIterDataset(row_len={self._row_len})"


# ----------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------


def rows_to_batch(rows: dict[str, np.ndarray], char_weights: np.ndarray) -> dict[str, np.ndarray]:
  """Packed rows [B, seq_len + 1] -> the model batch [B, seq_len] (module docstring)."""
  tok, seg = rows["tokens"], rows["segment_ids"]
  inputs, targets = tok[:, :-1], tok[:, 1:]
  weights = ((seg[:, :-1] == seg[:, 1:]) & (seg[:, :-1] > 0)).astype(np.float32)
  return dict(
      inputs=np.ascontiguousarray(inputs, np.int32),
      targets=np.ascontiguousarray(targets, np.int32),
      weights=weights,
      segment_ids=np.ascontiguousarray(seg[:, :-1], np.int32),
      positions=np.ascontiguousarray(rows["positions"][:, :-1], np.int32),
      sentence_ids=np.ascontiguousarray(rows["sentence_ids"][:, :-1], np.int32),
      domain=np.ascontiguousarray(rows["domain"][:, :-1], np.int32),
      chars=(char_weights[targets] * weights).astype(np.float32),
  )


def _batched(ds: grain.IterDataset, batch_size: int, char_weights: np.ndarray,
             drop_remainder: bool) -> grain.IterDataset:
  return ds.batch(batch_size, drop_remainder=drop_remainder).map(
      lambda rows: rows_to_batch(rows, char_weights))


def make_train_iterator(docs, tokenizer: tok_lib.CharTokenizer, *, seq_len: int,
                        batch_size: int, mixture: dict[str, float], seed: int):
  """Infinite, deterministic, checkpointable iterator of training batches.

  The result is a grain DatasetIterator: `get_state()` returns a JSON-
  serialisable dict and `set_state(state)` restores it exactly.
  """
  enc = encode_documents(docs, tokenizer)
  sampler = MixtureSampler(enc, mixture, seed)
  draws = grain.MapDataset.range(sys.maxsize).map(sampler).to_iter_dataset(_NO_THREADS)
  rows = PackIterDataset(draws, enc, seq_len + 1)
  return iter(_batched(rows, batch_size, tokenizer.char_count_weights(), True))


def eval_order(docs) -> list:
  """Documents in sha1(doc_id) order: any prefix of an eval pass mixes domains."""
  return sorted(docs, key=lambda d: hashlib.sha1(d.doc_id.encode("utf-8")).digest())


def iter_eval_batches(docs, tokenizer: tok_lib.CharTokenizer, *, seq_len: int,
                      batch_size: int, max_batches: int | None = None) -> Iterator[dict]:
  """One deterministic pass over `docs` (every document once, eval_order).

  The last batch is padded with empty rows (weights 0, domain -1) to
  batch_size, so all batches have the same shape.
  """
  docs = eval_order(docs)
  if not docs or (max_batches is not None and max_batches <= 0):
    return
  enc = encode_documents(docs, tokenizer)
  order = grain.MapDataset.range(enc.num_docs).to_iter_dataset(_NO_THREADS)
  rows = PackIterDataset(order, enc, seq_len + 1)
  cw = tokenizer.char_count_weights()
  for n, batch in enumerate(_batched(rows, batch_size, cw, False)):
    if max_batches is not None and n >= max_batches:
      return
    yield _pad_batch(batch, batch_size)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  short = batch_size - batch["inputs"].shape[0]
  if short <= 0:
    return batch
  out = {}
  for k, v in batch.items():
    fill = -1 if k == "domain" else 0
    out[k] = np.concatenate([v, np.full((short,) + v.shape[1:], fill, v.dtype)])
  return out


def make_eval_batches(docs, tokenizer: tok_lib.CharTokenizer, *, seq_len: int,
                      batch_size: int, max_batches: int | None = None) -> list[dict]:
  """`iter_eval_batches` as a list (reusable across evaluations)."""
  return list(iter_eval_batches(docs, tokenizer, seq_len=seq_len, batch_size=batch_size,
                                max_batches=max_batches))
