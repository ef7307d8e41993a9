"""The data-cleaning pipeline: normalise, strip markup, filter, deduplicate.

`clean_documents(docs)` runs every step below on a list of documents (anything
with `doc_id`, `domain` and `text` fields that `dataclasses.replace` accepts) and
returns the surviving documents plus a `CleaningReport` that counts, per domain
and per step, what the step removed or changed. Steps, in order:

  source_malformed_docs  source records that are not text (loader-side count).
  markup_chars        characters of source markup removed: POS tags of the
                      People's Daily text, CHAT transcription codes (timing
                      bullets, pauses, truncation marks) and segmentation spaces
                      of the Cantonese sources, HTML tags/entities.
  normalized_docs     documents changed by Unicode normalisation (NFKC with CJK
                      punctuation preserved, see `normalize_text`).
  whitespace_chars    characters removed by whitespace / control-char cleanup.
  empty_lines         lines dropped because they were empty.
  duplicate_lines     lines dropped because they repeat an earlier line of the
                      same document (only lines of >= MIN_DUP_LINE_CHARS chars:
                      short repeated lines, e.g. "係啊。" in a dialogue, are real).
  short_docs          documents with fewer than MIN_DOC_CHARS non-space chars.
  low_cjk_docs        documents with Han / (Han + non-Han letter runs) < MIN_CJK_RATIO.
  repetitive_docs     documents dominated by one character or by repeated text.
  exact_duplicate_docs  documents whose cleaned text equals an earlier one.
  near_duplicate_docs   documents whose character 5-gram Jaccard similarity to an
                      earlier one is >= NEAR_DUP_JACCARD (MinHash LSH candidates,
                      verified exactly).

The first document (in input order) of any duplicate group is kept, so the
result is deterministic given the input order. Duplicates are looked for within
a domain only.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import html
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

MIN_DUP_LINE_CHARS = 10
MIN_DOC_CHARS = 2
MIN_CJK_RATIO = 0.5          # Han chars / (Han chars + non-Han letter runs)
MAX_TOP_CHAR_FRACTION = 0.5  # applied to docs of >= 8 chars
MAX_DUP_NGRAM_FRACTION = 0.5  # of 10-gram positions that repeat; docs >= 50 chars
NEAR_DUP_JACCARD = 0.8
NEAR_DUP_MIN_CHARS = 30      # shorter docs are only checked for exact duplicates
SHINGLE = 5
NUM_BANDS, BAND_ROWS = 8, 4  # 32 MinHash values; LSH threshold ~ (1/8)^(1/4) = 0.59

STEPS = (
    "source_malformed_docs", "input_docs", "input_chars", "markup_chars", "normalized_docs",
    "whitespace_chars", "empty_lines", "duplicate_lines", "short_docs",
    "low_cjk_docs", "repetitive_docs", "exact_duplicate_docs",
    "near_duplicate_docs", "output_docs", "output_chars",
)

# ----------------------------------------------------------------------------
# Character classes
# ----------------------------------------------------------------------------

HAN = ("\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
       "\U00020000-\U0002ffff\U00030000-\U0003134f")
# CJK punctuation and symbols: CJK Symbols and Punctuation, full-width forms,
# general punctuation used in Chinese typesetting (— … “ ” ‘ ’ ·).
CJK_PUNCT = "\u3000-\u303f\uff00-\uffef\u2014\u2026\u2018\u2019\u201c\u201d\u00b7"
_HAN_RE = re.compile(f"[{HAN}]")
_CJK_ANY = f"{HAN}{CJK_PUNCT}"


def is_han(ch: str) -> bool:
  """True for a CJK unified (or compatibility) ideograph."""
  return bool(_HAN_RE.match(ch))


# ----------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------


class CleaningReport(dict):
  """Counts keyed by (domain, step); a plain dict with a few helpers.

  Units depend on the step name: *_docs count documents, *_lines lines,
  *_chars characters (see the module docstring).
  """

  def add(self, domain: str, step: str, n: int = 1) -> None:
    if n:
      self[(domain, step)] = self.get((domain, step), 0) + int(n)

  def domains(self, order: Sequence[str] = ()) -> list[str]:
    """Domains present, those named in `order` first (in that order)."""
    present = dict.fromkeys(d for d, _ in self)
    return [d for d in order if d in present] + [d for d in present if d not in order]

  def steps(self) -> list[str]:
    seen = dict.fromkeys(s for _, s in self)
    return [s for s in STEPS if s in seen] + [s for s in seen if s not in STEPS]

  def nested(self) -> dict[str, dict[str, int]]:
    """{domain: {step: count}}: JSON-friendly."""
    out: dict[str, dict[str, int]] = {}
    for (d, s), n in self.items():
      out.setdefault(d, {})[s] = n
    return out

  @classmethod
  def from_nested(cls, nested: dict[str, dict[str, int]]) -> "CleaningReport":
    rep = cls()
    for d, steps in nested.items():
      for s, n in steps.items():
        rep[(d, s)] = int(n)
    return rep

  def merge(self, other: "CleaningReport") -> None:
    for (d, s), n in other.items():
      self.add(d, s, n)

  def format(self, order: Sequence[str] = ()) -> str:
    """A text table: one row per step, one column per domain."""
    doms = self.domains(order)
    w = max([len(s) for s in self.steps()] + [4])
    lines = [f"{'step':<{w}} " + " ".join(f"{d:>10}" for d in doms)]
    for s in self.steps():
      lines.append(f"{s:<{w}} " + " ".join(f"{self.get((d, s), 0):>10}" for d in doms))
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# Markup stripping (source specific)
# ----------------------------------------------------------------------------

# People's Daily: "迈向/v  充满/v" and bracketed compounds "[中国/ns 银行/n]/nt".
_POS_TAG = re.compile(r"\[?([^\s/\[\]]+(?:/[^\s/\[\]]+)*?)/[A-Za-z]+\]?(?:/[A-Za-z]+)?")


_LATIN_EDGE = re.compile(r"[A-Za-z\uff21-\uff3a\uff41-\uff5a]")


def strip_pos_tags(text: str) -> str:
  """'迈向/v  充满/v' -> '迈向充满': drops tags and word-separating spaces.

  Two adjacent Latin words ('Ｊｉｍ/nx  Ｂａｉｌｅｙ/nx') keep one space.
  """
  out = []
  for line in text.split("\n"):
    words = [m.group(1) for m in _POS_TAG.finditer(line)]
    parts = []
    for i, w in enumerate(words):
      if i and _LATIN_EDGE.match(w[0]) and _LATIN_EDGE.match(words[i - 1][-1]):
        parts.append(" ")
      parts.append(w)
    out.append("".join(parts))
  return "\n".join(out)


# CHAT main-tier codes (HKCanCor, CantoMap): timing bullets, pause '#',
# truncation '-', '+...' style terminators, '&' fragments, bracketed codes.
_CHAT_TIMING = re.compile(r"\x15\d+_\d+\x15")
_CHAT_CODES = re.compile(r"\[[^\]]*\]|<|>|(?<!\S)(?:#|-|\+\S*|&\S*|xxx|yyy|www)(?!\S)")
# CHAT writes utterance punctuation as space-separated ASCII tokens; written
# Chinese uses the full-width forms, so convert only these standalone tokens.
_CHAT_PUNCT = {".": "。", ",": "，", "?": "？", "!": "！", "...": "…"}
_CHAT_PUNCT_RE = re.compile(r"(?<!\S)(\.\.\.|[.,?!])(?!\S)")


def strip_chat(text: str) -> str:
  """One CHAT utterance per line -> plain Cantonese text, one per line."""
  out = []
  for line in text.split("\n"):
    line = _CHAT_TIMING.sub(" ", line)
    line = _CHAT_CODES.sub(" ", line)
    line = _CHAT_PUNCT_RE.sub(lambda m: _CHAT_PUNCT[m.group(1)], line)
    line = line.replace("_", " ")  # 'New_Zealand' compounds
    out.append(join_segmented(line))
  return "\n".join(out)


_SEG_SPACE = re.compile(f"(?<=[{_CJK_ANY}])[ \t]+|[ \t]+(?=[{_CJK_ANY}])")


def join_segmented(text: str) -> str:
  """Removes word-segmentation spaces next to CJK characters or punctuation.

  'B 站 之前 ， 好' -> 'B站之前，好'; spaces between two Latin words stay.
  """
  return _SEG_SPACE.sub("", text)


# Only real (ASCII-named) HTML tags: Chinese reviews write book titles as
# <书名>, which must survive.
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")


def strip_html(text: str) -> str:
  """Drops HTML tags and decodes entities (&#183; -> ·, &nbsp; -> nbsp)."""
  if "<" in text:
    text = _HTML_TAG.sub("", text)
  if "&" in text:
    text = html.unescape(text)
  return text


def source_of(doc_id: str) -> str:
  """'cantonese/hkcancor/FC-001#002' -> 'hkcancor'."""
  parts = doc_id.split("/")
  return parts[1] if len(parts) > 2 else ""


_SOURCE_MARKUP = {
    "pd199801": strip_pos_tags,
    "hkcancor": strip_chat,
    "cantomap": strip_chat,
    "ctcpc": join_segmented,
    "commonvoice": join_segmented,
}


def strip_markup(text: str, source: str) -> str:
  """Source-specific markup stripping, then HTML stripping for every source."""
  fn = _SOURCE_MARKUP.get(source)
  if fn is not None:
    text = fn(text)
  return strip_html(text)


# ----------------------------------------------------------------------------
# Unicode normalisation
# ----------------------------------------------------------------------------

# NFKC folds full-width ASCII forms (Ａ１％ -> A1%) and compatibility characters,
# but it would also turn the CJK clause punctuation ，！？：；（） into ASCII and
# … into '...'. Chinese text uses the full-width forms, so we deliberately keep
# them: NFKC everywhere *except* these characters.
PRESERVE = "！（），：；？…‥"
# Presentation forms whose NFKC is not what Chinese text means (︰ -> '..').
_PRE_MAP = str.maketrans({"︰": "：", "﹕": "：", "︙": "…"})
# Placeholders in Supplementary Private Use Area-B: NFKC leaves them alone.
_PLACEHOLDERS = "".join(chr(0x10FF00 + i) for i in range(len(PRESERVE)))
_PROTECT = str.maketrans(PRESERVE, _PLACEHOLDERS)
_RESTORE = str.maketrans(_PLACEHOLDERS, PRESERVE)


# Characters NFKC leaves alone whatever their neighbours are (ASCII, unified
# Han ideographs, the preserved punctuation, common CJK punctuation): a text made
# only of these skips the (slow) NFKC pass. Anything else takes the full path.
_NFKC_SAFE = re.compile(
    "[\n\x20-\x7e\u3400-\u4dbf\u4e00-\u9fff\U00020000-\U0002f7ff\U00030000-\U0003134f"
    f"{PRESERVE}\u3001-\u3003\u3008-\u3011\u3014-\u301f"
    "\u2014\u2018\u2019\u201c\u201d\u00b7]*")


def normalize_text(text: str) -> str:
  """NFKC with the CJK punctuation in PRESERVE kept as is.

  Effects: full-width letters/digits/symbols -> ASCII, ideographic space ->
  space, half-width katakana/CJK punctuation -> full-width, compatibility
  ideographs -> unified ideographs, while ，。！？：；（）…、“” stay.
  """
  if _NFKC_SAFE.fullmatch(text):
    return text
  text = text.translate(_PRE_MAP)
  if any(p in text for p in _PLACEHOLDERS):  # never in real text; stay exact
    return "".join(ch if ch in PRESERVE else unicodedata.normalize("NFKC", ch)
                   for ch in text)
  return unicodedata.normalize("NFKC", text.translate(_PROTECT)).translate(_RESTORE)


# Control and invisible characters that carry no text (keep '\n' and '\t',
# which the whitespace step handles; keep ZWJ U+200D: emoji sequences use it).
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\u200e\u200f\u2028\u2029\ufeff]")
_SPACES = re.compile(r"[^\S\n]+")


