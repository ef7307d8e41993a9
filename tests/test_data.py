"""Tests of bookjax.data: corpus, cleaning, tokenizer, splits, packing, iterators."""
import json
import random
import re
import time

import numpy as np
import pytest

from bookjax.data import clean, corpus, pipeline
from bookjax.data.corpus import DOMAINS, Document
from bookjax.data.tokenizer import BOS, BYTE_OFFSET, CHAR_OFFSET, EOS, PAD, SEP, CharTokenizer

MIX = dict(news=1.0, reviews=1.0, cantonese=1.0, poetry=1.0)


@pytest.fixture(scope="module")
def docs():
  """A stable ~200-per-domain sample of the real corpus."""
  return corpus.load_documents(max_docs_per_domain=200)


@pytest.fixture(scope="module")
def tok(docs):
  return CharTokenizer.build([d.text for d in docs], min_count=2)


# ----------------------------------------------------------------------------
# Corpus
# ----------------------------------------------------------------------------


def test_corpus_has_four_clean_domains(docs):
  by = {name: [d for d in docs if d.domain == name] for name in DOMAINS}
  assert all(len(v) == 200 for v in by.values()), {k: len(v) for k, v in by.items()}
  assert len({d.doc_id for d in docs}) == len(docs)
  for d in docs:
    assert d.doc_id.startswith(d.domain + "/") and d.text.strip()
    assert "\n\n" not in d.text and "\r" not in d.text
  news = "\n".join(d.text for d in by["news"])
  assert not re.search(r"/[a-zA-Z]{1,3}\b", news), "POS tags left in news"
  assert "。" in news and "，" in news and "１" not in news  # CJK punct kept, digits folded
  canto = "\n".join(d.text for d in by["cantonese"])
  assert "\x15" not in canto and " #" not in canto and "嘅" in canto
  assert all(d.text.count("\n") >= 1 for d in by["poetry"])  # title + lines


def test_load_documents_is_cached_and_deterministic(docs):
  t0 = time.perf_counter()
  again = corpus.load_documents(max_docs_per_domain=200)
  assert time.perf_counter() - t0 < 2.0
  assert again == docs
  rep = corpus.cleaning_report()
  for name in DOMAINS:
    assert rep[(name, "output_docs")] > 0
  assert rep[("reviews", "exact_duplicate_docs")] > 1000  # the review files repeat a lot
  assert rep[("news", "markup_chars")] > 0


def test_corpus_stats_and_format(docs):
  stats = corpus.corpus_stats(docs)
  assert list(stats) == list(DOMAINS) + ["all"]
  assert stats["poetry"]["documents"] == 200
  assert stats["all"]["characters"] == sum(len(d.text) for d in docs)
  assert stats["all"]["unique_characters"] == len(set("".join(d.text for d in docs)))
  table = corpus.format_stats(stats)
  assert "cantonese" in table and "unique" in table


# ----------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------


def test_normalize_keeps_cjk_punctuation_and_folds_ascii_forms():
  assert clean.normalize_text("ＡＢＣ１２３％，。！？（）：；…「」、") == "ABC123%，。！？（）：；…「」、"
  assert clean.normalize_text("a\u3000b ｶﾞ") == "a b ガ"
  assert clean.normalize_text("錄音 ︰ 你") == "錄音 ： 你"
  assert clean.normalize_text("純中文，沒有變化。") == "純中文，沒有變化。"


def test_markup_strippers():
  assert clean.strip_pos_tags("[中国/ns  银行/n]/nt  成立/v  １/m  年/q  。/w") == "中国银行成立１年。"
  assert clean.strip_pos_tags("Ｊｉｍ/nx  Ｂａｉｌｅｙ/nx  说/v") == "Ｊｉｍ Ｂａｉｌｅｙ说"
  chat = "好 啦 咁 開始 # 我哋 - 講 ? \x151234_5678\x15\nHigh season 去 𡃉 喎 ."
  assert clean.strip_chat(chat) == "好啦咁開始我哋講？\nHigh season去𡃉喎。"
  assert clean.strip_html("<b>好</b>书<沉思录>&#183;") == "好书<沉思录>·"


