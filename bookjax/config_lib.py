"""Config defaults, big_vision-style string arguments, and validation.

Experiment configs live in `experiments/configs/*.py` and expose `get_config(arg)`.
They start from `default_config()` here, so every config has the same schema and a
typo in an override (`--config.model.d_modle=…`) fails loudly in ml_collections.

`validate(config)` is called before anything is compiled; it raises `ValueError`
naming the offending field (e.g. `config.model.attention.num_heads`).
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a big_vision-style config argument, e.g. `"steps=200,runlocal"`.

  Each `key=value` is cast to the type of `defaults[key]`; a bare `key` sets a
  boolean to True. Unknown keys raise a `ValueError` naming the key.
  """
  out = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(
          f"Unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...)")
      out[key] = True
      continue
    if isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"Config argument {key!r} expects true/false, got {value!r}")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def default_attention_config() -> ml_collections.ConfigDict:
  """Attention settings shared by MHA and MLA(-3D)."""
  return ml_collections.ConfigDict(dict(
      kind="mha",              # 'mha' | 'mla'
      num_heads=4,
      head_dim=32,             # MHA only: per-head width of q, k and v
      impl="full",             # 'full' | 'blockwise' (online softmax, linear memory)
      block_size=128,          # query/key block for impl='blockwise'
      rope_theta=10000.0,
      rope_interleave=False,   # MLA: RoPE input pairs (2i, 2i+1) as in DeepSeek checkpoints
      # --- MLA (DeepSeek-V2/V3) ---
      q_lora_rank=64,          # 0: direct query projection
      kv_lora_rank=32,
      qk_nope_head_dim=16,
      qk_rope_head_dim=16,
      v_head_dim=32,
      # --- MLA-3D dimensions: comma-separated subset of semantic,glyph,cultural ---
      dims="",
      # sentence-distance buckets: exact below num_buckets//2, log-spaced to max_distance;
      # memory: one extra key/value slot per finished earlier sentence (mean latent)
      semantic=dict(num_buckets=8, num_heads=0, max_distance=32, memory=False),
      # glyph heads: the first num_heads heads (0: every head) get a glyph channel
      glyph=dict(num_heads=1, head_dim=16, embed_dim=32),
      # cultural heads: the last num_heads heads (0: every head) get a register channel
      cultural=dict(num_registers=4, num_heads=0),
      # --- YaRN scaling of the RoPE slice (factor 1: off); as HF transformers ---
      yarn=dict(factor=1.0, original_max_len=4096, beta_fast=32.0,
                beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0, truncate=True),
  ))


def default_forest_config() -> ml_collections.ConfigDict:
  """Expert Forest settings (formulas in bookjax/model/forest/, see its __init__).

  Tiers are stacks of same-shape experts; a tier with num_experts=0 (and top_k=0)
  is absent. Global expert ids follow the order light, deep, super.
  """
  return ml_collections.ConfigDict(dict(
      routing_depth=3,           # 1 flat, 2 tier->expert, 3 domain->tier->expert
      num_domains=3,             # level-1 domains (basic / professional / innovative)
      domain_supervision=0.0,    # weight of CE from corpus domain labels (0: off)
      domain_label_map=(),       # corpus domain id -> router domain (-1: none); (): identity
      num_corpus_domains=4,      # corpus domains in the data (tier-usage-by-domain stats)
      tiers=dict(
          light=dict(num_experts=8, d_ff=64, depth=1, top_k=2),   # narrow SwiGLU
          deep=dict(num_experts=4, d_ff=64, depth=2, top_k=1),    # depth >= 2 sub-layers
          super=dict(num_experts=2, d_ff=256, depth=1, top_k=1),  # wide SwiGLU
      ),
      tier_top_k=1,              # depth 2/3: how many tiers a token visits
      tier_gate="prob",          # depth 2/3: gate factor of a visited tier: 'prob' = p_tier,
                                 #   'unit' = p_tier / stop_gradient(p_tier) (value 1)
      top_k=2,                   # depth 1: experts per token over all tiers
      num_shared=0,              # always-on shared experts (merged into one SwiGLU)
      shared_d_ff=128,           # width of each shared expert
      score_fn="softmax",        # expert scores: 'softmax' | 'sigmoid'
      num_groups=1,              # depth 1: group-limited top-k (DeepSeek-V3)
      topk_groups=1,             # depth 1: groups kept per token
      norm_topk=True,            # renormalise expert gates over the chosen k
      route_scale=1.0,           # multiplies every routed gate
      dispatch="sorted",         # 'sorted' | 'capacity' | 'ragged_dot' | 'dense_loop'
      capacity_factor=1.25,      # 'capacity': slots per expert / expected load
      block_size=128,            # 'sorted': full row tile of the grouped matmul (power of 2)
      min_block_size=16,         # 'sorted': smallest tile; padding < this per expert
      batched_factor=0.75,       # 'sorted': rows/expert run as one batched einsum,
                                 #   x nominal load; the rest via the tile loop (0: loop only)
      bias_update_rate=1e-3,     # aux-loss-free bias step (0: off)
      balance_loss_weight=1e-3,  # sequence-wise balance loss
      z_loss_weight=1e-4,        # router z-loss
      compute_loss_weight=1e-3,  # compute-aware tier term
      nominal_tier_mix=dict(light=0.6, deep=0.3, super=0.1),  # budget: share per tier
  ))


