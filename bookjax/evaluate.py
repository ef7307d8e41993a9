"""Evaluators: bits/char per domain, rare-character bits/char, classical-poetry
continuation, a C-Eval-format multiple-choice harness, passkey retrieval.

Multiple-choice evaluators talk to a model only through a `Scorer`:
  logprobs(prompts, continuations) -> [N] sum of log p(continuation | prompt) (nats)
  greedy(prompts, num_tokens) -> list of generated strings
`LMScorer` implements it for a bookjax model; tests use oracle and uniform scorers
(an oracle scores 100%, a uniform model exactly chance: ties share credit).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import math
import os
from typing import Iterable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bookjax.data import corpus, pipeline

LN2 = math.log(2.0)


class Scorer(Protocol):
  def logprobs(self, prompts: Sequence[str], continuations: Sequence[str]) -> np.ndarray: ...
  def greedy(self, prompts: Sequence[str], num_tokens: int) -> list[str]: ...


# =================================================================================
# The model scorer
# =================================================================================

_FORWARD_CACHE: dict[int, tuple] = {}


def log_probs_fn(model):
  """A jitted `(variables, batch) -> (log_probs_BTV, router_stats)` shared by every
  evaluator of the same model, so each (model, batch shape) compiles once."""
  hit = _FORWARD_CACHE.get(id(model))
  if hit is not None and hit[0] is model:
    return hit[1]

  def forward(variables, batch):
    logits, aux = model.apply(variables, batch, mutable=["losses", "router_stats"])
    return jax.nn.log_softmax(logits, axis=-1), aux.get("router_stats", {})

  fn = jax.jit(forward)
  _FORWARD_CACHE.clear()  # keep one model alive at most
  _FORWARD_CACHE[id(model)] = (model, fn)
  return fn


class LMScorer:
  """Scores text with a bookjax Transformer (left-truncated to `seq_len`).

  variables: {'params': ..., optionally 'router_bias': ...}.
  """

  def __init__(self, model, variables, tokenizer, seq_len: int, batch_size: int = 16):
    self.model, self.variables, self.tok = model, variables, tokenizer
    self.seq_len, self.batch_size = seq_len, batch_size

    self._forward = log_probs_fn(model)

  def _rows(self, id_lists: list[list[int]], cont_lens: list[int]):
    """Packs one example per row: inputs/targets, weights on continuation targets."""
    t = self.seq_len
    n = self.batch_size  # fixed shape: unused rows stay padding (no recompiles)
    b = dict(inputs=np.zeros((n, t), np.int32), targets=np.zeros((n, t), np.int32),
             weights=np.zeros((n, t), np.float32), segment_ids=np.zeros((n, t), np.int32),
             positions=np.zeros((n, t), np.int32), sentence_ids=np.zeros((n, t), np.int32),
             domain=np.full((n, t), -1, np.int32))
    last = np.zeros(n, np.int32)
    for i, (ids, c) in enumerate(zip(id_lists, cont_lens)):
      ids = ids[-(t + 1):]
      c = min(c, len(ids) - 1)
      L = len(ids) - 1
      b["inputs"][i, :L] = ids[:-1]
      b["targets"][i, :L] = ids[1:]
      b["weights"][i, L - c:L] = 1.0
      b["segment_ids"][i, :L] = 1
      b["positions"][i, :L] = np.arange(L)
      b["sentence_ids"][i, :L] = pipeline.sentence_ids_for(ids[:-1], self.tok)
      last[i] = L - 1
    return b, last

  def _run(self, batch):
    logp, _ = self._forward(self.variables, {k: jnp.asarray(v) for k, v in batch.items()})
    return np.asarray(logp)

  def logprobs(self, prompts, continuations) -> np.ndarray:
    out = np.zeros(len(prompts), np.float64)
    for s in range(0, len(prompts), self.batch_size):
      ps, cs = prompts[s:s + self.batch_size], continuations[s:s + self.batch_size]
      ids, clen = [], []
      for p, c in zip(ps, cs):
        cid = self.tok.encode(c)
        ids.append([self.tok.BOS] + self.tok.encode(p) + cid)
        clen.append(len(cid))
      batch, _ = self._rows(ids, clen)
      logp = self._run(batch)
      tok_lp = np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      out[s:s + len(ps)] = (tok_lp * batch["weights"]).sum(-1)[:len(ps)]
    return out

  def greedy(self, prompts, num_tokens: int) -> list[str]:
    outs = []
    for s in range(0, len(prompts), self.batch_size):
      ids = [[self.tok.BOS] + self.tok.encode(p) for p in prompts[s:s + self.batch_size]]
      gen = [[] for _ in ids]
      for _ in range(num_tokens):
        rows = [x + g + [0] for x, g in zip(ids, gen)]  # dummy target for the last slot
        batch, last = self._rows(rows, [1] * len(rows))
        logp = self._run(batch)
        nxt = logp[np.arange(len(rows)), last[:len(rows)]].argmax(-1)
        for g, t in zip(gen, nxt):
          g.append(int(t))
      outs.extend(self.tok.decode(g) for g in gen)
    return outs


# =================================================================================
# Bits per character
# =================================================================================

def stratified_batches(docs, tokenizer, *, seq_len: int, batch_size: int,
                       per_domain: int | None) -> list[dict]:
  """Eval batches domain by domain, at most `per_domain` each (None: all), so every
  domain is measured even when the set is capped."""
  out = []
  for name in corpus.DOMAINS:
    dom = [d for d in docs if d.domain == name]
    if dom:
      out.extend(pipeline.make_eval_batches(dom, tokenizer, seq_len=seq_len,
                                            batch_size=batch_size, max_batches=per_domain))
  return out


def bits_per_char(model, variables, docs, tokenizer, *, seq_len: int, batch_size: int,
                  rare_threshold: int = 10, train_docs=None, per_domain_batches=None) -> dict:
  """Bits/char per domain and overall; with `train_docs`, also on rare characters.

  Rare: characters seen fewer than `rare_threshold` times in `train_docs`
  (byte-fallback tokens, i.e. characters outside the vocabulary, are rare too).
  """
  rare_V = None
  if train_docs is not None:
    rare_V = rare_token_mask(train_docs, tokenizer, rare_threshold)
  forward = log_probs_fn(model)
  n_dom = len(corpus.DOMAINS)
  nll_D, chars_D = np.zeros(n_dom), np.zeros(n_dom)
  rare_nll = rare_chars = 0.0
  for b in stratified_batches(docs, tokenizer, seq_len=seq_len, batch_size=batch_size,
                              per_domain=per_domain_batches):
    logp, _ = forward(variables, {k: jnp.asarray(v) for k, v in b.items()})
    tok_lp = jnp.take_along_axis(logp, jnp.asarray(b["targets"])[..., None], -1)[..., 0]
    nll = -np.asarray(tok_lp, np.float64) * b["weights"]
    ok = b["domain"] >= 0
    np.add.at(nll_D, b["domain"][ok], nll[ok])
    np.add.at(chars_D, b["domain"][ok], b["chars"][ok])
    if rare_V is not None:
      rare = rare_V[b["targets"]]
      rare_nll += float((nll * rare).sum())
      rare_chars += float((b["chars"] * rare).sum())
  res = {}
  for i, name in enumerate(corpus.DOMAINS):
    if chars_D[i] > 0:
      res[name] = float(nll_D[i] / LN2 / chars_D[i])
  res["overall"] = float(nll_D.sum() / LN2 / max(chars_D.sum(), 1.0))
  if rare_V is not None and rare_chars > 0:
    res["rare"] = rare_nll / LN2 / rare_chars
    res["rare_chars"] = rare_chars
  return res


def rare_token_mask(train_docs, tokenizer, threshold: int) -> np.ndarray:
  """[V] float32: 1 for tokens of characters seen < threshold times, and byte tokens."""
  counts = collections.Counter()
  for d in train_docs:
    counts.update(d.text)
  mask = np.zeros(tokenizer.vocab_size, np.float32)
  for i in range(tokenizer.vocab_size):
    ch = tokenizer.id_to_char(i)
    if ch is None:
      is_byte = tokenizer.BYTE_OFFSET <= i < tokenizer.CHAR_OFFSET
      mask[i] = float(is_byte)
    elif ch != "\n":
      mask[i] = float(counts[ch] < threshold)
  return mask


# =================================================================================
# Multiple choice
# =================================================================================

@dataclasses.dataclass(frozen=True)
class Choice:
  """A multiple-choice item: prompt, candidate continuations, index of the answer."""
  prompt: str
  options: tuple[str, ...]
  answer: int


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
  """95% Wilson score interval for a proportion."""
  if n == 0:
    return (0.0, 1.0)
  p = successes / n
  denom = 1 + z * z / n
  centre = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, centre - half), min(1.0, centre + half))


def score_choices(scorer: Scorer, items: Sequence[Choice]) -> dict:
  """Accuracy (ties share credit), its 95% interval, chance level, item count."""
  prompts, conts, owners = [], [], []
  for i, it in enumerate(items):
    for o in it.options:
      prompts.append(it.prompt)
      conts.append(o)
      owners.append(i)
  lp = np.asarray(scorer.logprobs(prompts, conts), np.float64)
  credit, pos = 0.0, 0
  for it in items:
    s = lp[pos:pos + len(it.options)]
    pos += len(it.options)
    best = np.flatnonzero(np.isclose(s, s.max(), rtol=0, atol=1e-9))
    credit += float(it.answer in best) / len(best)
  n = len(items)
  lo, hi = wilson_interval(credit, n)
  chance = float(np.mean([1 / len(it.options) for it in items])) if items else 0.0
  return dict(accuracy=credit / max(n, 1), ci95_low=lo, ci95_high=hi, n=n, chance=chance)


def poetry_items(test_docs, num_options: int = 4, max_items: int = 200, seed: int = 0) -> list[Choice]:
  """Poetry continuation: given a poem's preceding lines, pick its true next line.

  Distractors are lines of the same length from *other* held-out poems. Lines are
  the poem's '\n'-separated lines after the title (first line).
  """
  rng = np.random.default_rng(seed)
  poems = [d for d in test_docs if d.domain == "poetry"]
  lines_of = [[l for l in d.text.split("\n")[1:] if l.strip()] for d in poems]
  by_len = collections.defaultdict(list)
  for pi, lines in enumerate(lines_of):
    for l in lines:
      by_len[len(l)].append((pi, l))
  items = []
  for pi in rng.permutation(len(poems)):
    lines = lines_of[pi]
    if len(lines) < 2:
      continue
    k = int(rng.integers(1, len(lines)))
    true = lines[k]
    pool = sorted({l for (pj, l) in by_len[len(true)] if pj != pi and l != true})
    if len(pool) < num_options - 1:
      continue
    distract = [pool[j] for j in rng.choice(len(pool), num_options - 1, replace=False)]
    answer = int(rng.integers(num_options))
    opts = distract[:answer] + [true] + distract[answer:]
    prompt = poems[pi].text.split("\n")[0] + "\n" + "\n".join(lines[:k]) + "\n"
    items.append(Choice(prompt, tuple(opts), answer))
    if len(items) >= max_items:
      break
  return items


# ---------------------------------------------------------------------------------
# C-Eval format
# ---------------------------------------------------------------------------------

CEVAL_COLUMNS = ("id", "question", "A", "B", "C", "D", "answer")
LETTERS = ("A", "B", "C", "D")


@dataclasses.dataclass(frozen=True)
class CEvalQuestion:
  id: str
  question: str
  options: tuple[str, str, str, str]
  answer: str  # 'A'..'D'


def read_ceval_csv(path_or_file) -> list[CEvalQuestion]:
  """Reads a C-Eval CSV (columns id, question, A, B, C, D, answer)."""
  if isinstance(path_or_file, (str, os.PathLike)):
    with open(path_or_file, encoding="utf-8", newline="") as f:
      return read_ceval_csv(f)
  reader = csv.DictReader(path_or_file)
  missing = [c for c in CEVAL_COLUMNS if c not in (reader.fieldnames or [])]
  if missing:
    name = getattr(path_or_file, "name", "<csv>")
    raise ValueError(f"{name}: C-Eval CSV is missing columns {missing}; expected {CEVAL_COLUMNS}")
  out = []
  for row in reader:
    ans = row["answer"].strip().upper()
    if ans not in LETTERS:
      raise ValueError(f"C-Eval row {row['id']}: answer must be one of A-D, got {row['answer']!r}")
    out.append(CEvalQuestion(row["id"], row["question"], tuple(row[c] for c in LETTERS), ans))
  return out


def write_ceval_csv(path: str, questions: Iterable[CEvalQuestion]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(CEVAL_COLUMNS)
    for q in questions:
      w.writerow([q.id, q.question, *q.options, q.answer])


def _format_question(q: CEvalQuestion, with_answer: bool) -> str:
  s = q.question + "\n" + "".join(f"{l}. {o}\n" for l, o in zip(LETTERS, q.options)) + "答案："
  return s + (q.answer + "\n\n" if with_answer else "")


def ceval_items(questions, dev=(), k_shot: int = 0, subject: str = "中文") -> list[Choice]:
  """C-Eval prompts (k-shot from `dev`); the candidates are the answer letters."""
  head = f"以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\n\n"
  shots = "".join(_format_question(q, True) for q in list(dev)[:k_shot])
  return [Choice(head + shots + _format_question(q, False), LETTERS, LETTERS.index(q.answer))
          for q in questions]


DOMAIN_NAMES_ZH = dict(news="新闻报道", reviews="用户评论", cantonese="粤语对话", poetry="唐诗")


def builtin_ceval(test_docs, num_questions: int = 60, seed: int = 0) -> list[CEvalQuestion]:
  """A small offline set in the C-Eval layout, made from held-out documents:
  "which passage is a <domain>?" with one passage from that domain and three from
  the others. Answers are spread over A-D deterministically.
  """
  rng = np.random.default_rng(seed)
  snippets = collections.defaultdict(list)
  for d in test_docs:
    s = d.text.replace("\n", " ").strip()[:40]
    if len(s) >= 8:
      snippets[d.domain].append(s)
  domains = [x for x in corpus.DOMAINS if snippets[x]]
  if len(domains) < 4:
    raise ValueError("builtin_ceval needs held-out documents from all four domains")
  qs = []
  for i in range(num_questions):
    target = domains[i % 4]
    others = [x for x in domains if x != target]
    opts = [snippets[x][int(rng.integers(len(snippets[x])))] for x in others]
    ans = int(rng.integers(4))
    opts.insert(ans, snippets[target][int(rng.integers(len(snippets[target])))])
    qs.append(CEvalQuestion(f"builtin-{i}", f"下面哪一段文字是{DOMAIN_NAMES_ZH[target]}？",
                            tuple(opts), LETTERS[ans]))
  return qs


# ---------------------------------------------------------------------------------
# Passkey retrieval
# ---------------------------------------------------------------------------------

def passkey_prompt(filler: str, key: str, depth: float) -> str:
  """Hides `密钥是{key}。` at relative `depth` of the filler, then asks for it."""
  cut = int(round(depth * len(filler)))
  return filler[:cut] + f"密钥是{key}。" + filler[cut:] + "密钥是"


def passkey_eval(scorer: Scorer, test_docs, lengths=(64, 128), depths=(0.1, 0.5, 0.9),
                 trials: int = 4, seed: int = 0) -> list[dict]:
  """Exact-match accuracy of greedily generating a 5-digit key, per (length, depth)."""
  rng = np.random.default_rng(seed)
  text = "".join(d.text.replace("\n", "") for d in test_docs if d.domain != "poetry")
  rows = []
  for L in lengths:
    for depth in depths:
      prompts, keys = [], []
      for _ in range(trials):
        start = int(rng.integers(0, max(1, len(text) - L)))
        key = "".join(str(int(x)) for x in rng.integers(0, 10, 5))
        prompts.append(passkey_prompt(text[start:start + L], key, depth))
        keys.append(key)
      outs = scorer.greedy(prompts, len(keys[0]))
      acc = float(np.mean([o == k for o, k in zip(outs, keys)]))
      rows.append(dict(length=L, depth=depth, accuracy=acc, trials=trials))
  return rows


# =================================================================================
# Routing analytics
# =================================================================================

def routing_analytics(model, variables, docs, tokenizer, *, seq_len: int, batch_size: int,
                      max_batches: int | None = 8) -> dict:
  """Router statistics over held-out batches (models with an Expert Forest).

  Returns expert-load coefficient of variation per tier, tier usage per corpus
  domain, mutual information (bits) between corpus domain and the level-1 domain
  router's choice, and activated parameters per token. Empty for dense models.
  """
  forward = log_probs_fn(model)
  total, n = None, 0
  per = None if max_batches is None else max(1, max_batches // len(corpus.DOMAINS))
  for b in stratified_batches(docs, tokenizer, seq_len=seq_len, batch_size=batch_size,
                              per_domain=per):
    s = jax.device_get(forward(variables, {k: jnp.asarray(v) for k, v in b.items()})[1])
    total = s if total is None else jax.tree.map(np.add, total, s)
    n += 1
  if not total:
    return {}
  return analyze_router_stats(total, n)


def _layers_stats(stats) -> dict[str, dict[str, np.ndarray]]:
  """Flattens the 'router_stats' tree to {layer path: {stat name: value}}."""
  out: dict[str, dict[str, np.ndarray]] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
    keys = [getattr(p, "key", None) for p in path]
    keys = [k for k in keys if isinstance(k, str)]
    out.setdefault("/".join(keys[:-1]), {})[keys[-1]] = np.asarray(leaf, np.float64)
  return out


def mutual_information_bits(joint_CM: np.ndarray) -> float:
  """I(C; M) in bits of a (possibly unnormalised) joint count table."""
  p = joint_CM / max(joint_CM.sum(), 1e-12)
  pc, pm = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
  nz = p > 0
  return float(np.sum(p[nz] * np.log2(p[nz] / (pc @ pm)[nz])))


def analyze_router_stats(stats, num_batches: int = 1) -> dict:
  """Routing analytics per forest layer from 'router_stats' summed over batches.

  Loads are sums (kept as sums); ratios and means are divided by `num_batches`.
  """
  res = {}
  for layer, st in _layers_stats(stats).items():
    row = {}
    for k, v in st.items():
      if k.startswith("load_") and not k.startswith("load_target_") and v.size > 1:
        row[f"load_cv_{k[5:]}"] = float(v.std() / max(v.mean(), 1e-12))
        row[f"load_{k[5:]}"] = v.tolist()
    for k in ("tier_usage", "tier_usage_by_domain", "domain_usage"):
      if k in st:
        row[k] = (st[k] / num_batches).tolist()
    for k in ("activated_params_mean", "drop_rate", "compute_ratio"):
      if k in st:
        row[k] = float(st[k] / num_batches)
    if "activated_params_max" in st:
      row["activated_params_max"] = float(st["activated_params_max"] / num_batches)
    if "domain_joint" in st:
      row["domain_router_mi_bits"] = mutual_information_bits(st["domain_joint"])
      row["domain_joint"] = st["domain_joint"].tolist()
    res[layer] = row
  return res


# =================================================================================
# One call for a finished run
# =================================================================================

def load_run(workdir: str):
  """(config, model, variables, tokenizer, splits) of a trained workdir's latest checkpoint."""
  from bookjax import config_lib, train  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: not a bookjax workdir (no config.json)")
  config = config_lib.load_json(path)
  data = train.build_data(config, workdir)
  model = train.build_model(config.model, data.glyph)
  tx = train.make_optimizer(config.train)
  mngr = train.make_checkpoint_manager(workdir, config.train)
  if mngr.latest_step() is None:
    raise FileNotFoundError(f"{workdir}/checkpoints: no checkpoint to evaluate")
  state, _ = train.restore_checkpoint(mngr, train.abstract_state(model, tx, config))
  mngr.close()
  variables = {"params": state.params}
  if state.router_bias:
    variables["router_bias"] = state.router_bias
  return config, model, variables, data.tokenizer, data.splits