def test_clean_documents_counts_every_step():
  raw = [
      Document("reviews/x/0", "reviews", "很好的一本书，值得一读。\n\n很好的一本书，值得一读。"),
      Document("reviews/x/1", "reviews", "很好的一本书，值得一读。"),                # exact dup of 0
      Document("reviews/x/2", "reviews", "waste of my money. My children are bored."),
      Document("reviews/x/3", "reviews", "好好好好好好好好好好好好"),
      Document("reviews/x/4", "reviews", "  "),
      Document("news/pd199801/0", "news", "迈向/v  新/a  世纪/n  。/w"),
  ]
  long = ("这家酒店的位置很好，离车站很近，房间也干净，服务员态度热情，早餐品种丰富，价格合理，"
          "前台服务周到，行李寄存方便，周边餐馆很多，交通十分便利，整体来说性价比很高，下次还会再来。")
  raw += [Document("reviews/y/0", "reviews", long),
          Document("reviews/y/1", "reviews", long.replace("下次", "以后"))]   # near dup
  out, rep = clean.clean_documents(raw)
  assert [d.doc_id for d in out] == ["reviews/x/0", "news/pd199801/0", "reviews/y/0"]
  assert out[0].text == "很好的一本书，值得一读。"
  assert out[1].text == "迈向新世纪。"
  assert rep[("reviews", "empty_lines")] == 2   # doc 0's blank line + the blank doc
  assert rep[("reviews", "duplicate_lines")] == 1
  assert rep[("reviews", "exact_duplicate_docs")] == 1
  assert rep[("reviews", "low_cjk_docs")] == 1
  assert rep[("reviews", "repetitive_docs")] == 1
  assert rep[("reviews", "short_docs")] == 1
  assert rep[("reviews", "near_duplicate_docs")] == 1
  assert rep[("news", "markup_chars")] > 0
  assert rep[("reviews", "input_docs")] == 7 and rep[("reviews", "output_docs")] == 2
  assert clean.CleaningReport.from_nested(json.loads(json.dumps(rep.nested()))) == rep
  assert "near_duplicate_docs" in rep.format(DOMAINS)


def test_near_duplicates_marks_later_copy_only():
  a = "床前明月光，疑是地上霜。舉頭望明月，低頭思故鄉。" * 2
  b = a[:-3] + "故園。"
  c = "白日依山盡，黃河入海流。欲窮千里目，更上一層樓。" * 2
  assert clean.near_duplicates([a, c, b]) == [False, False, True]


# ----------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------

ODD = ["", "\n", "ASCII only: Hello, World! 123", "emoji 😀👍🏽 and ZWJ 👨‍👩‍👧",
       "unseen 𠜎𪚥 ꙮ é\u0301 \x00\x7f\t", "mixed 中文 English\n第二行\n", "\ud800 lone"]


def test_tokenizer_round_trip_all_domains(docs, tok):
  for name in DOMAINS:
    for d in [x for x in docs if x.domain == name][:50]:
      ids = tok.encode(d.text)
      assert tok.decode(ids) == d.text
  for s in ODD:
    assert tok.decode(tok.encode(s)) == s, repr(s)
  assert tok.encode("\n") == [SEP] and tok.decode([SEP]) == "\n"
  assert tok.decode([BOS, PAD, EOS]) == ""


def test_char_count_weights_sum_to_length(docs, tok):
  w = tok.char_count_weights()
  assert w.shape == (tok.vocab_size,) and w.dtype == np.float32
  assert w[PAD] == w[BOS] == w[EOS] == 0 and w[SEP] == 1 and (w[CHAR_OFFSET:] == 1).all()
  assert w[BYTE_OFFSET + 0x41] == 1 and w[BYTE_OFFSET + 0x80] == 0 and w[BYTE_OFFSET + 0xE4] == 1
  for s in ODD + [d.text for d in docs[::97]]:
    assert w[tok.encode(s)].sum() == len(s), repr(s[:30])


