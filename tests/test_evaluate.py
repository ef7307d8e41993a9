"""Evaluators on cases with known answers: an oracle scores 100%, uniform scores chance."""
import io

import numpy as np
import pytest

from bookjax import evaluate
from bookjax.data import corpus


class OracleScorer:
  """Knows the answers: high log-prob for true continuations / keys."""

  def __init__(self, truths):
    self.truths = truths  # prompt -> true continuation

  def logprobs(self, prompts, continuations):
    return np.array([0.0 if self.truths.get(p) == c else -10.0
                     for p, c in zip(prompts, continuations)])

  def greedy(self, prompts, num_tokens):
    return [p.split("密钥是")[1][:num_tokens] for p in prompts]


class UniformScorer:
  """Every token equally likely: continuations of equal length tie."""

  def logprobs(self, prompts, continuations):
    return np.array([-np.log(1000.0) * len(c) for c in continuations])

  def greedy(self, prompts, num_tokens):
    return ["0" * num_tokens for _ in prompts]


@pytest.fixture(scope="module")
def test_docs():
  return corpus.split_documents(corpus.load_documents(max_docs_per_domain=2000))["test"]


def test_poetry_items_are_well_formed(test_docs):
  items = evaluate.poetry_items(test_docs, max_items=50)
  assert len(items) == 50
  for it in items:
    assert len(it.options) == 4 and len(set(it.options)) == 4
    assert len({len(o) for o in it.options}) == 1  # distractors share the length


def test_poetry_oracle_and_uniform(test_docs):
  items = evaluate.poetry_items(test_docs, max_items=60)
  oracle = OracleScorer({it.prompt: it.options[it.answer] for it in items})
  assert evaluate.score_choices(oracle, items)["accuracy"] == 1.0
  uni = evaluate.score_choices(UniformScorer(), items)
  assert uni["accuracy"] == pytest.approx(0.25)
  assert uni["ci95_low"] < 0.25 < uni["ci95_high"]


def test_ceval_csv_roundtrip_and_scoring(tmp_path, test_docs):
  qs = evaluate.builtin_ceval(test_docs, num_questions=24)
  assert {q.answer for q in qs} <= set("ABCD")
  path = tmp_path / "builtin_val.csv"
  evaluate.write_ceval_csv(str(path), qs)
  back = evaluate.read_ceval_csv(str(path))
  assert back == qs
  items = evaluate.ceval_items(back, back[:5], k_shot=5)
  assert items[0].prompt.count("答案：") == 6
  oracle = OracleScorer({it.prompt: it.options[it.answer] for it in items})
  assert evaluate.score_choices(oracle, items)["accuracy"] == 1.0
  assert evaluate.score_choices(UniformScorer(), items)["accuracy"] == pytest.approx(0.25)


def test_ceval_csv_missing_column_names_file():
  f = io.StringIO("id,question,A,B,C,answer\n1,q,a,b,c,A\n")
  f.name = "bad_val.csv"
  with pytest.raises(ValueError, match=r"bad_val.csv.*\['D'\]"):
    evaluate.read_ceval_csv(f)


def test_passkey_oracle_and_uniform(test_docs):
  rows = evaluate.passkey_eval(OracleScorer({}), test_docs, lengths=(64,), depths=(0.0, 0.5, 1.0))
  assert all(r["accuracy"] == 1.0 for r in rows)
  rows = evaluate.passkey_eval(UniformScorer(), test_docs, lengths=(64,), trials=8)
  assert max(r["accuracy"] for r in rows) <= 0.25


def test_passkey_prompt_places_key_at_depth():
  p = evaluate.passkey_prompt("一" * 100, "12345", 0.25)
  assert p.index("12345") == 25 + 3 and p.endswith("密钥是")


def test_wilson_interval():
  lo, hi = evaluate.wilson_interval(50, 100)
  assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


class _UniformLM:
  """A flax-free stand-in with the model API: uniform logits over V tokens."""

  def __init__(self, vocab_size):
    self.vocab_size = vocab_size

  def apply(self, variables, batch, mutable=()):
    import jax.numpy as jnp
    return jnp.zeros(batch["inputs"].shape + (self.vocab_size,)), {}


def test_bits_per_char_of_a_uniform_model_is_exact(test_docs):
  from bookjax.data import pipeline, tokenizer as tok_lib
  docs = [d for d in test_docs][:200]
  tok = tok_lib.CharTokenizer.build([d.text for d in docs], min_count=1)
  res = evaluate.bits_per_char(_UniformLM(tok.vocab_size), {}, docs, tok, seq_len=32,
                               batch_size=4)
  tokens = chars = 0.0
  for b in evaluate.stratified_batches(docs, tok, seq_len=32, batch_size=4, per_domain=None):
    tokens += b["weights"].sum()
    chars += b["chars"].sum()
  assert res["overall"] == pytest.approx(np.log2(tok.vocab_size) * tokens / chars, rel=1e-6)