def normalize_whitespace(text: str) -> str:
  """Drops control chars, collapses spaces, strips every line."""
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  text = _CONTROL.sub("", text)
  text = _SPACES.sub(" ", text)
  return "\n".join(line.strip() for line in text.split("\n"))


# ----------------------------------------------------------------------------
# Quality filters
# ----------------------------------------------------------------------------


# Letters of the scripts that show up in this corpus besides Han: Latin
# (incl. full-width), Greek, Cyrillic, kana, Hangul.
_OTHER_LETTER_RUN = re.compile(
    "[A-Za-z\u00c0-\u024f\u0370-\u03ff\u0400-\u04ff\uff21-\uff3a\uff41-\uff5a"
    "\u3041-\u3096\u30a1-\u30fa\uac00-\ud7af]+")


def cjk_ratio(text: str) -> float:
  """Han characters / (Han characters + runs of other letters).

  A run of non-Han letters (an English word, a name) counts as one unit: it
  carries about as much as a Han character, so code-mixed Chinese passes and
  English-only text fails. 1.0 for text without letters.
  """
  other = len(_OTHER_LETTER_RUN.findall(text))
  if not other:
    return 1.0
  han = len(text) - len(_HAN_RE.sub("", text))
  return han / (han + other)


def ngram_hashes(text: str, n: int) -> np.ndarray:
  """32-bit hashes of every character n-gram of `text` (with repeats): [len-n+1] uint64."""
  cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), "<u4").astype(np.uint64)
  if len(cp) < n:
    return np.zeros(0, np.uint64)
  m = len(cp) - n + 1
  h = np.zeros(m, np.uint64)
  with np.errstate(over="ignore"):
    for k in range(n):  # polynomial fold; uint64 arithmetic wraps
      h = h * np.uint64(0x100000001B3) + cp[k:k + m]
    h ^= h >> np.uint64(29)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(32)
  return h & np.uint64(0xFFFFFFFF)