def test_tokenizer_build_order_and_save_load(tmp_path):
  tok = CharTokenizer.build(["bbaac\n", "ab\nz"], min_count=2)
  assert tok.chars == ["a", "b"]   # a: 3, b: 3: ties by code point
  tok = CharTokenizer.build(["bba", "ab", "cc"], min_count=2)
  assert tok.chars == ["b", "a", "c"] and tok.vocab_size == CHAR_OFFSET + 3
  assert tok.id_to_char(CHAR_OFFSET) == "b" and tok.id_to_char(BOS) is None
  assert tok.id_to_char(BYTE_OFFSET) is None and tok.id_to_char(SEP) == "\n"
  tok.save(str(tmp_path))
  back = CharTokenizer.load(str(tmp_path))
  assert back.chars == tok.chars and back.encode("abcxyz\n") == tok.encode("abcxyz\n")
  json.loads((tmp_path / "vocab.json").read_text())  # plain JSON


# ----------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------


def test_split_deterministic_disjoint_order_independent(docs):
  s1 = corpus.split_documents(docs)
  shuffled = list(docs)
  random.Random(0).shuffle(shuffled)
  s2 = corpus.split_documents(shuffled)
  assert s1 == s2
  ids = [{d.doc_id for d in s1[k]} for k in corpus.SPLITS]
  assert sum(map(len, ids)) == len(docs) == len(set().union(*ids))
  assert len(s1["train"]) > 0.8 * len(docs) and s1["validation"] and s1["test"]
  # chunks of one conversation never straddle splits
  where = {d.doc_id: k for k in corpus.SPLITS for d in s1[k]}
  groups = {}
  for d in docs:
    groups.setdefault(corpus.split_key(d.doc_id), set()).add(where[d.doc_id])
  assert all(len(g) == 1 for g in groups.values())


# ----------------------------------------------------------------------------
# Packing and batches
# ----------------------------------------------------------------------------


def test_sentence_ids_hand_example():
  tok = CharTokenizer.build(["你好。我很好！”他说\n第二行…？也"], min_count=1)
  text = "你好。我很好！”他说\n第二行…？也"
  ids = [BOS] + tok.encode(text) + [EOS]
  sid = pipeline.sentence_ids_for(ids, tok).tolist()
  #       BOS 你 好 。 我 很 好 ！ ” 他 说 \n 第 二 行 … ？ 也 EOS
  assert sid == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 4, 4]


def _tiny_corpus():
  texts = {
      "news": "今天天气很好。我们去公园散步！\n公园里人很多。" * 3,
      "reviews": "书不错。",
      "cantonese": "你食咗飯未呀？\n食咗喇。",
      "poetry": "靜夜思\n床前明月光，\n疑是地上霜。",
  }
  docs = [Document(f"{k}/t/{i}", k, v[: 5 + 7 * i]) for k, v in texts.items() for i in range(4)]
  return docs, CharTokenizer.build([d.text for d in docs], min_count=1)


def test_packing_invariants_and_exact_coverage():
  docs, tok = _tiny_corpus()
  seq_len = 24
  batches = pipeline.make_eval_batches(docs, tok, seq_len=seq_len, batch_size=3)
  cw = tok.char_count_weights()
  stream = []
  for b in batches:
    assert all(v.shape == (3, seq_len) for v in b.values())
    seg, w = b["segment_ids"], b["weights"]
    for r in range(3):
      for t in range(seq_len):
        if seg[r, t] == 0:
          assert w[r, t] == 0 and b["domain"][r, t] == -1 and b["positions"][r, t] == 0
          continue
        first = t == 0 or seg[r, t - 1] != seg[r, t]
        assert b["positions"][r, t] == (0 if first else b["positions"][r, t - 1] + 1)
        same_next = t + 1 < seq_len and seg[r, t + 1] == seg[r, t]
        if t + 1 < seq_len:  # a weighted target never crosses into another segment
          assert w[r, t] == float(same_next)
        if w[r, t]:
          assert b["targets"][r, t] != BOS
        if t + 1 < seq_len and same_next:
          assert b["targets"][r, t] == b["inputs"][r, t + 1]
      stream += [int(x) for x, ww in zip(b["targets"][r], w[r]) if ww]
    np.testing.assert_array_equal(b["chars"], cw[b["targets"]] * w)
  # every token after BOS of every document is a weighted target exactly once
  expect = []
  for d in pipeline.eval_order(docs):
    expect += tok.encode(d.text) + [EOS]
  assert stream == expect
  total = sum(b["chars"].sum() for b in batches)
  assert total == sum(len(d.text) for d in docs)


