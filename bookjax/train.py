"""BookLM trainer: `train_and_evaluate(config, workdir)`.

One readable file in sections: data, mesh, model, sharding, step, checkpoint,
evals, loop. `experiments/train.py` only parses flags and calls in here, so
notebooks and tests run exactly the same code.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bookjax import config_lib, metrics_io, sharding
from bookjax.data import corpus, glyph as glyph_lib, pipeline, tokenizer as tok_lib
from bookjax.model import transformer

LN2 = math.log(2.0)


class NonFiniteLossError(FloatingPointError):
  """Raised when the training loss becomes NaN or infinite."""


# =================================================================================
# Data
# =================================================================================

@dataclasses.dataclass
class DataBundle:
  """Everything the trainer and evaluators need from the corpus."""
  splits: dict[str, list[corpus.Document]]
  tokenizer: tok_lib.CharTokenizer
  glyph: glyph_lib.GlyphTable
  train_iter: Any


def build_data(config, workdir: str | None = None) -> DataBundle:
  """Loads the embedded corpus, splits it, builds (or reloads) tokenizer + glyphs.

  When `workdir` already holds a vocabulary (a resumed run) it is reused, so the
  token ids of a checkpoint never change under it.
  """
  d = config.data
  docs = corpus.load_documents(max_docs_per_domain=d.max_docs_per_domain)
  splits = corpus.split_documents(docs)
  vocab_dir = os.path.join(workdir, "vocab") if workdir else None
  if vocab_dir and os.path.exists(os.path.join(vocab_dir, "vocab.json")):
    tok = tok_lib.CharTokenizer.load(vocab_dir)
    glyph = glyph_lib.GlyphTable.load(vocab_dir)
  else:
    tok = tok_lib.CharTokenizer.build([x.text for x in splits["train"]], min_count=d.min_count)
    glyph = glyph_lib.build_glyph_table(tok)
    if vocab_dir and jax.process_index() == 0:
      tok.save(vocab_dir)
      glyph.save(vocab_dir)
  train_iter = pipeline.make_train_iterator(
      splits["train"], tok, seq_len=d.seq_len, batch_size=d.batch_size,
      mixture=dict(d.mixture), seed=d.seed)
  return DataBundle(splits=splits, tokenizer=tok, glyph=glyph, train_iter=train_iter)


def with_vocab(config, vocab_size: int) -> ml_collections.ConfigDict:
  """A copy of the config whose model.vocab_size is the tokenizer's."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.vocab_size not in (0, vocab_size):
    raise ValueError(f"config.model.vocab_size: {config.model.vocab_size} differs from the "
                     f"tokenizer's {vocab_size}; leave it 0 to take the tokenizer's")
  config.model.vocab_size = vocab_size
  return config


# =================================================================================
# Model
# =================================================================================

def build_model(model_cfg, glyph: glyph_lib.GlyphTable | None):
  """The Transformer for a (frozen) model config, with glyph features when needed."""
  frozen = ml_collections.FrozenConfigDict(model_cfg)
  feats = None
  if glyph is not None and "glyph" in _dims(frozen):
    feats = glyph.feature_arrays(max_components=4)
  return transformer.Transformer(frozen, glyph=feats)


def _dims(model_cfg) -> list[str]:
  if model_cfg.attention.kind != "mla":
    return []
  return [x.strip() for x in model_cfg.attention.dims.split(",") if x.strip()]


def dummy_batch(batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
  """A batch of the pipeline's layout, for shape inference."""
  z = np.zeros((batch_size, seq_len), np.int32)
  return dict(inputs=z, targets=z, weights=z.astype(np.float32), segment_ids=z + 1,
              positions=np.tile(np.arange(seq_len, dtype=np.int32), (batch_size, 1)),
              sentence_ids=z, domain=z, chars=z.astype(np.float32))


# =================================================================================
# Optimizer
# =================================================================================

def make_optimizer(train_cfg) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay, global-norm clipping.

  Weight decay applies to matrices only (ndim >= 2), not to norms' scales.
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=train_cfg.lr, warmup_steps=max(train_cfg.warmup_steps, 1),
      decay_steps=max(train_cfg.steps, train_cfg.warmup_steps + 1),
      end_value=train_cfg.lr * train_cfg.min_lr_ratio)
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  chain = []
  if train_cfg.grad_clip > 0:
    chain.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  chain.append(optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2,
                           weight_decay=train_cfg.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


@flax.struct.dataclass
class TrainState:
  """Trainable params, optimizer state, non-trainable router bias, step."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  router_bias: Any  # {} when the model has no routed FFN


# =================================================================================
# Sharding
# =================================================================================

def strip_boxes(tree):
  """Replaces nn.Partitioned boxes by their values (no sharding constraint applied;
  shardings come from `state_shardings` instead)."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _init_fn(model, tx, config):
  """rng -> TrainState with unboxed (plain array) params."""
  batch = dummy_batch(1, min(config.data.seq_len, 8))

  def init_fn(rng):
    variables = strip_boxes(model.init(rng, batch))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      router_bias=variables.get("router_bias", {}))

  return init_fn