def is_repetitive(text: str) -> bool:
  """One character dominates, or most 10-gram positions repeat earlier ones."""
  chars = text.replace("\n", "").replace(" ", "")
  n = len(chars)
  if n < 8:
    return False
  if max(collections.Counter(chars).values()) / n > MAX_TOP_CHAR_FRACTION:
    return True
  if n >= 50:
    grams = ngram_hashes(chars, 10)
    if 1.0 - len(np.unique(grams)) / len(grams) > MAX_DUP_NGRAM_FRACTION:
      return True
  return False


def quality_reason(text: str) -> str | None:
  """The report step that rejects `text`, or None if it passes."""
  if len(text.replace("\n", "").replace(" ", "")) < MIN_DOC_CHARS:
    return "short_docs"
  if cjk_ratio(text) < MIN_CJK_RATIO:
    return "low_cjk_docs"
  if is_repetitive(text):
    return "repetitive_docs"
  return None


# ----------------------------------------------------------------------------
# Near-duplicate detection: MinHash + LSH, verified with exact Jaccard
# ----------------------------------------------------------------------------

_MERSENNE = np.uint64((1 << 61) - 1)


def shingle_hashes(text: str, n: int = SHINGLE) -> np.ndarray:
  """Sorted unique 32-bit hashes of the character n-grams of `text`: [S] uint64."""
  return np.unique(ngram_hashes(text.replace("\n", ""), n))