def test_long_document_is_chunked_with_restarting_positions():
  tok = CharTokenizer.build(["一二三四五六七八九十。"], min_count=1)
  doc = Document("news/t/0", "news", "一二三四五。六七八九十。" * 4)  # 48 chars + BOS/EOS
  b = pipeline.make_eval_batches([doc], tok, seq_len=16, batch_size=8)[0]
  seg = b["segment_ids"]
  assert (seg[:, 0] == 1).sum() >= 3          # several rows, one chunk each
  assert (b["positions"][seg > 0][:1] == 0).all()
  rows = [r for r in range(8) if seg[r, 0] == 1]
  for r in rows[1:]:
    # continuation starts with the previous chunk's last token (input only)
    prev = rows[rows.index(r) - 1]
    assert b["inputs"][r, 0] == b["targets"][prev, -1]
    assert b["positions"][r, 0] == 0 and b["sentence_ids"][r, 0] == 0


def test_train_iterator_deterministic_and_resumable(docs, tok):
  kw = dict(seq_len=64, batch_size=4, mixture=MIX, seed=3)
  a = pipeline.make_train_iterator(docs, tok, **kw)
  first = [next(a) for _ in range(3)]
  state = json.loads(json.dumps(a.get_state()))
  rest = [next(a) for _ in range(4)]
  b = pipeline.make_train_iterator(docs, tok, **kw)
  for x, y in zip(first, [next(b) for _ in range(3)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  c = pipeline.make_train_iterator(docs, tok, **kw)
  c.set_state(state)
  for x, y in zip(rest, [next(c) for _ in range(4)]):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  other = next(pipeline.make_train_iterator(docs, tok, **dict(kw, seed=4)))
  assert not np.array_equal(other["inputs"], first[0]["inputs"])
  for bt in first + rest:
    assert bt["inputs"].dtype == np.int32 and bt["weights"].dtype == np.float32
    assert (bt["domain"][bt["segment_ids"] == 0] == -1).all()
    assert bt["weights"].mean() > 0.8


def test_mixture_zero_excludes_domain_and_weights_tokens(docs, tok):
  it = pipeline.make_train_iterator(docs, tok, seq_len=64, batch_size=8, seed=0,
                                    mixture=dict(news=0.0, reviews=1.0, cantonese=0.0, poetry=1.0))
  counts = np.zeros(len(DOMAINS))
  for _ in range(30):
    b = next(it)
    for d in range(len(DOMAINS)):
      counts[d] += b["weights"][b["domain"] == d].sum()
  assert counts[0] == 0 and counts[2] == 0
  frac = counts[1] / counts.sum()
  assert 0.3 < frac < 0.7, frac   # token fractions follow the mixture
  with pytest.raises(ValueError):
    pipeline.make_train_iterator(docs, tok, seq_len=8, batch_size=1, seed=0, mixture=dict(news=0))
  with pytest.raises(ValueError):
    pipeline.make_train_iterator(docs, tok, seq_len=8, batch_size=1, seed=0, mixture=dict(web=1))


def test_eval_batches_cover_docs_and_mix_domains(docs, tok):
  val = corpus.split_documents(docs)["validation"]
  batches = pipeline.make_eval_batches(val, tok, seq_len=128, batch_size=4)
  assert sum(b["chars"].sum() for b in batches) == sum(len(d.text) for d in val)
  assert len({b["inputs"].shape for b in batches}) == 1
  assert len(set(np.unique(batches[0]["domain"])) - {-1}) >= 2  # prefix is mixed
  assert len(pipeline.make_eval_batches(val, tok, seq_len=128, batch_size=4, max_batches=2)) == 2
