"""Parameter, FLOP and memory accounting from shapes alone (`jax.eval_shape`).

Nothing is allocated: the model's `init` is traced abstractly, so the 720B config
is counted in seconds on a laptop. `account(config)` returns a `Report`;
`format_report` prints it and `Report.to_json()` gives the same figures as a dict.

Conventions (the same as Hugging Face's published DeepSeek-V3 figures):
  * Parameters are the trainable leaves of the 'params' collection only. The
    routing selection bias ('router_bias' collection) is state, not a parameter.
  * Activated parameters per token = every parameter except the routed experts,
    plus the routed experts one token runs in every MoE layer. Embedding tables
    count whole (both the input table and the output projection).
    Routed experts per token (tier r: E_r experts of P_r params, k_r experts per
    visit, nominal share m_r from `forest.nominal_tier_mix`):
      depth 1 (flat top-k over all experts):  nominal = top_k * sum_r m_r P_r
        (m_r = expected share of the top_k copies landing in tier r),
        min / max = the top_k cheapest / dearest experts;
      depth 2/3 (tier -> experts): nominal = tier_top_k * sum_r m_r k_r P_r,
        min / max = the tier_top_k tiers with the smallest / largest k_r P_r.
    P_r is measured from the shapes (leaf size / E_r), never from a formula.
  * Training FLOPs per token = 6 N_mm + 6 L_attn F_attn(T):
      N_mm: activated parameters used as matmul weights (activated minus the
        input-embedding table when untied, norm scales, glyph lookup tables and
        the semantic distance-bias table);
      F_attn(T) = T_avg (H (d_qk + d_v) + extra channels), T_avg = (T + 1) / 2 for
        causal attention over a sequence of length T (the mean context): the
        q.k and p.v products, 2 FLOPs per multiply-add, x3 for forward+backward.
  * KV cache per token: what the decoding cache holds (MLA: latent + RoPE key per
    layer, plus MLA-3D channels and the int32 ids shared by all layers), from
    `attention.cache_bytes_per_token`, in `cache_dtype` (default bfloat16).
  * Per-device memory: parameters (param_dtype) + AdamW first and second moments
    (same dtype), each leaf sharded by its logical axes through the sharding rules
    onto a mesh of the given shape (ceil-divided where a dim does not split
    evenly). Gradients, activations and the router bias are not included.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from bookjax import sharding as sharding_lib
from bookjax.model import layers

# Base MLA / MHA parameter names; every other attention parameter belongs to an
# MLA-3D dimension (semantic, glyph, cultural).
_BASE_ATTENTION = {"q_a_proj", "q_a_layernorm", "q_b_proj", "q_proj", "kv_a_proj_with_mqa",
                   "kv_a_layernorm", "kv_b_proj", "o_proj", "query", "key", "value", "out"}
# Lookup tables / elementwise parameters: no matmul FLOPs.
_NON_MATMUL = ("component_embed", "radical_embed", "stroke_embed", "semantic_bias", "scale")
TIERS = ("light", "deep", "super")
COMPONENTS = ("embeddings", "attention", "attention_3d", "norms", "dense_ffn",
              "tier_light", "tier_deep", "tier_super", "shared_experts", "routers", "other")
DEFAULT_GLYPH_COMPONENTS = 1024   # component-table size assumed when counting abstractly


@dataclasses.dataclass
class Report:
  """All figures of one config. Parameter counts are exact integers."""
  name: str
  total_params: int
  by_component: dict[str, int]
  activated: dict[str, float]           # nominal, min, max
  activated_fraction: dict[str, float]  # nominal, min, max (of total)
  routed_per_layer: dict[str, Any]      # per tier: experts, params per expert, top_k, mix
  moe_layers: int
  training_flops_per_token: float
  flops_detail: dict[str, float]
  flops_seq_len: int
  kv_cache_bytes_per_token: float
  kv_cache_bytes_per_sequence: float
  kv_cache_seq_len: int
  kv_cache_detail: dict[str, Any]
  mesh: dict[str, int]
  num_devices: int
  per_device_bytes: dict[str, float]    # params, optimizer, total

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------
# Abstract model
# ---------------------------------------------------------------------------------

def _model_cfg(config) -> ml_collections.ConfigDict:
  """Accepts a full config or its model section."""
  return config.model if "model" in config else config


def fake_glyph_features(vocab_size: int, num_components: int = DEFAULT_GLYPH_COMPONENTS,
                        max_components: int = 4) -> dict[str, Any]:
  """Glyph feature arrays of the right shapes (all zero) for abstract counting.

  Only `num_components` shapes a parameter (the component embedding table); the
  real value comes from the tokenizer's GlyphTable at train time.
  """
  z = np.zeros((vocab_size,), np.int32)
  return dict(component_ids=np.zeros((vocab_size, max_components), np.int32), radical=z,
              strokes=z, has_glyph=z.astype(np.float32), num_components=int(num_components),
              num_radicals=215, num_strokes=32)


def _dims(model_cfg) -> tuple[str, ...]:
  a = model_cfg.attention
  if a.kind != "mla":
    return ()
  return tuple(x.strip() for x in str(a.dims).split(",") if x.strip())


def build_model(model_cfg, glyph: Optional[Mapping[str, Any]] = None,
                glyph_components: int = DEFAULT_GLYPH_COMPONENTS):
  """The Transformer of a model config (with fake glyph features when needed)."""
  from bookjax.model import transformer  # pylint: disable=g-import-not-at-top
  frozen = ml_collections.FrozenConfigDict(model_cfg)
  if glyph is None and "glyph" in _dims(model_cfg):
    glyph = fake_glyph_features(model_cfg.vocab_size, glyph_components)
  return transformer.Transformer(frozen, glyph=glyph)


def _dummy_batch(seq_len: int = 4) -> dict[str, np.ndarray]:
  z = np.zeros((1, seq_len), np.int32)
  return dict(inputs=z, targets=z, segment_ids=z + 1, sentence_ids=z, domain=z,
              positions=np.arange(seq_len, dtype=np.int32)[None])


def _block_kinds(model_cfg) -> tuple[int, int]:
  """(dense blocks, routed blocks): blocks of one kind have identical variables."""
  if model_cfg.ffn.kind != "forest":
    return model_cfg.num_layers, 0
  nd = min(model_cfg.num_dense_layers, model_cfg.num_layers)
  return nd, model_cfg.num_layers - nd


def abstract_variables(model_cfg, glyph=None, glyph_components: int = DEFAULT_GLYPH_COMPONENTS,
                       fast_trace: bool = True, dedupe_blocks: bool = True):
  """ShapeDtypeStructs of all variables (boxed with logical axes). Allocates nothing.

  fast_trace: trace the Expert Forest with the 'ragged_dot' dispatch back-end,
  which creates exactly the same parameters as the others but traces ~3x faster
  (nothing is lowered or run, so its CPU cost does not matter here).
  dedupe_blocks: trace one block of each kind (dense FFN / routed FFN) and reuse
  its variables for every block of that kind (a block's variables depend on its
  index only through that kind); tests check this equals tracing every block.
  """
  if model_cfg.vocab_size < 1:
    raise ValueError("config.model.vocab_size: must be set (>= 1) to count parameters")
  if fast_trace and model_cfg.ffn.kind == "forest":
    model_cfg = ml_collections.ConfigDict(model_cfg.to_dict())
    model_cfg.ffn.forest.dispatch = "ragged_dot"
  batch = _dummy_batch()
  n_dense, n_routed = _block_kinds(model_cfg)
  reps = min(n_dense, 1) + min(n_routed, 1)
  if not dedupe_blocks or reps == model_cfg.num_layers:
    model = build_model(model_cfg, glyph, glyph_components)
    return jax.eval_shape(lambda r: model.init(r, batch), jax.random.PRNGKey(0))
  small = ml_collections.ConfigDict(model_cfg.to_dict())
  small.num_layers = reps
  small.num_dense_layers = min(n_dense, 1) if model_cfg.ffn.kind == "forest" \
      else model_cfg.num_dense_layers and 1
  model = build_model(small, glyph, glyph_components)
  reduced = jax.eval_shape(lambda r: model.init(r, batch), jax.random.PRNGKey(0))
  source = [0] * n_dense + [min(n_dense, 1)] * n_routed   # full block -> reduced block
  out = {}
  for coll, tree in reduced.items():
    full = {k: v for k, v in tree.items() if not k.startswith("block_")}
    for i, j in enumerate(source):
      if f"block_{j}" in tree:
        full[f"block_{i}"] = tree[f"block_{j}"]
    out[coll] = full
  return out


def _path_keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def param_leaves(variables) -> list[tuple[tuple[str, ...], Any, tuple]]:
  """(path, ShapeDtypeStruct, logical axes or None) for every trainable parameter."""
  params = variables["params"]
  flat = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  out = []
  for path, leaf in flat:
    axes = None
    if isinstance(leaf, nn.Partitioned):
      axes, leaf = leaf.names, leaf.value
    out.append((_path_keys(path), leaf, axes))
  return out


# ---------------------------------------------------------------------------------
# Classification
# ---------------------------------------------------------------------------------

def classify(path: Sequence[str]) -> str:
  """The component of a parameter path (see COMPONENTS)."""
  head = path[0]
  if head in ("embedding", "unembed"):
    return "embeddings"
  if head == "final_norm":
    return "norms"
  if head.startswith("block_"):
    part = path[1]
    if part in ("pre_attention_norm", "pre_ffn_norm"):
      return "norms"
    if part == "attention":
      return "attention" if path[2] in _BASE_ATTENTION else "attention_3d"
    if part == "ffn":
      sub = path[2]
      if sub == "mlp":
        return "dense_ffn"
      if sub in TIERS:
        return f"tier_{sub}"
      if sub == "shared":
        return "shared_experts"
      if sub.startswith("router"):
        return "routers"
  return "other"


def _is_matmul(path: Sequence[str], model_cfg) -> bool:
  if path[0] == "embedding":
    return bool(model_cfg.tie_embeddings)   # tied: the table is also the output matmul
  return not any(name in path for name in _NON_MATMUL)


# ---------------------------------------------------------------------------------
# Activated parameters
# ---------------------------------------------------------------------------------

def _forest_cfg(model_cfg):
  return model_cfg.ffn.forest


def routed_per_token(per_expert: Mapping[str, int], num_experts: Mapping[str, int],
                     forest_cfg) -> dict[str, float]:
  """Routed parameters one token runs in one MoE layer: nominal, min, max.

  per_expert / num_experts: per present tier (measured from shapes). Tier top-k
  and the nominal mix come from the forest config (mix normalised over present
  tiers).
  """
  tiers = [t for t in TIERS if num_experts.get(t, 0) > 0]
  mix = {t: float(forest_cfg.nominal_tier_mix[t]) if t in forest_cfg.nominal_tier_mix else 0.0
         for t in tiers}
  tot = sum(mix.values()) or 1.0
  mix = {t: v / tot for t, v in mix.items()}
  if forest_cfg.routing_depth == 1:
    k = int(forest_cfg.top_k)
    costs = sorted(c for t in tiers for c in [per_expert[t]] * num_experts[t])
    nominal = k * sum(mix[t] * per_expert[t] for t in tiers)
    return dict(nominal=float(nominal), min=float(sum(costs[:k])), max=float(sum(costs[-k:])))
  k = int(forest_cfg.tier_top_k)
  visit = {t: int(forest_cfg.tiers[t].top_k) * per_expert[t] for t in tiers}
  costs = sorted(visit.values())
  nominal = k * sum(mix[t] * visit[t] for t in tiers)
  return dict(nominal=float(nominal), min=float(sum(costs[:k])), max=float(sum(costs[-k:])))


# ---------------------------------------------------------------------------------
# FLOPs, KV cache, memory
# ---------------------------------------------------------------------------------

def attention_flops_per_token(model_cfg, seq_len: int) -> float:
  """Training FLOPs per token of the attention scores and values (all layers).

  6 * L * T_avg * (qk channels + v channels) summed over heads, T_avg = (T+1)/2.
  """
  a = model_cfg.attention
  h = a.num_heads
  if a.kind == "mla":
    qk, v = h * (a.qk_nope_head_dim + a.qk_rope_head_dim), h * a.v_head_dim
    dims = _dims(model_cfg)
    nh = lambda n: h if n == 0 else n
    if "glyph" in dims:
      qk += nh(a.glyph.num_heads) * a.glyph.head_dim
    if "cultural" in dims:
      qk += nh(a.cultural.num_heads) * a.cultural.num_registers
  else:
    qk = v = h * a.head_dim
  t_avg = (seq_len + 1) / 2
  return 6.0 * model_cfg.num_layers * t_avg * (qk + v)


def kv_cache(model_cfg, dtype: str = "bfloat16") -> dict[str, Any]:
  """KV-cache bytes per token over all layers, with the per-layer detail."""
  from bookjax.model import attention  # pylint: disable=g-import-not-at-top
  n = model_cfg.num_layers
  c = attention.cache_bytes_per_token(model_cfg.attention, dtype, num_layers=n)
  total = c["per_layer_bytes"] * n + c["shared_bytes"]
  detail = dict(dtype=dtype, per_layer_values=c["per_layer_values"],
                per_layer_bytes=c["per_layer_bytes"], shared_bytes=c["shared_bytes"],
                values=jax.tree.map(int, dict(c["detail"])))
  return dict(bytes_per_token=float(total), detail=detail)


def _mesh_sizes(mesh: Mapping[str, int], num_devices: int) -> dict[str, int]:
  shape = sharding_lib.mesh_shape(mesh, num_devices)
  return dict(zip(sharding_lib.MESH_AXES, shape))


def parse_mesh(spec: str) -> dict[str, int]:
  """'fsdp=32,expert=8' -> {'data': -1, 'fsdp': 32, 'expert': 8, 'tensor': 1}.

  Unnamed axes are 1, except `data`, which takes the remaining devices (-1).
  """
  out = dict(data=-1, fsdp=1, expert=1, tensor=1)
  for item in filter(None, (s.strip() for s in spec.split(","))):
    k, _, v = item.partition("=")
    if k not in out:
      raise ValueError(f"--mesh: unknown mesh axis {k!r}; axes are {sharding_lib.MESH_AXES}")
    out[k] = int(v)
  if sum(v == -1 for v in out.values()) > 1:
    raise ValueError(f"--mesh: at most one axis may be -1, got {spec!r}")
  return out


def shard_shape(shape: Sequence[int], axes: Optional[Sequence[Optional[str]]], rules,
                sizes: Mapping[str, int]) -> tuple[int, ...]:
  """Per-device shape of a leaf whose dims carry logical `axes` (ceil division)."""
  if axes is None:
    return tuple(shape)
  spec = nn.logical_to_mesh_axes(tuple(axes), rules)
  out = []
  for dim, m in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    ms = () if m is None else (m if isinstance(m, tuple) else (m,))
    div = int(np.prod([sizes[x] for x in ms])) if ms else 1
    out.append(math.ceil(dim / div))
  return tuple(out)


# ---------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------

def account(config, *, name: str = "", num_devices: int = 256,
            mesh: Optional[Mapping[str, int]] = None, mesh_rules: Sequence = (),
            flops_seq_len: int = 4096, kv_seq_len: int = 131072,
            cache_dtype: str = "bfloat16", glyph=None,
            glyph_components: int = DEFAULT_GLYPH_COMPONENTS, variables=None,
            dedupe_blocks: bool = True) -> Report:
  """Every figure of the report for a config (full config or model section).

  mesh: sizes per mesh axis (one may be -1); default the config's `mesh`, else
  all devices on `data`. variables: precomputed `abstract_variables` (optional).
  dedupe_blocks: see `abstract_variables` (False traces every block).
  """
  model_cfg = _model_cfg(config)
  if mesh is None:
    mesh = dict(config.mesh) if "mesh" in config else dict(data=-1, fsdp=1, expert=1, tensor=1)
  if not mesh_rules and "mesh_rules" in config:
    mesh_rules = config.mesh_rules
  if variables is None:
    variables = abstract_variables(model_cfg, glyph, glyph_components,
                                   dedupe_blocks=dedupe_blocks)
  leaves = param_leaves(variables)

  by_comp = {c: 0 for c in COMPONENTS}
  tier_layer: dict[tuple[str, str], int] = {}   # (block, tier) -> params
  tier_experts: dict[str, int] = {}
  matmul_always = 0
  for path, leaf, axes in leaves:
    size = int(np.prod(leaf.shape))
    comp = classify(path)
    by_comp[comp] += size
    if comp.startswith("tier_"):
      tier = comp[len("tier_"):]
      tier_layer[(path[0], tier)] = tier_layer.get((path[0], tier), 0) + size
      tier_experts[tier] = int(leaf.shape[0])   # stacked [E, ...]
    elif _is_matmul(path, model_cfg):
      matmul_always += size
  total = sum(by_comp.values())
  routed_total = sum(by_comp[f"tier_{t}"] for t in TIERS)
  always = total - routed_total

  moe_blocks = sorted({b for b, _ in tier_layer})
  routed = dict(nominal=0.0, min=0.0, max=0.0)
  per_layer_info: dict[str, Any] = {}
  for block in moe_blocks:
    per_expert = {t: tier_layer[(block, t)] // tier_experts[t]
                  for t in TIERS if (block, t) in tier_layer}
    nums = {t: tier_experts[t] for t in per_expert}
    r = routed_per_token(per_expert, nums, _forest_cfg(model_cfg))
    for k in routed:
      routed[k] += r[k]
    if not per_layer_info:
      f = _forest_cfg(model_cfg)
      per_layer_info = {t: dict(num_experts=nums[t], params_per_expert=per_expert[t],
                                top_k=int(f.tiers[t].top_k),
                                mix=float(f.nominal_tier_mix[t]) if t in f.nominal_tier_mix
                                else 0.0) for t in per_expert}
      per_layer_info["per_token"] = r
  activated = {k: float(always + v) for k, v in routed.items()}
  fraction = {k: v / total for k, v in activated.items()}

  n_mm = matmul_always + routed["nominal"]
  attn = attention_flops_per_token(model_cfg, flops_seq_len)
  flops = 6.0 * n_mm + attn

  kv = kv_cache(model_cfg, cache_dtype)

  sizes = _mesh_sizes(mesh, num_devices)
  rules = sharding_lib.logical_rules(mesh_rules)
  p_bytes = 0.0
  for _, leaf, axes in leaves:
    shp = shard_shape(leaf.shape, axes, rules, sizes)
    p_bytes += float(np.prod(shp)) * np.dtype(leaf.dtype).itemsize
  opt_bytes = 2.0 * p_bytes   # AdamW mu and nu, shaped and typed like the params

  return Report(
      name=name, total_params=int(total), by_component=by_comp, activated=activated,
      activated_fraction=fraction, routed_per_layer=per_layer_info, moe_layers=len(moe_blocks),
      training_flops_per_token=flops,
      flops_detail=dict(matmul_params=float(n_mm), dense_flops=6.0 * n_mm, attention_flops=attn),
      flops_seq_len=int(flops_seq_len),
      kv_cache_bytes_per_token=kv["bytes_per_token"],
      kv_cache_bytes_per_sequence=kv["bytes_per_token"] * kv_seq_len,
      kv_cache_seq_len=int(kv_seq_len), kv_cache_detail=kv["detail"],
      mesh=sizes, num_devices=int(num_devices),
      per_device_bytes=dict(params=p_bytes, optimizer=opt_bytes, total=p_bytes + opt_bytes))


def count_params(variables_or_params) -> int:
  """Total size of the 'params' collection of a (concrete or abstract) tree."""
  tree = variables_or_params.get("params", variables_or_params)
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.unbox(tree))))


# ---------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------

def human(n: float, unit: str = "") -> str:
  """1.234e11 -> '123.40B' (K, M, B, T; with unit 'B' for bytes: KiB ... TiB)."""
  if unit == "B":
    for suffix, scale in (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
      if abs(n) >= scale:
        return f"{n / scale:.2f} {suffix}"
    return f"{n:.0f} B"
  for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
    if abs(n) >= scale:
      return f"{n / scale:.2f}{suffix}{unit}"
  return f"{n:.0f}{unit}"


def format_report(r: Report) -> str:
  """A human-readable multi-line summary of a Report."""
  lines = [f"== {r.name or 'model'} ==",
           f"total parameters            {r.total_params:>18,d}  ({human(r.total_params)})",
           "parameters by component:"]
  for comp, n in r.by_component.items():
    if n:
      lines.append(f"  {comp:<26}{n:>18,d}  ({human(n)}, {100 * n / r.total_params:.2f}%)")
  if r.routed_per_layer:
    lines.append(f"routed experts per MoE layer ({r.moe_layers} MoE layers):")
    for t, info in r.routed_per_layer.items():
      if t == "per_token":
        continue
      lines.append(f"  {t:<8} {info['num_experts']:>4} experts x {human(info['params_per_expert'])}"
                   f" params, top_k {info['top_k']}, nominal mix {info['mix']:.2f}")
  for k in ("nominal", "min", "max"):
    lines.append(f"activated per token ({k:<7}) {int(r.activated[k]):>18,d}  "
                 f"({human(r.activated[k])}, {100 * r.activated_fraction[k]:.3f}%)")
  lines += [
      f"activated fraction (nominal) {100 * r.activated_fraction['nominal']:.3f}%",
      f"training FLOPs per token     {r.training_flops_per_token:.4e}  "
      f"(6 x {human(r.flops_detail['matmul_params'])} matmul params + attention "
      f"{r.flops_detail['attention_flops']:.3e} at seq_len {r.flops_seq_len})",
      f"KV cache per token           {human(r.kv_cache_bytes_per_token, 'B')} "
      f"({r.kv_cache_detail['dtype']}; {r.kv_cache_detail['per_layer_values']} values/layer + "
      f"{r.kv_cache_detail['shared_bytes']} B of ids)",
      f"KV cache, one {r.kv_cache_seq_len:,d}-token sequence  "
      f"{human(r.kv_cache_bytes_per_sequence, 'B')}",
      f"per-device memory on {r.num_devices} devices, mesh "
      + ",".join(f"{k}={v}" for k, v in r.mesh.items()) + ":",
      f"  params {human(r.per_device_bytes['params'], 'B')}, AdamW moments "
      f"{human(r.per_device_bytes['optimizer'], 'B')}, total "
      f"{human(r.per_device_bytes['total'], 'B')}",
  ]
  return "\n".join(lines)


def write_json(report: Report, path: str) -> None:
  """Writes `report.to_json()` to `path` (directories created)."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  if os.path.dirname(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(report.to_json(), f, indent=2)
    f.write("\n")
