"""End-to-end trainer tests on the embedded corpus at tiny size."""
import json
import os

import jax
import numpy as np
import pytest

from bookjax import config_lib, metrics_io, train
from experiments.configs import tiny


def _cfg(arg="runlocal", **train_overrides):
  c = tiny.get_config(arg)
  for k, v in train_overrides.items():
    c.train[k] = v
  return c


def test_tiny_training_decreases_loss_and_checkpoints(tmp_path):
  c = _cfg("runlocal,steps=30")
  c.train.log_every = 1
  summary = train.train_and_evaluate(c, str(tmp_path))
  rows = [r for r in metrics_io.read_metrics(str(tmp_path)) if "loss" in r]
  first = np.mean([r["loss"] for r in rows[:3]])
  last = np.mean([r["loss"] for r in rows[-3:]])
  assert last < first - 0.5, (first, last)
  assert summary["step"] == 30
  assert os.path.isdir(tmp_path / "checkpoints" / "30")
  assert "bpc/overall" in summary["validation"]
  cfg = json.loads((tmp_path / "config.json").read_text())
  assert cfg["model"]["vocab_size"] > 259


def _final_params(workdir, config):
  data = train.build_data(config, workdir)
  config = train.with_vocab(config, data.tokenizer.vocab_size)
  model = train.build_model(config.model, data.glyph)
  tx = train.make_optimizer(config.train)
  mngr = train.make_checkpoint_manager(workdir, config.train)
  state, data_state = train.restore_checkpoint(mngr, train.abstract_state(model, tx, config))
  mngr.close()
  return state, data_state


def test_resume_after_interrupt_matches_uninterrupted(tmp_path):
  c = _cfg("runlocal,steps=12")
  c.train.checkpoint_every = 100
  full, part = str(tmp_path / "full"), str(tmp_path / "part")
  train.train_and_evaluate(c, full)
  first = train.train_and_evaluate(c, part, stop_at=5)
  assert first["step"] == 5
  resumed = train.train_and_evaluate(c, part)
  assert resumed["step"] == 12
  s_full, d_full = _final_params(full, c)
  s_part, d_part = _final_params(part, c)
  assert d_full == d_part
  for a, b in zip(jax.tree.leaves(s_full), jax.tree.leaves(s_part)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)
  steps = [r["step"] for r in metrics_io.read_metrics(part) if "loss" in r]
  assert steps == sorted(steps) and steps[-1] == 12


def test_non_finite_loss_names_the_step(tmp_path):
  c = _cfg("runlocal,steps=10")
  c.train.lr = 1e30
  c.train.warmup_steps = 0
  c.train.grad_clip = 0.0
  with pytest.raises(train.NonFiniteLossError, match=r"at step \d+"):
    train.train_and_evaluate(c, str(tmp_path))


@pytest.mark.parametrize("field,value,match", [
    ("data.seq_len", 1, "config.data.seq_len"),
    ("model.num_dense_layers", 9, "config.model.num_dense_layers"),
    ("model.attention.kind", "gqa", "config.model.attention.kind"),
    ("model.ffn.kind", "moe", "config.model.ffn.kind"),
    ("train.warmup_steps", 10_000, "config.train.warmup_steps"),
    ("model.compute_dtype", "float16", "config.model.compute_dtype"),
    ("model.attention.head_dim", 7, "config.model.attention.head_dim"),
])
def test_bad_config_raises_clear_error(field, value, match):
  c = _cfg()
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_unknown_mixture_domain_raises():
  c = _cfg()
  c.data.mixture = dict(news=1.0, tweets=1.0)
  with pytest.raises(ValueError, match="config.data.mixture.tweets"):
    config_lib.validate(c)


def test_config_arg_parsing():
  c = tiny.get_config("steps=7,ffn=forest,runlocal")
  assert c.model.ffn.kind == "forest" and c.train.steps == 7
  with pytest.raises(ValueError, match="stepz"):
    tiny.get_config("stepz=3")


def test_saved_config_gains_fields_added_since(tmp_path):
  """A workdir's config.json written before a field existed loads with that field's
  default; every saved value is kept."""
  c = tiny.get_config("ffn=forest,runlocal")
  c.model.ffn.forest.block_size = 32
  saved = json.loads(c.to_json_best_effort())
  del saved["model"]["ffn"]["forest"]["batched_factor"]
  del saved["train"]["max_to_keep"]
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  loaded = config_lib.load_json(str(path))
  default = config_lib.default_config()
  assert loaded.model.ffn.forest.batched_factor == default.model.ffn.forest.batched_factor
  assert loaded.train.max_to_keep == default.train.max_to_keep
  assert loaded.model.ffn.forest.block_size == 32 and loaded.model.ffn.kind == "forest"
  assert loaded.model.d_model == c.model.d_model
  config_lib.validate(loaded)
  with pytest.raises(FileNotFoundError, match="nope.json"):
    config_lib.load_json(str(tmp_path / "nope.json"))
