"""DeepSeek-V3 checkpoints (Hugging Face `transformers` layout) <-> bookjax models.

`import_checkpoint(path)` reads a `DeepseekV3ForCausalLM` checkpoint directory
(config.json + safetensors, sharded or not) into a bookjax config and parameter
tree of the flat-routing Expert Forest (routing_depth 1, one tier) with MLA
attention. `export_checkpoint(config, params, router_bias, path)` writes one back.
Neither needs torch or transformers; the tests compare against them.

Config mapping (HF field -> bookjax; HF defaults apply to missing fields):
  vocab_size, hidden_size, num_hidden_layers -> model.vocab_size, d_model, num_layers
  first_k_dense_replace, intermediate_size  -> model.num_dense_layers, ffn.d_ff
  n_routed_experts, moe_intermediate_size   -> forest.tiers.light.num_experts, .d_ff
  num_experts_per_tok                        -> forest.top_k (routing_depth 1)
  n_group, topk_group                        -> forest.num_groups, topk_groups
  routed_scaling_factor, norm_topk_prob      -> forest.route_scale, norm_topk
  n_shared_experts                           -> forest.num_shared=1, shared_d_ff=n*moe_d_ff
  scoring_func 'sigmoid' / topk_method 'noaux_tc' -> forest.score_fn='sigmoid'
  num_attention_heads, q_lora_rank (None->0), kv_lora_rank, qk_nope_head_dim,
  qk_rope_head_dim, v_head_dim              -> attention.* (kind 'mla')
  rope_theta, rope_interleave               -> attention.rope_theta, rope_interleave
  rope_scaling / rope_parameters (yarn)     -> attention.yarn (factor, original_max_len,
                                               beta_fast, beta_slow, mscale, mscale_all_dim,
                                               truncate)
  rms_norm_eps, initializer_range           -> model.rms_eps, init_std
  tie_word_embeddings                       -> imported untied (lm_head = embed_tokens)

Weight mapping (torch Linear weights are [out, in]; bookjax kernels [in, out...]):
  model.embed_tokens.weight                 -> embedding [V, D]
  lm_head.weight.T                          -> unembed/kernel [D, V]
  model.norm.weight                         -> final_norm/scale
  layers.i.input_layernorm / post_attention_layernorm -> block_i/pre_attention_norm /
                                               pre_ffn_norm
  layers.i.self_attn.*                      -> block_i/attention/* (mla.py's docstring)
  layers.i.mlp.{gate,up,down}_proj (dense)  -> block_i/ffn/mlp/{wi_gate,wi_up,wo}/kernel
  layers.i.mlp.gate.weight.T                -> block_i/ffn/router_light [D, E]
  layers.i.mlp.gate.e_score_correction_bias -> router_bias block_i/ffn/expert_bias_light
  layers.i.mlp.experts.{e}.{gate,up,down}_proj.weight   (official, per expert) or
  layers.i.mlp.experts.gate_up_proj [E, 2F, D], .down_proj [E, D, F]  (fused)
                                            -> block_i/ffn/light/{wi_gate,wi_up,wo} [E,1,D,F]
  layers.i.mlp.shared_experts.*             -> block_i/ffn/shared/{wi_gate,wi_up,wo}/kernel

FP8 checkpoints (the official release: float8_e4m3 weights with 128x128 block
`weight_scale_inv`) are dequantised on load. The multi-token-prediction layers
(`model.layers.{num_hidden_layers}...`) are skipped. Anything else bookjax cannot
represent is refused with `UnsupportedCheckpointError` naming the field.

Weights are read lazily, one tensor (one expert) at a time, through `safe_open`;
`on_tensor` lets a caller place each finished parameter (e.g. `jax.device_put` with
its sharding) before the next is read, so the whole checkpoint is never in host
memory at once unless the caller keeps it.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import ml_collections
import ml_dtypes
import numpy as np

from bookjax import config_lib

ARCHITECTURE = "DeepseekV3ForCausalLM"
MODEL_TYPE = "deepseek_v3"
TIER = "light"                     # the single tier a flat DeepSeek-V3 forest uses
LATENT_NORM_EPS = 1e-6             # HF's q_a_layernorm / kv_a_layernorm eps (fixed)
DEFAULT_SHARD_BYTES = 5 * 2 ** 30

# HF DeepseekV3Config defaults (transformers 5.x), for fields missing in config.json.
HF_DEFAULTS: dict[str, Any] = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=None,
    n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512,
    q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
    topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
    hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True, attention_bias=False,
    rope_theta=10000.0)

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
              "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


class UnsupportedCheckpointError(ValueError):
  """The checkpoint (or config) uses something bookjax cannot represent."""


def _dtype(name: Optional[str]):
  if name is None:
    return None
  return {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[name]


# =================================================================================
# Config
# =================================================================================

def read_hf_config(path: str) -> dict[str, Any]:
  """config.json of a checkpoint directory, as a dict."""
  with open(os.path.join(path, "config.json")) as f:
    return json.load(f)


def _rope_dict(hf: Mapping[str, Any]) -> dict[str, Any]:
  """The RoPE settings of an HF config, old (`rope_scaling`) or new (`rope_parameters`)."""
  rope = dict(hf.get("rope_parameters") or {})
  for k, v in dict(hf.get("rope_scaling") or {}).items():
    rope.setdefault(k, v)
  rope.setdefault("rope_theta", hf.get("rope_theta", HF_DEFAULTS["rope_theta"]))
  kind = rope.get("rope_type", rope.get("type")) or "default"
  rope["rope_type"] = kind
  return rope


def _refuse(field: str, value: Any, why: str):
  raise UnsupportedCheckpointError(
      f"DeepSeek-V3 config field {field!r} = {value!r}: {why}")


def config_from_hf(hf: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A full bookjax config (default_config with the model section filled) for an HF
  DeepSeek-V3 config dict. Raises UnsupportedCheckpointError for what bookjax cannot
  represent."""
  def g(k):
    """The field's value; HF's default when absent (an explicit null stays None)."""
    return hf[k] if k in hf else HF_DEFAULTS.get(k)

  model_type = hf.get("model_type")
  archs = hf.get("architectures") or [ARCHITECTURE]
  if model_type != MODEL_TYPE:
    _refuse("model_type", model_type, f"only {MODEL_TYPE!r} checkpoints are supported")
  if ARCHITECTURE not in archs:
    _refuse("architectures", archs, f"expected {ARCHITECTURE}")
  if g("hidden_act") != "silu":
    _refuse("hidden_act", g("hidden_act"), "bookjax SwiGLU FFNs use silu only")
  if g("attention_bias"):
    _refuse("attention_bias", True, "bookjax MLA projections have no biases")
  heads = int(g("num_attention_heads"))
  kv_heads = hf.get("num_key_value_heads")
  if kv_heads not in (None, heads):
    _refuse("num_key_value_heads", kv_heads,
            f"MLA has one latent per token; must equal num_attention_heads={heads}")
  if hf.get("scoring_func", "sigmoid") != "sigmoid":
    _refuse("scoring_func", hf["scoring_func"], "DeepSeek-V3 routing scores are sigmoid")
  if hf.get("topk_method", "noaux_tc") != "noaux_tc":
    _refuse("topk_method", hf["topk_method"],
            "only 'noaux_tc' (group-limited top-k with selection bias) is supported")
  if int(hf.get("moe_layer_freq", 1) or 1) != 1:
    _refuse("moe_layer_freq", hf["moe_layer_freq"], "every layer after the dense ones must be MoE")
  if int(hf.get("pretraining_tp", 1) or 1) != 1:
    _refuse("pretraining_tp", hf["pretraining_tp"], "only 1 (no sliced projections)")
  q = hf.get("quantization_config")
  if q and not (q.get("quant_method") == "fp8" and q.get("fmt", "e4m3") == "e4m3"):
    _refuse("quantization_config", q, "only DeepSeek's block-wise fp8 (e4m3) can be dequantised")
  eps = float(g("rms_norm_eps"))
  if eps != LATENT_NORM_EPS:
    _refuse("rms_norm_eps", eps,
            f"HF fixes the latent norms' eps at {LATENT_NORM_EPS} while bookjax MLA uses "
            f"model.rms_eps for every norm, so only {LATENT_NORM_EPS} maps exactly")
  rope = _rope_dict(hf)
  if float(rope.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
    _refuse("rope_parameters.partial_rotary_factor", rope["partial_rotary_factor"], "must be 1")

  layers = int(g("num_hidden_layers"))
  first_k = g("first_k_dense_replace")
  first_k = 0 if first_k is None else int(first_k)
  experts = int(g("n_routed_experts"))
  top_k = int(g("num_experts_per_tok"))
  n_group = int(g("n_group") or 1)
  topk_group = int(g("topk_group") or 1)
  norm_topk = bool(g("norm_topk_prob"))
  moe_ff = int(g("moe_intermediate_size"))
  n_shared = int(g("n_shared_experts") or 0)
  if first_k < layers:
    if experts % n_group:
      _refuse("n_group", n_group, f"must divide n_routed_experts={experts}")
    if n_group > 1 and experts // n_group < 2:
      _refuse("n_group", n_group, "HF scores a group by its top-2 experts: groups need >= 2")
    if not 1 <= topk_group <= n_group:
      _refuse("topk_group", topk_group, f"must lie in [1, n_group={n_group}]")
    if not 1 <= top_k <= topk_group * (experts // n_group):
      _refuse("num_experts_per_tok", top_k,
              f"must lie in [1, topk_group * experts per group = "
              f"{topk_group * (experts // n_group)}]")
    if top_k == 1 and norm_topk:
      _refuse("norm_topk_prob", True,
              "with num_experts_per_tok=1 HF normalises the single gate to 1; the bookjax "
              "forest keeps the raw score at k=1 (so the router trains)")

  c = config_lib.default_config()
  m = c.model
  m.vocab_size = int(g("vocab_size"))
  m.d_model = int(g("hidden_size"))
  m.num_layers = layers
  m.num_dense_layers = min(first_k, layers)
  m.tie_embeddings = False
  m.init_std = float(g("initializer_range"))
  m.rms_eps = eps

  a = m.attention
  a.kind = "mla"
  a.num_heads = heads
  a.q_lora_rank = int(g("q_lora_rank") or 0)
  a.kv_lora_rank = int(g("kv_lora_rank"))
  a.qk_nope_head_dim = int(g("qk_nope_head_dim"))
  a.qk_rope_head_dim = int(g("qk_rope_head_dim"))
  if g("v_head_dim") is None:
    _refuse("v_head_dim", None, "must be set")
  a.v_head_dim = int(g("v_head_dim"))
  a.rope_theta = float(rope["rope_theta"])
  a.rope_interleave = bool(g("rope_interleave"))
  a.dims = ""
  kind = rope["rope_type"]
  if kind == "yarn":
    original = rope.get("original_max_position_embeddings",
                        hf.get("original_max_position_embeddings"))
    if original is None:
      _refuse("rope_scaling.original_max_position_embeddings", None, "required for yarn")
    factor = rope.get("factor")
    if factor is None:
      factor = float(g("max_position_embeddings")) / float(original)
    y = a.yarn
    y.factor = float(factor)
    y.original_max_len = int(original)
    y.beta_fast = float(rope.get("beta_fast") or 32.0)
    y.beta_slow = float(rope.get("beta_slow") or 1.0)
    y.mscale = float(rope.get("mscale") or 0.0)
    y.mscale_all_dim = float(rope.get("mscale_all_dim") or 0.0)
    y.truncate = bool(rope.get("truncate", True))
    if y.mscale == 0.0 and y.mscale_all_dim == 0.0:
      y.mscale = 1.0
    if rope.get("attention_factor") is not None:
      from bookjax.model import rope as rope_lib  # pylint: disable=g-import-not-at-top
      want = rope_lib.yarn_attention_factor(y)
      if not math.isclose(float(rope["attention_factor"]), want, rel_tol=1e-9):
        _refuse("rope_scaling.attention_factor", rope["attention_factor"],
                f"bookjax derives it from factor/mscale/mscale_all_dim (= {want})")
  elif kind != "default":
    _refuse("rope_scaling.type", kind, "only default RoPE and 'yarn' are supported")

  if first_k >= layers:
    m.ffn.kind = "dense"
  else:
    m.ffn.kind = "forest"
  m.ffn.d_ff = int(g("intermediate_size"))
  f = m.ffn.forest
  f.routing_depth = 1
  f.tiers = dict(light=dict(num_experts=experts, d_ff=moe_ff, depth=1, top_k=min(top_k, experts)),
                 deep=dict(num_experts=0, d_ff=moe_ff, depth=2, top_k=0),
                 super=dict(num_experts=0, d_ff=moe_ff, depth=1, top_k=0))
  f.nominal_tier_mix = dict(light=1.0, deep=0.0, super=0.0)
  f.top_k = top_k
  f.score_fn = "sigmoid"
  f.num_groups = n_group
  f.topk_groups = topk_group
  f.norm_topk = norm_topk
  f.route_scale = float(g("routed_scaling_factor"))
  f.num_shared = 1 if n_shared > 0 else 0
  f.shared_d_ff = n_shared * moe_ff if n_shared > 0 else moe_ff
  f.compute_loss_weight = 0.0        # one tier: nothing to balance across tiers
  f.balance_loss_weight = 1e-4       # DeepSeek-V3's sequence-wise alpha
  f.z_loss_weight = 0.0              # DeepSeek-V3 uses none
  config_lib.validate_model(m)
  return c


def _model_cfg(config):
  return config.model if "model" in config else config


def config_to_hf(config, max_position_embeddings: Optional[int] = None) -> dict[str, Any]:
  """The HF config.json dict of a bookjax model config (raises for non-DeepSeek-V3 shapes)."""
  m = _model_cfg(config)
  check_exportable(m)
  a = m.attention
  dense = m.ffn.kind == "dense"
  f = m.ffn.forest
  tier = f.tiers[TIER]
  moe_ff = int(tier.d_ff)
  n_shared = 0
  if not dense and f.num_shared > 0:
    n_shared = (int(f.num_shared) * int(f.shared_d_ff)) // moe_ff
  hf: dict[str, Any] = dict(
      architectures=[ARCHITECTURE], model_type=MODEL_TYPE,
      vocab_size=int(m.vocab_size), hidden_size=int(m.d_model),
      intermediate_size=int(m.ffn.d_ff), moe_intermediate_size=moe_ff,
      num_hidden_layers=int(m.num_layers), num_attention_heads=int(a.num_heads),
      num_key_value_heads=int(a.num_heads), n_shared_experts=n_shared,
      n_routed_experts=int(tier.num_experts), routed_scaling_factor=float(f.route_scale),
      kv_lora_rank=int(a.kv_lora_rank),
      q_lora_rank=int(a.q_lora_rank) if a.q_lora_rank > 0 else None,
      qk_rope_head_dim=int(a.qk_rope_head_dim), v_head_dim=int(a.v_head_dim),
      qk_nope_head_dim=int(a.qk_nope_head_dim), n_group=int(f.num_groups),
      topk_group=int(f.topk_groups), num_experts_per_tok=int(f.top_k),
      first_k_dense_replace=int(m.num_layers if dense else m.num_dense_layers),
      norm_topk_prob=bool(f.norm_topk and f.top_k > 1), hidden_act="silu",
      initializer_range=float(m.init_std), rms_norm_eps=float(m.rms_eps),
      tie_word_embeddings=False, rope_theta=float(a.rope_theta),
      rope_interleave=bool(a.rope_interleave), attention_bias=False,
      scoring_func="sigmoid", topk_method="noaux_tc", num_nextn_predict_layers=0,
      torch_dtype="float32")
  y = a.yarn
  if float(y.factor) > 1.0:
    hf["rope_scaling"] = dict(type="yarn", rope_type="yarn", factor=float(y.factor),
                              original_max_position_embeddings=int(y.original_max_len),
                              beta_fast=float(y.beta_fast), beta_slow=float(y.beta_slow),
                              mscale=float(y.mscale), mscale_all_dim=float(y.mscale_all_dim))
    if not y.get("truncate", True):
      hf["rope_scaling"]["truncate"] = False
    hf["max_position_embeddings"] = int(round(y.original_max_len * y.factor))
  else:
    hf["rope_scaling"] = None
    hf["max_position_embeddings"] = int(max_position_embeddings or 4096)
  return hf


def check_exportable(m) -> None:
  """Raises UnsupportedCheckpointError unless the model has DeepSeek-V3's shape."""
  def req(cond, field, msg):
    if not cond:
      raise UnsupportedCheckpointError(f"config.model.{field}: {msg} (DeepseekV3ForCausalLM)")
  a = m.attention
  req(a.kind == "mla", "attention.kind", f"must be 'mla', got {a.kind!r}")
  req(not str(a.dims).strip(), "attention.dims",
      f"MLA-3D dimensions have no DeepSeek-V3 counterpart, got {a.dims!r}")
  req(float(m.rms_eps) == LATENT_NORM_EPS, "rms_eps",
      f"must be {LATENT_NORM_EPS} (HF's fixed latent-norm eps), got {m.rms_eps}")
  if m.ffn.kind == "dense":
    return
  f = m.ffn.forest
  req(m.ffn.kind == "forest", "ffn.kind", f"must be 'dense' or 'forest', got {m.ffn.kind!r}")
  req(f.routing_depth == 1, "ffn.forest.routing_depth",
      f"must be 1 (flat top-k), got {f.routing_depth}")
  present = [n for n in f.tiers if f.tiers[n].num_experts > 0]
  req(present == [TIER], "ffn.forest.tiers",
      f"DeepSeek-V3 has one expert shape: only the '{TIER}' tier may be present, got {present}")
  req(f.tiers[TIER].depth == 1, f"ffn.forest.tiers.{TIER}.depth",
      f"must be 1, got {f.tiers[TIER].depth}")
  req(f.score_fn == "sigmoid", "ffn.forest.score_fn", f"must be 'sigmoid', got {f.score_fn!r}")
  e, groups = int(f.tiers[TIER].num_experts), int(f.num_groups)
  req(groups == 1 or e // groups >= 2, "ffn.forest.num_groups",
      "HF scores a group by its top-2 experts: groups need >= 2 experts")
  if f.num_shared > 0:
    width = int(f.num_shared) * int(f.shared_d_ff)
    req(width % int(f.tiers[TIER].d_ff) == 0, "ffn.forest.shared_d_ff",
        f"num_shared * shared_d_ff = {width} must be a multiple of the expert width "
        f"{f.tiers[TIER].d_ff} (HF: n_shared_experts * moe_intermediate_size)")


# =================================================================================
# Reading safetensors lazily
# =================================================================================

class CheckpointReader:
  """Lazy, tensor-by-tensor access to a checkpoint directory's safetensors files.

  Reads `model.safetensors.index.json` when present, else every `*.safetensors`
  file. `get(name)` reads one tensor (optionally one index of its first axis);
  fp8 weights with a `<name>_scale_inv` companion are dequantised block-wise.
  """

  def __init__(self, path: str, fp8_block: Sequence[int] = (128, 128)):
    self.path = path
    self.fp8_block = tuple(int(b) for b in fp8_block)
    index = os.path.join(path, "model.safetensors.index.json")
    self._where: dict[str, str] = {}
    if os.path.exists(index):
      with open(index) as f:
        self._where = dict(json.load(f)["weight_map"])
    else:
      files = sorted(x for x in os.listdir(path) if x.endswith(".safetensors"))
      if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
      for fn in files:
        for name in self._header(fn):
          self._where[name] = fn
    self._handles: dict[str, Any] = {}
    self._headers: dict[str, dict] = {}
    self.consumed: set[str] = set()

  def _header(self, fn: str) -> dict:
    """The JSON header of a safetensors file (name -> dtype, shape, data_offsets)."""
    with open(os.path.join(self.path, fn), "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header

  def _meta(self, name: str) -> dict:
    fn = self._where[name]
    if fn not in self._headers:
      self._headers[fn] = self._header(fn)
    return self._headers[fn][name]

  def _handle(self, fn: str):
    if fn not in self._handles:
      from safetensors import safe_open  # pylint: disable=g-import-not-at-top
      self._handles[fn] = safe_open(os.path.join(self.path, fn), framework="numpy")
    return self._handles[fn]

  @property
  def names(self) -> list[str]:
    return sorted(self._where)

  def __contains__(self, name: str) -> bool:
    return name in self._where

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._meta(name)["shape"])

  def _read_raw(self, name: str, index: Optional[int]) -> np.ndarray:
    """Reads bytes straight from the file (dtypes safetensors' numpy API lacks)."""
    meta, fn = self._meta(name), self._where[name]
    dt = np.dtype(_ST_DTYPES[meta["dtype"]])
    shape = tuple(meta["shape"])
    start, end = meta["data_offsets"]
    with open(os.path.join(self.path, fn), "rb") as f:
      n = struct.unpack("<Q", f.read(8))[0]
      base = 8 + n + start
      if index is not None:
        row = int(np.prod(shape[1:])) * dt.itemsize
        f.seek(base + index * row)
        return np.frombuffer(f.read(row), dt).reshape(shape[1:])
      f.seek(base)
      return np.frombuffer(f.read(end - start), dt).reshape(shape)

  def get(self, name: str, index: Optional[int] = None, dtype=np.float32) -> np.ndarray:
    """Tensor `name` (or its `[index]` slice along axis 0), cast to `dtype`."""
    if name not in self._where:
      raise KeyError(f"tensor {name!r} not found in {self.path}")
    self.consumed.add(name)
    st_dtype = self._meta(name)["dtype"]
    if st_dtype.startswith("F8"):
      x = self._read_raw(name, index).astype(np.float32)
      scale_name = name + "_scale_inv"
      if scale_name in self._where:
        if index is not None:
          raise UnsupportedCheckpointError(f"{name}: fp8 scales of a fused expert tensor")
        x = self._dequantize(x, self.get(scale_name, dtype=np.float32))
    else:
      h = self._handle(self._where[name])
      x = h.get_slice(name)[index] if index is not None else h.get_tensor(name)
      x = np.asarray(x)
    return x.astype(dtype) if dtype is not None and x.dtype != dtype else x

  def _dequantize(self, w: np.ndarray, scale_inv: np.ndarray) -> np.ndarray:
    """w * scale_inv, one scale per (block_rows x block_cols) tile."""
    br, bc = self.fp8_block
    s = np.repeat(np.repeat(scale_inv, br, axis=0), bc, axis=1)[:w.shape[0], :w.shape[1]]
    return w * s


# =================================================================================
# The tensor map
# =================================================================================

@dataclasses.dataclass(frozen=True)
class Entry:
  """One bookjax leaf <-> one HF tensor (or a stack of per-expert tensors).

  kind: 'copy' (same layout); 'linear' (bookjax = W.T reshaped; `n_in` leading
  bookjax dims form the input); 'gate' / 'up' / 'down' (stacked routed experts
  [E, 1, D, F] / [E, 1, F, D]). hf: the HF name, or the layer prefix
  '...mlp.experts' for expert entries.
  """
  collection: str
  path: tuple[str, ...]
  hf: str
  kind: str = "linear"
  n_in: int = 1


def tensor_map(model_cfg) -> list[Entry]:
  """Every bookjax leaf of a DeepSeek-V3-shaped model and its HF tensor."""
  m = model_cfg
  a = m.attention
  out = [Entry("params", ("embedding",), "model.embed_tokens.weight", "copy"),
         Entry("params", ("final_norm", "scale"), "model.norm.weight", "copy"),
         Entry("params", ("unembed", "kernel"), "lm_head.weight")]
  dense_all = m.ffn.kind == "dense"
  for i in range(m.num_layers):
    b, hf = f"block_{i}", f"model.layers.{i}"
    at, sa = (b, "attention"), f"{hf}.self_attn"
    out += [Entry("params", (b, "pre_attention_norm", "scale"), f"{hf}.input_layernorm.weight",
                  "copy"),
            Entry("params", (b, "pre_ffn_norm", "scale"), f"{hf}.post_attention_layernorm.weight",
                  "copy")]
    if a.q_lora_rank > 0:
      out += [Entry("params", at + ("q_a_proj",), f"{sa}.q_a_proj.weight"),
              Entry("params", at + ("q_a_layernorm", "scale"), f"{sa}.q_a_layernorm.weight",
                    "copy"),
              Entry("params", at + ("q_b_proj",), f"{sa}.q_b_proj.weight")]
    else:
      out.append(Entry("params", at + ("q_proj",), f"{sa}.q_proj.weight"))
    out += [Entry("params", at + ("kv_a_proj_with_mqa",), f"{sa}.kv_a_proj_with_mqa.weight"),
            Entry("params", at + ("kv_a_layernorm", "scale"), f"{sa}.kv_a_layernorm.weight",
                  "copy"),
            Entry("params", at + ("kv_b_proj",), f"{sa}.kv_b_proj.weight"),
            Entry("params", at + ("o_proj",), f"{sa}.o_proj.weight", n_in=2)]
    ff, mlp = (b, "ffn"), f"{hf}.mlp"
    if dense_all or i < m.num_dense_layers:
      out += [Entry("params", ff + ("mlp", "wi_gate", "kernel"), f"{mlp}.gate_proj.weight"),
              Entry("params", ff + ("mlp", "wi_up", "kernel"), f"{mlp}.up_proj.weight"),
              Entry("params", ff + ("mlp", "wo", "kernel"), f"{mlp}.down_proj.weight")]
      continue
    out += [Entry("params", ff + (f"router_{TIER}",), f"{mlp}.gate.weight"),
            Entry("router_bias", ff + (f"expert_bias_{TIER}",),
                  f"{mlp}.gate.e_score_correction_bias", "copy"),
            Entry("params", ff + (TIER, "wi_gate"), f"{mlp}.experts", "gate"),
            Entry("params", ff + (TIER, "wi_up"), f"{mlp}.experts", "up"),
            Entry("params", ff + (TIER, "wo"), f"{mlp}.experts", "down")]
    if m.ffn.forest.num_shared > 0:
      sh = f"{mlp}.shared_experts"
      out += [Entry("params", ff + ("shared", "wi_gate", "kernel"), f"{sh}.gate_proj.weight"),
              Entry("params", ff + ("shared", "wi_up", "kernel"), f"{sh}.up_proj.weight"),
              Entry("params", ff + ("shared", "wo", "kernel"), f"{sh}.down_proj.weight")]
  return out


def _set(tree: dict, path: Sequence[str], value) -> None:
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


# The forest stores each tier's gate and up projections side by side, wi
# [E, S, D, 2, F]; the HF mapping names them separately (virtual leaves
# <tier>/wi_gate and <tier>/wi_up, [E, S, D, F]) — these helpers translate.
_GATE_UP = {"wi_gate": 0, "wi_up": 1}


def _get(tree: Mapping, path: Sequence[str]):
  *parents, leaf = path
  for k in parents:
    tree = tree[k]
  if leaf in _GATE_UP and leaf not in tree and "wi" in tree:
    return np.asarray(_unbox(tree["wi"]))[..., _GATE_UP[leaf], :]
  return tree[leaf]


def _split_gate_up_shapes(shapes: dict) -> dict:
  """Expected shapes with each fused wi [.., 2, F] replaced by virtual wi_gate/wi_up."""
  out = {}
  for (coll, path), shape in shapes.items():
    if path[-1] == "wi" and len(shape) == 5 and shape[-2] == 2:
      for name in _GATE_UP:
        out[(coll, path[:-1] + (name,))] = shape[:-2] + shape[-1:]
    else:
      out[(coll, path)] = shape
  return out


def _unbox(x):
  return x.unbox() if hasattr(x, "unbox") else x


def expected_shapes(model_cfg) -> dict[tuple[str, tuple[str, ...]], tuple[int, ...]]:
  """(collection, path) -> shape of every variable, from `jax.eval_shape` (no allocation)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bookjax import accounting  # pylint: disable=g-import-not-at-top
  variables = accounting.abstract_variables(model_cfg)
  out = {}
  for coll in ("params", "router_bias"):
    if coll not in variables:
      continue
    flat = jax.tree_util.tree_flatten_with_path(
        variables[coll], is_leaf=lambda x: hasattr(x, "unbox"))[0]
    for path, leaf in flat:
      out[(coll, accounting._path_keys(path))] = tuple(_unbox(leaf).shape)  # pylint: disable=protected-access
  return out


# =================================================================================
# Import
# =================================================================================

@dataclasses.dataclass
class Imported:
  """An imported checkpoint: bookjax config, params, router bias, and notes."""
  config: ml_collections.ConfigDict
  params: dict
  router_bias: dict
  notes: list[str]
  hf_config: dict

  def variables(self) -> dict:
    """{'params': ..., 'router_bias': ...} for `model.apply`."""
    out = {"params": self.params}
    if self.router_bias:
      out["router_bias"] = self.router_bias
    return out


def _expert_layout(reader: CheckpointReader, prefix: str) -> str:
  if f"{prefix}.gate_up_proj" in reader:
    return "fused"
  if f"{prefix}.0.gate_proj.weight" in reader:
    return "per_expert"
  raise UnsupportedCheckpointError(
      f"no routed-expert tensors under {prefix!r}: expected {prefix}.gate_up_proj (fused) or "
      f"{prefix}.<e>.gate_proj.weight (per expert)")


def _load_entry(reader: CheckpointReader, e: Entry, shape: tuple[int, ...], dtype,
                tied: bool) -> np.ndarray:
  if e.kind == "copy":
    x = reader.get(e.hf, dtype=dtype)
  elif e.kind == "linear":
    name = e.hf
    if name == "lm_head.weight" and tied and name not in reader:
      name = "model.embed_tokens.weight"
    w = reader.get(name, dtype=dtype)
    x = np.ascontiguousarray(w.T).reshape(shape)
  else:
    n_exp = shape[0]
    x = np.empty(shape, dtype)
    layout = _expert_layout(reader, e.hf)
    for k in range(n_exp):
      if layout == "per_expert":
        proj = dict(gate="gate_proj", up="up_proj", down="down_proj")[e.kind]
        w = reader.get(f"{e.hf}.{k}.{proj}.weight", dtype=dtype)
      elif e.kind == "down":
        w = reader.get(f"{e.hf}.down_proj", index=k, dtype=dtype)           # [D, F]
      else:
        gu = reader.get(f"{e.hf}.gate_up_proj", index=k, dtype=dtype)       # [2F, D]
        f = gu.shape[0] // 2
        w = gu[:f] if e.kind == "gate" else gu[f:]
      x[k, 0] = w.T
      del w
  if x.shape != tuple(shape):
    raise UnsupportedCheckpointError(
        f"{e.hf}: shape {x.shape} does not fit bookjax {'/'.join(e.path)} {tuple(shape)}")
  return x


def import_checkpoint(path: str, *, dtype: str = "float32",
                      on_tensor: Optional[Callable[[str, tuple, np.ndarray], Any]] = None,
                      strict: bool = True) -> Imported:
  """Reads an HF DeepSeek-V3 checkpoint directory into bookjax params.

  dtype: parameter dtype ('float32' | 'bfloat16'); the config's param_dtype is set
  to it. on_tensor(collection, path, array) -> leaf: called for every finished
  leaf (default: keep the numpy array). strict: refuse unknown tensors.
  """
  hf = read_hf_config(path)
  config = config_from_hf(hf)
  config.model.param_dtype = dtype
  m = config.model
  q = hf.get("quantization_config") or {}
  reader = CheckpointReader(path, q.get("weight_block_size", (128, 128)))
  shapes = _split_gate_up_shapes(expected_shapes(m))
  tied = bool(hf.get("tie_word_embeddings", False))
  npdt = _dtype(dtype)
  notes: list[str] = []
  if tied:
    notes.append("tie_word_embeddings: imported as an untied copy (lm_head = embed_tokens)")
  trees: dict[str, dict] = {"params": {}, "router_bias": {}}
  entries = tensor_map(m)
  seen = set()
  pending: dict[tuple, dict] = {}
  for e in entries:
    key = (e.collection, e.path)
    if key not in shapes:
      raise UnsupportedCheckpointError(f"bookjax model has no variable {'/'.join(e.path)}")
    dt = np.float32 if e.collection == "router_bias" else npdt
    x = _load_entry(reader, e, shapes[key], dt, tied)
    seen.add(key)
    if e.path[-1] in _GATE_UP:  # fuse once both halves are read
      halves = pending.setdefault(e.path[:-1], {})
      halves[e.path[-1]] = x
      if len(halves) < 2:
        continue
      path = e.path[:-1] + ("wi",)
      x = np.stack([halves.pop("wi_gate"), halves.pop("wi_up")], axis=-2)
      del pending[e.path[:-1]]
    else:
      path = e.path
    _set(trees[e.collection], path, on_tensor(e.collection, path, x) if on_tensor else x)
  missing = sorted(set(shapes) - seen)
  if missing:
    raise UnsupportedCheckpointError(
        f"bookjax variables without an HF tensor: {['/'.join(p) for _, p in missing][:8]}")
  skipped, unknown = [], []
  for name in reader.names:
    if name in reader.consumed or name.endswith("rotary_emb.inv_freq"):
      continue
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers" and parts[2].isdigit() and \
        int(parts[2]) >= m.num_layers:
      skipped.append(name)
    elif name == "lm_head.weight" and tied:
      continue
    else:
      unknown.append(name)
  if skipped:
    notes.append(f"skipped {len(skipped)} tensors of layers >= num_hidden_layers="
                 f"{m.num_layers} (multi-token prediction)")
  if unknown and strict:
    raise UnsupportedCheckpointError(
        f"{len(unknown)} checkpoint tensors have no bookjax counterpart, e.g. {unknown[:5]}")
  if unknown:
    notes.append(f"ignored {len(unknown)} unknown tensors, e.g. {unknown[:5]}")
  if q:
    notes.append("fp8 weights dequantised block-wise")
  return Imported(config=config, params=trees["params"], router_bias=trees["router_bias"],
                  notes=notes, hf_config=hf)


# =================================================================================
# Export
# =================================================================================

def _np(x) -> np.ndarray:
  return np.asarray(_unbox(x))


def iter_hf_tensors(config, params, router_bias=None, *,
                    expert_layout: str = "per_expert") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) for every tensor of the checkpoint, one at a time.

  expert_layout: 'per_expert' (official release / transformers' saved layout) or
  'fused' (gate_up_proj [E, 2F, D] and down_proj [E, D, F] per layer).
  """
  m = _model_cfg(config)
  check_exportable(m)
  if expert_layout not in ("per_expert", "fused"):
    raise ValueError(f"expert_layout must be 'per_expert' or 'fused', got {expert_layout!r}")
  router_bias = router_bias or {}
  for e in tensor_map(m):
    if e.collection == "router_bias":
      try:
        x = _np(_get(router_bias, e.path)).astype(np.float32)
      except KeyError:
        n = int(m.ffn.forest.tiers[TIER].num_experts)
        x = np.zeros((n,), np.float32)
      yield e.hf, x
      continue
    if e.path == ("unembed", "kernel") and m.tie_embeddings:
      emb = _np(_get(params, ("embedding",)))
      yield e.hf, (emb.astype(np.float32) * (m.d_model ** -0.5)).astype(emb.dtype)
      continue
    x = _np(_get(params, e.path))
    if e.kind == "copy":
      yield e.hf, x
    elif e.kind == "linear":
      n_in = int(np.prod(x.shape[:e.n_in]))
      yield e.hf, np.ascontiguousarray(x.reshape(n_in, -1).T)
    elif e.kind in ("gate", "up", "down"):
      if expert_layout == "per_expert":
        proj = dict(gate="gate_proj", up="up_proj", down="down_proj")[e.kind]
        for k in range(x.shape[0]):
          yield f"{e.hf}.{k}.{proj}.weight", np.ascontiguousarray(x[k, 0].T)
      elif e.kind == "gate":
        up = _np(_get(params, e.path[:-1] + ("wi_up",)))
        yield f"{e.hf}.gate_up_proj", np.ascontiguousarray(
            np.concatenate([x[:, 0], up[:, 0]], axis=-1).transpose(0, 2, 1))
      elif e.kind == "down":
        yield f"{e.hf}.down_proj", np.ascontiguousarray(x[:, 0].transpose(0, 2, 1))


def export_checkpoint(config, params, router_bias, path: str, *,
                      expert_layout: str = "per_expert", dtype: Optional[str] = None,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
  """Writes an HF DeepSeek-V3 checkpoint directory (config.json + safetensors).

  dtype: cast weights ('float32' | 'bfloat16'; None keeps the params' dtype); the
  router weight and the selection bias stay float32 as in HF. Shards of at most
  `max_shard_bytes` with a model.safetensors.index.json when there are several.
  Returns the written file names.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  m = _model_cfg(config)
  hf_cfg = config_to_hf(m, max_position_embeddings=(config.data.seq_len if "data" in config
                                                      else None))
  os.makedirs(path, exist_ok=True)
  npdt = _dtype(dtype)
  if npdt is not None:
    hf_cfg["torch_dtype"] = dtype
  shards: list[dict[str, np.ndarray]] = [{}]
  sizes = [0]
  tmp_names: list[str] = []
  weight_map: dict[str, str] = {}
  total = 0

  def flush():
    name = f"model-{len(tmp_names) + 1:05d}.safetensors.tmp"
    save_file(shards[-1], os.path.join(path, name), metadata={"format": "pt"})
    tmp_names.append(name)
    for k in shards[-1]:
      weight_map[k] = name
    shards[-1] = {}
    sizes[-1] = 0

  for name, x in iter_hf_tensors(m, params, router_bias, expert_layout=expert_layout):
    keep32 = name.endswith("gate.weight") or name.endswith("e_score_correction_bias")
    if npdt is not None and not keep32:
      x = x.astype(npdt)
    x = np.ascontiguousarray(x)
    if sizes[-1] and sizes[-1] + x.nbytes > max_shard_bytes:
      flush()
    shards[-1][name] = x
    sizes[-1] += x.nbytes
    total += x.nbytes
  if shards[-1]:
    flush()
  n = len(tmp_names)
  final = (["model.safetensors"] if n == 1
           else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
  for tmp, fin in zip(tmp_names, final):
    os.replace(os.path.join(path, tmp), os.path.join(path, fin))
  rename = dict(zip(tmp_names, final))
  if n > 1:
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
      json.dump(dict(metadata=dict(total_size=total),
                     weight_map={k: rename[v] for k, v in sorted(weight_map.items())}), f,
                indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_cfg, f, indent=2)
  return final + (["model.safetensors.index.json"] if n > 1 else []) + ["config.json"]


# =================================================================================
# Running an imported model
# =================================================================================

def make_batch(tokens_BT: np.ndarray, length: Optional[int] = None) -> dict[str, np.ndarray]:
  """A bookjax input batch for plain token rows (one document per row).

  length: tokens past it are padding (segment id 0).
  """
  tokens_BT = np.asarray(tokens_BT, np.int32)
  b, t = tokens_BT.shape
  seg = np.ones((b, t), np.int32)
  if length is not None:
    seg[:, length:] = 0
  return dict(inputs=tokens_BT, segment_ids=seg,
              positions=np.tile(np.arange(t, dtype=np.int32), (b, 1)),
              sentence_ids=np.zeros((b, t), np.int32), domain=np.zeros((b, t), np.int32))


@functools.lru_cache(maxsize=8)
def _apply_fn(frozen_model_cfg):
  """A jitted (variables, batch) -> logits for a frozen model config (cached)."""
  import jax  # pylint: disable=g-import-not-at-top
  from bookjax.model import transformer  # pylint: disable=g-import-not-at-top
  model = transformer.Transformer(frozen_model_cfg)
  return jax.jit(lambda v, b: model.apply(v, b, mutable=["losses", "router_stats"])[0])


def bookjax_logits(config, variables, tokens_BT, length: Optional[int] = None) -> np.ndarray:
  """Logits [B, T, V] (float32) of a bookjax model on token rows (past `length`: padding)."""
  fn = _apply_fn(ml_collections.FrozenConfigDict(_model_cfg(config)))
  return np.asarray(fn(variables, make_batch(tokens_BT, length)))


def greedy_continuation(config, variables, prompt_T: Sequence[int], steps: int) -> list[int]:
  """Greedy decoding by re-running the full sequence (no cache), one compile.

  The prompt and its continuation live in a fixed buffer of len(prompt)+steps
  whose unwritten tail is padding; causal attention and dropless routing make it
  irrelevant to the positions already written.
  """
  n = len(prompt_T)
  buf = np.zeros((1, n + steps), np.int32)
  buf[0, :n] = prompt_T
  out = []
  for s in range(steps):
    logits = bookjax_logits(config, variables, buf, length=n + s)
    nxt = int(np.argmax(logits[0, n + s - 1]))
    buf[0, n + s] = nxt
    out.append(nxt)
  return out


# =================================================================================
# bookjax checkpoints on disk
# =================================================================================

def save_bookjax(out_dir: str, config, params, router_bias) -> None:
  """Writes `config.json` (the bookjax config) and `params/` (orbax: params, router_bias)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  out_dir = os.path.abspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  tree = {"params": params}
  if router_bias:
    tree["router_bias"] = router_bias
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(os.path.join(out_dir, "params"), tree, force=True)
  ckptr.wait_until_finished()


def load_bookjax(path: str, step: Optional[int] = None):
  """(config, params, router_bias) from a `save_bookjax` directory or a training workdir.

  A training workdir (config.json + checkpoints/) gives the latest (or `step`)
  checkpoint's params and router bias; the optimizer state is not read into
  memory beyond what orbax restores.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(path)
  config = config_lib.load_json(os.path.join(path, "config.json"))
  if os.path.isdir(os.path.join(path, "params")):
    tree = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
    return config, tree["params"], tree.get("router_bias", {})
  ckpt_dir = os.path.join(path, "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"{path}: neither params/ (convert_hf import) nor checkpoints/ "
                            "(a training workdir)")
  mngr = ocp.CheckpointManager(ckpt_dir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f"{ckpt_dir}: no checkpoint")
  restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  state = restored["state"]
  get = (lambda k: state[k]) if isinstance(state, Mapping) else (lambda k: getattr(state, k))
  try:
    router_bias = get("router_bias") or {}
  except (KeyError, AttributeError):
    router_bias = {}
  return config, get("params"), router_bias


def compare_with_transformers(path: str, imported: Imported, tokens_BT=None,
                              seed: int = 0) -> float:
  """Max |logit difference| between transformers (torch, f32) and the imported model.

  Needs the `hf` extra (torch, transformers); for small checkpoints only.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
  if tokens_BT is None:
    v = imported.config.model.vocab_size
    tokens_BT = np.random.RandomState(seed).randint(0, v, (2, 16))
  with torch.no_grad():
    ref = model(torch.tensor(np.asarray(tokens_BT), dtype=torch.long)).logits.float().numpy()
  ours = bookjax_logits(imported.config, imported.variables(), tokens_BT)
  return float(np.abs(ours - ref).max())