def init_key(seed: int):
  """The parameter-init key. 'rbg' keys: jit-compiling a big init with threefry keys
  takes ~3x longer on XLA:CPU (measured on the forest models), same statistics."""
  return jax.random.key(seed, impl="rbg")


def create_train_state(model, tx, config, mesh, rules) -> TrainState:
  """Initialises the state already sharded: shapes first, then a sharded jit init."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    shardings = state_shardings(model, tx, config, mesh, rules)
    init = jax.jit(_init_fn(model, tx, config), out_shardings=shardings)
    return init(init_key(config.seed))


def abstract_state(model, tx, config, shardings=None) -> TrainState:
  """ShapeDtypeStructs of the TrainState (with shardings if given); allocates nothing."""
  shapes = jax.eval_shape(_init_fn(model, tx, config), jax.random.PRNGKey(0))
  if shardings is None:
    return shapes
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def state_shardings(model, tx, config, mesh, rules) -> TrainState:
  """NamedShardings of every TrainState leaf, from the params' logical axes."""
  batch = dummy_batch(1, min(config.data.seq_len, 8))
  boxed = jax.eval_shape(lambda r: model.init(r, batch), jax.random.PRNGKey(0))
  var_sh = sharding.logical_to_shardings(boxed, mesh, rules)
  param_sh = var_sh["params"]
  abstract_params = strip_boxes(boxed)["params"]
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  # Optimizer leaves shaped like a parameter take that parameter's sharding.
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sh,
                                 transform_non_params=lambda _: replicated)
  return TrainState(step=replicated, params=param_sh, opt_state=opt_sh,
                    router_bias=var_sh.get("router_bias", {}))


# =================================================================================
# Step
# =================================================================================

def token_nll(logits_BTV, targets_BT):
  """Per-token negative log-likelihood in nats, float32 [B, T]."""
  logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)[..., 0]


def _sum_tree(tree) -> jnp.ndarray:
  leaves = jax.tree.leaves(tree)
  return sum((jnp.sum(x) for x in leaves), jnp.zeros((), jnp.float32))


def make_train_step(model, tx, config):
  """Returns step(state, batch) -> (state, metrics); jit it with shardings."""
  bias_rate = _bias_rate(config)

  def loss_fn(params, router_bias, batch):
    variables = {"params": params}
    if router_bias:
      variables["router_bias"] = router_bias
    logits, aux = model.apply(variables, batch, mutable=["losses", "router_stats"])
    nll = token_nll(logits, batch["targets"])
    w = batch["weights"]
    ce = jnp.sum(nll * w) / jnp.maximum(jnp.sum(w), 1.0)
    aux_loss = _sum_tree(aux.get("losses", {}))
    bpc = jnp.sum(nll * w) / LN2 / jnp.maximum(jnp.sum(batch["chars"]), 1.0)
    return ce + aux_loss, (ce, aux_loss, bpc, aux.get("router_stats", {}))

  def step(state: TrainState, batch):
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, (ce, aux_loss, bpc, stats)), grads = grad_fn(state.params, state.router_bias, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    router_bias = state.router_bias
    if router_bias and bias_rate > 0:
      from bookjax.model import forest  # pylint: disable=g-import-not-at-top
      router_bias = forest.update_router_bias(router_bias, stats, bias_rate)
    metrics = dict(loss=loss, ce=ce, aux_loss=aux_loss, bits_per_char=bpc,
                   grad_norm=optax.tree.norm(grads))
    metrics.update(_router_summary(stats))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              router_bias=router_bias)
    return new_state, metrics

  return step