def default_model_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      vocab_size=0,              # 0: taken from the tokenizer at run time
      d_model=128,
      num_layers=4,
      num_dense_layers=1,        # first blocks use a dense FFN when ffn.kind='forest'
      tie_embeddings=True,
      compute_dtype="float32",   # 'float32' | 'bfloat16'
      param_dtype="float32",
      init_std=0.02,
      rms_eps=1e-6,
      attention=default_attention_config(),
      ffn=dict(kind="dense", d_ff=256, forest=default_forest_config()),
  ))


def default_config() -> ml_collections.ConfigDict:
  """The full schema with tiny CPU-sized defaults."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = dict(
      seq_len=128,
      batch_size=16,
      min_count=2,               # characters seen fewer times fall back to bytes
      mixture=dict(news=1.0, reviews=1.0, cantonese=1.0, poetry=1.0),
      max_docs_per_domain=0,     # 0: all documents
      seed=0,
  )
  c.model = default_model_config()
  c.train = dict(
      steps=300,
      lr=3e-3,
      warmup_steps=30,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      grad_clip=1.0,
      b1=0.9,
      b2=0.95,
      log_every=20,
      eval_every=100,
      eval_batches=8,
      checkpoint_every=100,
      max_to_keep=2,
  )
  c.mesh = dict(data=-1, fsdp=1, expert=1, tensor=1)
  c.mesh_rules = ()             # overrides: tuple of (logical_axis, mesh_axes)
  return c


def _fill_missing(saved: dict, defaults: dict) -> dict:
  out = dict(saved)
  for key, value in defaults.items():
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = _fill_missing(out[key], value)
  return out


def load_json(path: str) -> ml_collections.ConfigDict:
  """A config saved as JSON (a workdir's config.json), with fields added to the
  schema since it was written filled from today's defaults.

  Saved values always win; only keys absent from the file are added, so a run
  written before a new option existed loads with that option's default (for
  options that default to the old behaviour, the run's behaviour is unchanged).
  """
  import json  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: no such config file")
  with open(path, encoding="utf-8") as f:
    saved = json.load(f)
  return ml_collections.ConfigDict(_fill_missing(saved, default_config().to_dict()))


# --------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------

def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ValueError(f"config.{field}: {msg}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks a full config; raises ValueError naming the field. Compiles nothing."""
  d = config.data
  _require(d.seq_len >= 2, "data.seq_len", f"must be >= 2, got {d.seq_len}")
  _require(d.batch_size >= 1, "data.batch_size", f"must be >= 1, got {d.batch_size}")
  _require(d.min_count >= 1, "data.min_count", f"must be >= 1, got {d.min_count}")
  from bookjax.data import corpus  # local: keeps config_lib import-light
  for name, w in dict(d.mixture).items():
    _require(name in corpus.DOMAINS, f"data.mixture.{name}",
             f"unknown domain; known: {list(corpus.DOMAINS)}")
    _require(w >= 0, f"data.mixture.{name}", f"weight must be >= 0, got {w}")
  _require(sum(dict(d.mixture).values()) > 0, "data.mixture", "all weights are 0")
  validate_model(config.model)
  t = config.train
  _require(t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
  _require(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
  _require(0 <= t.warmup_steps <= t.steps, "train.warmup_steps",
           f"must lie in [0, train.steps={t.steps}], got {t.warmup_steps}")
  _require(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {t.grad_clip}")
  for k in ("log_every", "eval_every", "checkpoint_every", "eval_batches"):
    _require(t[k] >= 1, f"train.{k}", f"must be >= 1, got {t[k]}")


def validate_model(m: ml_collections.ConfigDict, prefix: str = "model") -> None:
  """Checks the model section (and its attention / FFN subsections)."""
  _require(m.vocab_size >= 0, f"{prefix}.vocab_size", "must be >= 0 (0: from tokenizer)")
  _require(m.d_model >= 1, f"{prefix}.d_model", f"must be >= 1, got {m.d_model}")
  _require(m.num_layers >= 1, f"{prefix}.num_layers", f"must be >= 1, got {m.num_layers}")
  _require(0 <= m.num_dense_layers <= m.num_layers, f"{prefix}.num_dense_layers",
           f"must lie in [0, num_layers={m.num_layers}], got {m.num_dense_layers}")
  for k in ("compute_dtype", "param_dtype"):
    _require(m[k] in ("float32", "bfloat16"), f"{prefix}.{k}",
             f"must be 'float32' or 'bfloat16', got {m[k]!r}")
  from bookjax.model import attention, ffn  # local: avoid import cycles
  attention.validate_config(m.attention, m, f"{prefix}.attention")
  ffn.validate_config(m.ffn, m, f"{prefix}.ffn")