def _hash_params(num_perm: int, seed: int = 1234) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  a = rng.integers(1, 1 << 31, size=num_perm, dtype=np.uint64)
  b = rng.integers(0, 1 << 31, size=num_perm, dtype=np.uint64)
  return a, b


def minhash_signatures(shingles: Sequence[np.ndarray],
                       num_perm: int = NUM_BANDS * BAND_ROWS) -> np.ndarray:
  """MinHash signatures, one row per shingle set: [N, num_perm] uint64.

  Hash family h(x) = (a x + b) mod (2^61 - 1) with a, b < 2^31 and x < 2^32, so
  a x + b never overflows uint64. Every set must be non-empty.
  """
  a, b = _hash_params(num_perm)
  out = np.zeros((len(shingles), num_perm), np.uint64)
  start, budget = 0, 1 << 18  # shingles per chunk: bounds memory to ~64 MB
  while start < len(shingles):
    stop, total = start, 0
    while stop < len(shingles) and (total == 0 or total + len(shingles[stop]) <= budget):
      total += len(shingles[stop])
      stop += 1
    x = np.concatenate(shingles[start:stop])
    offsets = np.cumsum([0] + [len(s) for s in shingles[start:stop - 1]])
    hv = (a[:, None] * x[None, :] + b[:, None]) % _MERSENNE  # [P, S]
    out[start:stop] = np.minimum.reduceat(hv, offsets, axis=1).T
    start = stop
  return out