def jit_train_step(model, tx, config, mesh, rules, shardings=None):
  """The train step jit-compiled with explicit in/out shardings on `mesh`.

  Call it inside `jax.set_mesh(mesh), nn.logical_axis_rules(rules)` (the trace
  happens at the first call): linen's activation constraints and the
  expert-parallel dispatch read the mesh and rules from there. The state is
  donated; metrics come back replicated.
  """
  shardings = state_shardings(model, tx, config, mesh, rules) if shardings is None else shardings
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.jit(make_train_step(model, tx, config),
                 in_shardings=(shardings, sharding.batch_sharding(mesh, rules)),
                 out_shardings=(shardings, replicated), donate_argnums=(0,))


def _bias_rate(config) -> float:
  f = config.model.ffn
  return float(f.forest.bias_update_rate) if f.kind == "forest" else 0.0


def _router_summary(stats) -> dict[str, jnp.ndarray]:
  """Scalar router statistics for logging: each scalar stat averaged over layers.

  Sown values are tuples (one per call); stats named `x` in several layers become
  one `router/x` metric.
  """
  groups: dict[str, list] = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(stats)[0]:
    if jnp.ndim(leaf) != 0:
      continue
    keys = [getattr(p, "key", None) for p in path]
    name = [k for k in keys if isinstance(k, str)][-1]
    groups.setdefault(f"router/{name}", []).append(leaf.astype(jnp.float32))
  return {k: sum(v) / len(v) for k, v in groups.items()}


def make_eval_step(model):
  """Returns eval(params, router_bias, batch) -> per-domain sums of nll and chars."""
  n_dom = len(corpus.DOMAINS)

  def step(params, router_bias, batch):
    variables = {"params": params}
    if router_bias:
      variables["router_bias"] = router_bias
    logits, _ = model.apply(variables, batch, mutable=["losses", "router_stats"])
    nll = token_nll(logits, batch["targets"]) * batch["weights"]
    onehot = jax.nn.one_hot(batch["domain"], n_dom, dtype=jnp.float32)  # -1 -> zeros
    return dict(nll=jnp.einsum("bt,btd->d", nll, onehot),
                chars=jnp.einsum("bt,btd->d", batch["chars"], onehot),
                tokens=jnp.einsum("bt,btd->d", batch["weights"], onehot))

  return step


# =================================================================================
# Checkpoint
# =================================================================================

def make_checkpoint_manager(workdir: str, train_cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=train_cfg.max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=options)


def save_checkpoint(mngr, state: TrainState, data_state: dict) -> None:
  step = int(jax.device_get(state.step))
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)))
  mngr.wait_until_finished()


def restore_checkpoint(mngr, abstract_state: TrainState, step: int | None = None):
  """Restores (state, data_state) onto the shardings carried by `abstract_state`."""
  step = mngr.latest_step() if step is None else step
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


# =================================================================================
# Evals
# =================================================================================

def evaluate_bits_per_char(eval_fn, state: TrainState, batches, put) -> dict[str, float]:
  """Bits per character per domain and overall over a finite list of batches."""
  tot = None
  for b in batches:
    out = jax.device_get(eval_fn(state.params, state.router_bias, put(b)))
    tot = out if tot is None else jax.tree.map(np.add, tot, out)
  if tot is None:
    return {}
  res = {}
  for i, name in enumerate(corpus.DOMAINS):
    if tot["chars"][i] > 0:
      res[f"bpc/{name}"] = float(tot["nll"][i] / LN2 / tot["chars"][i])
  res["bpc/overall"] = float(tot["nll"].sum() / LN2 / max(tot["chars"].sum(), 1.0))
  return res


def stratified_eval_batches(docs, tokenizer, config) -> list[dict]:
  """About `train.eval_batches` batches, split evenly over the corpus domains, so
  every domain's bits/char is measured on the same number of tokens."""
  from bookjax import evaluate  # pylint: disable=g-import-not-at-top
  per = max(1, math.ceil(config.train.eval_batches / len(corpus.DOMAINS)))
  return evaluate.stratified_batches(docs, tokenizer, seq_len=config.data.seq_len,
                                     batch_size=config.data.batch_size, per_domain=per)