def evaluate_workdir(workdir: str, *, quick: bool = False, split: str = "test") -> dict:
  """Runs every evaluator on a workdir's latest checkpoint; writes `eval.json`."""
  import json  # pylint: disable=g-import-not-at-top
  config, model, variables, tok, splits = load_run(workdir)
  seq_len, bs = config.data.seq_len, config.data.batch_size
  docs = splits[split]
  scorer = LMScorer(model, variables, tok, seq_len=seq_len, batch_size=bs)
  res = dict(bpc=bits_per_char(model, variables, docs, tok, seq_len=seq_len, batch_size=bs,
                               train_docs=splits["train"],
                               per_domain_batches=1 if quick else 12))
  res["poetry"] = score_choices(scorer, poetry_items(docs, max_items=16 if quick else 200))
  ce = builtin_ceval(docs, num_questions=8 if quick else 60)
  dev = builtin_ceval(splits["validation"], num_questions=5, seed=1)
  res["ceval_0shot"] = score_choices(scorer, ceval_items(ce))
  if not quick:
    res["ceval_5shot"] = score_choices(scorer, ceval_items(ce, dev, k_shot=5))
  lengths = (min(64, seq_len - 16),) if quick else tuple(
      L for L in (64, 128, 256, 512) if L <= seq_len - 16)
  res["passkey"] = passkey_eval(scorer, docs, lengths=lengths, trials=2 if quick else 8)
  res["routing"] = routing_analytics(model, variables, docs, tok, seq_len=seq_len,
                                     batch_size=bs, max_batches=4 if quick else 16)
  with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, indent=2, ensure_ascii=False)
  return res


def evaluate_ceval_dir(workdir: str, ceval_dir: str, k_shot: int = 5) -> dict:
  """Scores real C-Eval files: every `<subject>_val.csv` with `<subject>_dev.csv` shots."""
  config, model, variables, tok, _ = load_run(workdir)
  scorer = LMScorer(model, variables, tok, seq_len=config.data.seq_len,
                    batch_size=config.data.batch_size)
  out = {}
  vals = sorted(f for f in os.listdir(ceval_dir) if f.endswith("_val.csv"))
  if not vals:
    raise FileNotFoundError(f"{ceval_dir}: no '<subject>_val.csv' files (C-Eval layout)")
  for name in vals:
    subject = name[:-len("_val.csv")]
    qs = read_ceval_csv(os.path.join(ceval_dir, name))
    dev_path = os.path.join(ceval_dir, f"{subject}_dev.csv")
    dev = read_ceval_csv(dev_path) if os.path.exists(dev_path) else []
    out[subject] = dict(zero_shot=score_choices(scorer, ceval_items(qs)),
                        k_shot=score_choices(scorer, ceval_items(qs, dev, k_shot=k_shot)))
  return out