def near_duplicates(texts: Sequence[str], threshold: float = NEAR_DUP_JACCARD,
                    max_checks: int = 32) -> list[bool]:
  """Marks texts that near-duplicate an earlier, kept text.

  LSH over MinHash bands proposes candidates (earlier kept texts sharing a
  band); a candidate counts only if the exact Jaccard similarity of the
  5-gram shingle sets is >= threshold. At most `max_checks` candidates are
  verified per text, so boilerplate-heavy buckets cannot go quadratic.
  """
  dup = [False] * len(texts)
  idx = [i for i, t in enumerate(texts) if len(t) >= NEAR_DUP_MIN_CHARS]
  sh = [shingle_hashes(texts[i]) for i in idx]
  keep = [j for j, s in enumerate(sh) if len(s)]
  if not keep:
    return dup
  sig = minhash_signatures([sh[j] for j in keep])
  buckets: dict[bytes, list[int]] = {}
  for r, j in enumerate(keep):
    keys = [bytes([band]) + sig[r, band * BAND_ROWS:(band + 1) * BAND_ROWS].tobytes()
            for band in range(NUM_BANDS)]
    cands = dict.fromkeys(c for k in keys for c in buckets.get(k, ()))
    if any(_jaccard(sh[j], sh[c]) >= threshold for c in list(cands)[:max_checks]):
      dup[idx[j]] = True
      continue
    for k in keys:
      buckets.setdefault(k, []).append(j)
  return dup


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
  inter = len(np.intersect1d(x, y, assume_unique=True))
  return inter / (len(x) + len(y) - inter)


# ----------------------------------------------------------------------------
# The pipeline
# ----------------------------------------------------------------------------


def _clean_text(text: str, domain: str, source: str, rep: CleaningReport) -> str:
  """Per-document character/line steps; counts go to `rep`."""
  n0 = len(text)
  text = strip_markup(text, source)
  rep.add(domain, "markup_chars", max(n0 - len(text), 0))
  normed = normalize_text(text)
  rep.add(domain, "normalized_docs", int(normed != text))
  n1 = len(normed)
  text = normalize_whitespace(normed)
  rep.add(domain, "whitespace_chars", max(n1 - len(text), 0))
  lines, seen = [], set()
  for line in text.split("\n"):
    if not line:
      rep.add(domain, "empty_lines")
    elif len(line) >= MIN_DUP_LINE_CHARS and line in seen:
      rep.add(domain, "duplicate_lines")
    else:
      seen.add(line)
      lines.append(line)
  return "\n".join(lines)


def clean_documents(docs: Iterable, report: CleaningReport | None = None):
  """Cleans, filters and deduplicates `docs` (see the module docstring).

  Returns (kept documents in input order, CleaningReport). Pass `report` to
  accumulate into an existing one (e.g. one holding loader counts).
  """
  rep = report if report is not None else CleaningReport()
  staged: dict[str, list] = {}  # domain -> [(input position, cleaned doc)]
  for pos, doc in enumerate(docs):
    rep.add(doc.domain, "input_docs")
    rep.add(doc.domain, "input_chars", len(doc.text))
    text = _clean_text(doc.text, doc.domain, source_of(doc.doc_id), rep)
    reason = quality_reason(text)
    if reason:
      rep.add(doc.domain, reason)
      continue
    staged.setdefault(doc.domain, []).append((pos, dataclasses.replace(doc, text=text)))
  kept = [pd for group in staged.values() for pd in _dedup(group, rep)]
  out = [d for _, d in sorted(kept, key=lambda pd: pd[0])]
  for d in out:
    rep.add(d.domain, "output_docs")
    rep.add(d.domain, "output_chars", len(d.text))
  return out, rep


def _dedup(group: list, rep: CleaningReport) -> list:
  """Exact then near-duplicate removal inside one domain; first one wins.

  `group` holds (position, doc) pairs; the kept pairs are returned.
  """
  seen, unique = set(), []
  for pd in group:
    key = hashlib.sha1(pd[1].text.encode("utf-8", "surrogatepass")).digest()
    if key in seen:
      rep.add(pd[1].domain, "exact_duplicate_docs")
      continue
    seen.add(key)
    unique.append(pd)
  flags = near_duplicates([d.text for _, d in unique])
  for (_, d), f in zip(unique, flags):
    if f:
      rep.add(d.domain, "near_duplicate_docs")
  return [pd for pd, f in zip(unique, flags) if not f]