def unigram_entropy_bits_per_char(splits, tokenizer) -> float:
  """Entropy (bits/char) of the training split's token unigram, scored on validation.

  The no-context baseline a trained LM must beat (add-one smoothing).
  """
  counts = np.ones(tokenizer.vocab_size, np.float64)
  for doc in splits["train"]:
    np.add.at(counts, tokenizer.encode(doc.text), 1)
  logp = np.log2(counts / counts.sum())
  bits = chars = 0.0
  for doc in splits["validation"]:
    ids = tokenizer.encode(doc.text)
    bits -= logp[ids].sum()
    chars += len(doc.text)
  return float(bits / max(chars, 1.0))


# =================================================================================
# Loop
# =================================================================================

def _say(msg: str) -> None:
  """Progress output (stdout, flushed): absl's INFO stream is left to libraries."""
  print(msg, flush=True)


def train_and_evaluate(config, workdir: str, *, stop_at: int | None = None) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it has a checkpoint) and evaluates.

  stop_at: end the run after this step (checkpointing first), as if it had been
  interrupted there; the schedule still follows `config.train.steps`. For tests
  and notebooks.
  Returns a summary dict: final step, last train metrics, validation bits/char per
  domain, throughput.
  """
  config_lib.validate(config)
  sharding.validate(config)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0

  data = build_data(config, workdir)
  config = with_vocab(config, data.tokenizer.vocab_size)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.logical_rules(config.mesh_rules)
  model = build_model(config.model, data.glyph)
  tx = make_optimizer(config.train)
  shardings = state_shardings(model, tx, config, mesh, rules)
  batch_sh = sharding.batch_sharding(mesh, rules)

  def put(batch):
    return sharding.put_batch(batch, batch_sh)

  mngr = make_checkpoint_manager(workdir, config.train)
  if mngr.latest_step() is not None:
    state, data_state = restore_checkpoint(mngr, abstract_state(model, tx, config, shardings))
    data.train_iter.set_state(data_state)
    if is_main:
      _say(f"resumed from step {int(state.step)} ({workdir})")
  else:
    state = create_train_state(model, tx, config, mesh, rules)

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step_fn = jit_train_step(model, tx, config, mesh, rules, shardings)
    eval_fn = jax.jit(make_eval_step(model), out_shardings=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec()))
  eval_batches = stratified_eval_batches(data.splits["validation"], data.tokenizer, config)

  writer = metrics_io.MetricsWriter(workdir, enabled=is_main)
  t = config.train
  start = int(jax.device_get(state.step))
  tokens_per_step = config.data.batch_size * config.data.seq_len
  last_metrics: dict[str, float] = {}
  eval_res: dict[str, float] = {}
  timer = metrics_io.Throughput(tokens_per_step, total_steps=t.steps, start_step=start)
  for step in range(start + 1, t.steps + 1):
    batch = next(data.train_iter)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state, metrics = step_fn(state, put(batch))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if not math.isfinite(metrics["loss"]):
      raise NonFiniteLossError(
          f"non-finite loss {metrics['loss']} at step {step} (ce={metrics['ce']}, "
          f"aux={metrics['aux_loss']}); last checkpoint: {mngr.latest_step()}")
    timer.tick(step)
    last_metrics = metrics
    if step % t.log_every == 0 or step == t.steps:
      metrics.update(timer.rates())
      writer.write(step, metrics)
      if is_main:
        _say(metrics_io.progress_line(step, t.steps, metrics))
    if step % t.eval_every == 0 or step == t.steps:
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        eval_res = evaluate_bits_per_char(eval_fn, state, eval_batches, put)
      writer.write(step, {f"val/{k}": v for k, v in eval_res.items()})
      if is_main:
        _say(f"step {step} validation " + " ".join(f"{k}={v:.3f}" for k, v in eval_res.items()))
    if step % t.checkpoint_every == 0 or step == t.steps or step == stop_at:
      save_checkpoint(mngr, state, data.train_iter.get_state())
    if step == stop_at:
      break
  writer.close()
  summary = dict(step=int(jax.device_get(state.step)), train=last_metrics, validation=eval_res,
                 tokens_per_sec=timer.rates().get("tokens_per_sec"))
  if is_main:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  mngr.close()
  return summary
