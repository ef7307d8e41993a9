"""MLA-3D: reference equality, absorbed decoding, blockwise attention, YaRN,
sentence buckets, dimension switches, training, config validation, cache size."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from bookjax import config_lib
from bookjax.model import attention, blockwise, mla, rope, transformer

VOCAB = 40
ALL_DIMS = "semantic,glyph,cultural"


# ---------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------

def glyph_features(vocab=VOCAB, k=4, num_components=17, seed=0):
  """A synthetic dict in GlyphTable.feature_arrays(max_components=4) format."""
  r = np.random.RandomState(seed)
  comp = r.randint(0, num_components, size=(vocab, k)).astype(np.int32)
  comp[:4] = 0  # special / byte tokens: no glyph
  rad = r.randint(1, 215, vocab).astype(np.int32)
  rad[:4] = 0
  strokes = r.randint(0, 32, vocab).astype(np.int32)
  return dict(component_ids=comp, radical=rad, strokes=strokes, num_components=num_components)


def model_cfg(dims="", impl="full", memory=False, layers=2, **attn):
  m = config_lib.default_model_config()
  m.vocab_size, m.d_model, m.num_layers = VOCAB, 32, layers
  a = m.attention
  a.kind, a.dims, a.impl, a.block_size = "mla", dims, impl, 5
  a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim = (
      24, 16, 8, 8, 12)
  a.glyph.num_heads, a.glyph.head_dim, a.glyph.embed_dim = 2, 8, 16
  a.cultural.num_heads = 2
  a.semantic.memory = memory
  a.semantic.max_distance = 8
  for k, v in attn.items():
    if isinstance(v, dict):
      a[k].update(v)
    else:
      a[k] = v
  config_lib.validate_model(m)
  return ml_collections.FrozenConfigDict(m)


def packed_batch(b=2, t=14, seed=1):
  """Rows of packed documents with several sentences each."""
  r = np.random.RandomState(seed)
  seg = np.ones((b, t), np.int32)
  seg[1, 6:] = 2
  seg[1, t - 2:] = 0  # padding tail
  pos, sent = np.zeros_like(seg), np.zeros_like(seg)
  for i in range(b):
    p = s = 0
    for j in range(t):
      if j and seg[i, j] != seg[i, j - 1]:
        p = s = 0
      elif j and r.rand() < 0.3:
        s += 1
      pos[i, j], sent[i, j] = p, s
      p += 1
  tokens = r.randint(0, VOCAB, (b, t)).astype(np.int32)
  return dict(inputs=tokens, positions=pos, segment_ids=seg, sentence_ids=sent)


_UNIT = ("embedding", "component_embed", "radical_embed", "stroke_embed",
         "register_prototypes", "semantic_bias")


def random_params(module, *args, seed=0, scale=1.0):
  """Random parameters of a module's shapes, drawn with numpy (no init compile).

  Every parameter is non-zero (so zero-initialised biases matter too): norm scales
  1 + 0.2 N(0, 1); embedding-like tables N(0, 1); kernels N(0, 1/fan_in)·scale.
  """
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))
  r = np.random.RandomState(seed)

  def draw(path, x):
    name = path[-1].key
    z = r.randn(*x.shape).astype(np.float32)
    if name == "scale":
      return jnp.asarray(1 + 0.2 * z)
    if name in _UNIT:
      return jnp.asarray(z)
    fan_in = int(np.prod(x.shape[:-1])) if name in ("o_proj", "out") else x.shape[0]
    return jnp.asarray(z * scale / np.sqrt(fan_in))

  return jax.tree_util.tree_map_with_path(draw, shapes)


def build(cfg, batch, seed=0):
  model = transformer.Transformer(cfg, glyph=glyph_features())
  return model, random_params(model, batch, seed=seed)


def decode_token_by_token(model, params, batch, cfg, naive=False, prompt=0):
  b, t = batch["inputs"].shape
  cache = transformer.init_cache(cfg, b, t + 3)  # a little slack past the end
  step = jax.jit(lambda p, x, c: model.apply(p, x, c, naive=naive,
                                             method=transformer.Transformer.extend))
  outs = []
  if prompt:
    logits, cache = step(params, {k: v[:, :prompt] for k, v in batch.items()}, cache)
    outs.append(logits)
  for i in range(prompt, t):
    logits, cache = step(params, {k: v[:, i:i + 1] for k, v in batch.items()}, cache)
    outs.append(logits)
  return jnp.concatenate(outs, axis=1)


def valid(batch):
  return batch["segment_ids"] > 0


# ---------------------------------------------------------------------------------
# Absorbed decoding == full forward
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("dims,memory", [
    ("", False), (ALL_DIMS, True),
    pytest.param("semantic", True, marks=pytest.mark.slow),
    pytest.param("glyph", False, marks=pytest.mark.slow),
    pytest.param("cultural", False, marks=pytest.mark.slow)])
def test_absorbed_decoding_matches_forward(dims, memory):
  cfg = model_cfg(dims, memory=memory, layers=1)
  batch = packed_batch(t=12)
  model, params = build(cfg, batch)
  want = jax.jit(model.apply)(params, batch)
  got = decode_token_by_token(model, params, batch, cfg)
  m = valid(batch)
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], atol=1e-5, rtol=1e-5)


def test_naive_decoding_and_blockwise_prefill_match_forward():
  cfg = model_cfg(ALL_DIMS, impl="blockwise", memory=True, layers=1)
  batch = packed_batch(t=12, seed=3)
  model, params = build(cfg, batch, seed=3)
  want = jax.jit(model.apply)(params, batch)
  m = valid(batch)
  naive = decode_token_by_token(model, params, batch, cfg, naive=True)
  np.testing.assert_allclose(np.asarray(naive)[m], np.asarray(want)[m], atol=1e-5, rtol=1e-5)
  prefilled = decode_token_by_token(model, params, batch, cfg, prompt=8)
  np.testing.assert_allclose(np.asarray(prefilled)[m], np.asarray(want)[m], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------
# Plain MLA == a straightforward reference of the DeepSeek formulas
# ---------------------------------------------------------------------------------

def _rotate_half(x):
  h = x.shape[-1] // 2
  return np.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def reference_mla(p, x, pos, seg, cfg, eps):
  """DeepSeek-V2/V3 MLA written out in float64 numpy, HF DeepseekV3 style."""
  a = cfg.attention
  h, kn, r, v, lat = (a.num_heads, a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim,
                      a.kv_lora_rank)
  b, t, d = x.shape
  rms = lambda z, g: z / np.sqrt(np.mean(z * z, -1, keepdims=True) + eps) * g
  f = lambda k: np.asarray(p[k], np.float64)
  if a.q_lora_rank:
    cq = rms(x @ f("q_a_proj"), np.asarray(p["q_a_layernorm"]["scale"], np.float64))
    q = cq @ f("q_b_proj").reshape(a.q_lora_rank, -1)
  else:
    q = x @ f("q_proj").reshape(d, -1)
  q = q.reshape(b, t, h, kn + r)
  kv = x @ f("kv_a_proj_with_mqa")
  c = rms(kv[..., :lat], np.asarray(p["kv_a_layernorm"]["scale"], np.float64))
  kvb = (c @ f("kv_b_proj").reshape(lat, -1)).reshape(b, t, h, kn + v)
  k_nope, val = kvb[..., :kn], kvb[..., kn:]
  inv = rope.rope_inv_freq(r, a.rope_theta, a.yarn).astype(np.float64)
  mscale = rope.yarn_attention_factor(a.yarn)
  freqs = pos[..., None].astype(np.float64) * inv
  emb = np.concatenate([freqs, freqs], -1)
  cos, sin = np.cos(emb) * mscale, np.sin(emb) * mscale
  q_rot = q[..., kn:] * cos[:, :, None] + _rotate_half(q[..., kn:]) * sin[:, :, None]
  k_rot = kv[..., lat:] * cos + _rotate_half(kv[..., lat:]) * sin
  qq = np.concatenate([q[..., :kn], q_rot], -1)
  kk = np.concatenate([k_nope, np.broadcast_to(k_rot[:, :, None], (b, t, h, r))], -1)
  scale = (kn + r) ** -0.5
  if a.yarn.factor > 1 and a.yarn.mscale_all_dim:
    scale *= (0.1 * a.yarn.mscale_all_dim * math.log(a.yarn.factor) + 1) ** 2
  z = np.einsum("bthk,bshk->bhts", qq, kk) * scale
  ok = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0) & np.tril(np.ones((t, t), bool))
  z = np.where(ok[:, None], z, -np.inf)
  z = z - np.max(np.where(np.isfinite(z), z, -1e300), -1, keepdims=True)
  w = np.exp(z)
  w = w / np.maximum(w.sum(-1, keepdims=True), 1e-300)
  o = np.einsum("bhts,bshv->bthv", w, val).reshape(b, t, h * v)
  return o @ f("o_proj").reshape(h * v, d)


@pytest.mark.parametrize("attn", [
    dict(),
    dict(q_lora_rank=0, yarn=dict(factor=8.0, original_max_len=16, mscale=1.0,
                                  mscale_all_dim=1.0)),
    dict(yarn=dict(factor=4.0, original_max_len=8, mscale=0.8, mscale_all_dim=0.5))])
def test_plain_mla_matches_reference(attn):
  cfg = model_cfg("", **attn)
  batch = packed_batch()
  x = np.random.RandomState(0).randn(2, 14, cfg.d_model).astype(np.float32)
  ctx = attention.Context(positions=jnp.asarray(batch["positions"] * 3),
                          segment_ids=jnp.asarray(batch["segment_ids"]),
                          sentence_ids=jnp.asarray(batch["sentence_ids"]),
                          tokens=jnp.asarray(batch["inputs"]))
  layer = mla.MLAttention(cfg.attention, cfg)
  params = random_params(layer, x, ctx)
  got = jax.jit(layer.apply)(params, x, ctx)
  p = jax.tree.map(np.asarray, params["params"])
  want = reference_mla(p, x.astype(np.float64), batch["positions"] * 3, batch["segment_ids"],
                       cfg, cfg.rms_eps)
  m = valid(batch)
  np.testing.assert_allclose(np.asarray(got)[m], want[m], atol=1e-5, rtol=1e-4)


def test_rope_interleave_equals_permuted_half_layout():
  cfg_i = model_cfg("", rope_interleave=True, layers=1)
  cfg_h = model_cfg("", layers=1)
  batch = packed_batch()
  x = np.random.RandomState(2).randn(2, 14, 32).astype(np.float32)
  ctx = attention.Context(*(jnp.asarray(batch[k]) for k in
                            ("positions", "segment_ids", "sentence_ids", "inputs")))
  layer_i = mla.MLAttention(cfg_i.attention, cfg_i)
  params = random_params(layer_i, x, ctx)
  a = cfg_h.attention
  perm = rope.interleaved_to_half_permutation(a.qk_rope_head_dim)
  kn, lat = a.qk_nope_head_dim, a.kv_lora_rank
  p = params["params"]
  conv = dict(p)
  conv["q_b_proj"] = p["q_b_proj"].at[..., kn:].set(p["q_b_proj"][..., kn:][..., perm])
  conv["kv_a_proj_with_mqa"] = p["kv_a_proj_with_mqa"].at[..., lat:].set(
      p["kv_a_proj_with_mqa"][..., lat:][..., perm])
  got_i = layer_i.apply(params, x, ctx)
  got_h = mla.MLAttention(cfg_h.attention, cfg_h).apply({"params": conv}, x, ctx)
  np.testing.assert_allclose(np.asarray(got_i), np.asarray(got_h), atol=1e-6)


def test_dimensions_with_zero_parameters_are_plain_mla_bit_for_bit():
  batch = packed_batch()
  plain_cfg, dims_cfg = model_cfg(""), model_cfg(ALL_DIMS)
  plain, plain_params = build(plain_cfg, batch)
  dims_model = transformer.Transformer(dims_cfg, glyph=glyph_features())
  dims_params = random_params(dims_model, batch, seed=1)
  base = plain_params

  def merge(path, x):
    node = base
    for k in path:
      node = node.get(k.key) if isinstance(node, dict) else None
      if node is None:
        return jnp.zeros_like(x)  # a dimension's own parameter
    return node

  merged = jax.tree_util.tree_map_with_path(merge, dims_params)
  want = jax.jit(plain.apply)(base, batch)
  got = jax.jit(dims_model.apply)(merged, batch)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # ... and with all dimensions off nothing extra is even built.
  assert jax.tree.structure(base) == jax.tree.structure(
      nn.unbox(jax.eval_shape(plain.init, jax.random.PRNGKey(1), batch)))
  assert set(base["params"]["block_0"]["attention"]) == {
      "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
      "kv_b_proj", "o_proj"}


# ---------------------------------------------------------------------------------
# Blockwise == full (values and gradients), packed segments
# ---------------------------------------------------------------------------------

def _core_inputs(shared_keys: bool, memory: bool, seed=0):
  r = np.random.RandomState(seed)
  b, t, h, a, rr, e, v = 2, 19, 3, 6, 4, 5, 7
  seg = np.ones((b, t), np.int32)
  seg[0, 8:] = 2
  seg[1, 15:] = 0
  sent = np.cumsum(r.rand(b, t) < 0.3, axis=1).astype(np.int32)
  idx = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))
  n = lambda *s: jnp.asarray(r.randn(*s), jnp.float32)
  q = blockwise.Queries(main=n(b, t, h, a), rope=n(b, t, h, rr), extra=n(b, t, h, e),
                        idx=jnp.asarray(idx), seg=jnp.asarray(seg), sent=jnp.asarray(sent))
  kshape = (b, t, a) if shared_keys else (b, t, h, a)
  vshape = (b, t, v) if shared_keys else (b, t, h, v)
  k = blockwise.Keys(main=n(*kshape), rope=n(b, t, rr), extra=n(b, t, e), value=n(*vshape),
                     idx=jnp.asarray(idx), seg=jnp.asarray(seg), sent=jnp.asarray(sent),
                     kind=jnp.zeros((b, t), jnp.int32))
  if memory:
    ends = mla.sentence_ends(k.seg, k.sent)
    mem = k.replace(main=n(*kshape), value=n(*vshape), kind=jnp.where(ends, 1, -1))
    k = blockwise.concat_keys(k, mem)
  sem = n(h, 6)
  spec = blockwise.Spec(scale=0.4, num_buckets=6, max_distance=9, has_memory=memory)
  return q, k, sem, spec


@pytest.mark.parametrize("shared_keys,memory", [
    (True, True), pytest.param(False, False, marks=pytest.mark.slow)])
def test_blockwise_equals_full_values_and_gradients(shared_keys, memory):
  """The core alone: every logit term on, packed segments, padding, ragged blocks."""
  q, k, sem, spec = _core_inputs(shared_keys, memory)
  cot = jnp.asarray(np.random.RandomState(9).randn(*q.main.shape[:3], k.value.shape[-1]),
                    jnp.float32)
  floats = lambda x: ((x.main, x.rope, x.extra)
                      + ((x.value,) if isinstance(x, blockwise.Keys) else ()))

  def run(fn):
    def loss(qf, kf, sem):
      out = fn(q.replace(main=qf[0], rope=qf[1], extra=qf[2]),
               k.replace(main=kf[0], rope=kf[1], extra=kf[2], value=kf[3]), spec, sem)
      return jnp.sum(out * cot), out
    return jax.jit(jax.grad(loss, (0, 1, 2), has_aux=True))(floats(q), floats(k), sem)

  g_full, out_full = run(blockwise.full)
  g_blk, out_blk = run(lambda q, k, s, sem: blockwise.blockwise(q, k, s, sem, 4, 6))
  np.testing.assert_allclose(np.asarray(out_blk), np.asarray(out_full), atol=1e-5)
  for x, y in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_blk)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-4)


def test_blockwise_layer_gradients_match_full():
  """An MLA-3D layer (all dimensions, memory, per-head expanded keys), packed rows:
  blockwise == full in values and in the gradients of every parameter and input."""
  batch = packed_batch(t=17, seed=4)
  ctx = attention.Context(*(jnp.asarray(batch[k]) for k in
                            ("positions", "segment_ids", "sentence_ids", "inputs")))
  x = jnp.asarray(np.random.RandomState(4).randn(2, 17, 32), jnp.float32)
  cot = (jnp.asarray(np.random.RandomState(5).randn(2, 17, 32), jnp.float32)
         * valid(batch)[..., None])
  layers_ = [mla.MLAttention(model_cfg(ALL_DIMS, impl=i, memory=True, layers=1).attention,
                             model_cfg(ALL_DIMS, impl=i, memory=True, layers=1),
                             glyph=glyph_features()) for i in ("full", "blockwise")]
  params = random_params(layers_[0], x, ctx, seed=4)

  def run(layer):
    def loss(p, x):
      y = layer.apply(p, x, ctx)
      return jnp.sum(y * cot), y
    return jax.jit(jax.grad(loss, (0, 1), has_aux=True))(params, x)

  (gf, yf), (gb, yb) = run(layers_[0]), run(layers_[1])
  m = valid(batch)
  np.testing.assert_allclose(np.asarray(yb)[m], np.asarray(yf)[m], atol=1e-5)
  for x_, y_ in zip(jax.tree.leaves(gf), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y_), np.asarray(x_), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------
# YaRN, sentence buckets
# ---------------------------------------------------------------------------------

def test_yarn_frequencies_hand_checked():
  # K=4, θ=1e4, s=4, L0=4096: corr(32) = 4 ln(4096/(64π)) / (2 ln 1e4) = 0.655 -> lo 0;
  # corr(1) = 4 ln(4096/(2π)) / (2 ln 1e4) = 1.407 -> hi 2. ramp = [0, 0.5];
  # inv_freq = [1, 0.01 (0.5/4 + 0.5)] = [1, 0.00625].
  got = rope.yarn_inv_freq(4, 1e4, 4.0, 4096, 32.0, 1.0)
  np.testing.assert_allclose(got, [1.0, 0.00625], rtol=1e-6)
  y = ml_collections.ConfigDict(dict(factor=4.0, original_max_len=4096, beta_fast=32.0,
                                     beta_slow=1.0, mscale=1.0, mscale_all_dim=0.0))
  assert rope.yarn_attention_factor(y) == pytest.approx(0.1 * math.log(4) + 1)
  assert rope.softmax_scale(192, y) == pytest.approx(192 ** -0.5)
  y.mscale_all_dim = 1.0  # DeepSeek-V3: cos/sin unscaled, softmax scale × mscale²
  assert rope.yarn_attention_factor(y) == pytest.approx(1.0)
  assert rope.softmax_scale(192, y) == pytest.approx(192 ** -0.5 * (0.1 * math.log(4) + 1) ** 2)
  y.factor = 1.0
  np.testing.assert_allclose(rope.rope_inv_freq(4, 1e4, y), [1.0, 0.01], rtol=1e-7)


def test_yarn_matches_hf_transformers():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers import DeepseekV3Config
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention
  params = dict(rope_type="yarn", rope_theta=10000.0, factor=40.0, beta_fast=32, beta_slow=1,
                mscale=0.707, mscale_all_dim=1.0, original_max_position_embeddings=4096)
  hf_cfg = DeepseekV3Config(qk_rope_head_dim=64, rope_parameters=params,
                            max_position_embeddings=163840)
  inv, factor = ROPE_INIT_FUNCTIONS["yarn"](hf_cfg, "cpu")
  y = ml_collections.ConfigDict(dict(factor=40.0, original_max_len=4096, beta_fast=32.0,
                                     beta_slow=1.0, mscale=0.707, mscale_all_dim=1.0))
  np.testing.assert_allclose(rope.rope_inv_freq(64, 1e4, y), inv.numpy(), rtol=1e-6)
  assert rope.yarn_attention_factor(y) == pytest.approx(factor)
  # HF's attention layer applies its own YaRN mscale to the softmax scale.
  assert rope.softmax_scale(192, y) == pytest.approx(DeepseekV3Attention(hf_cfg, 0).scaling)


def test_sentence_distance_buckets_on_packed_example():
  # One row, two packed documents; sentence ids restart in the second.
  seg = jnp.array([[1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
  sent = jnp.array([[0, 0, 1, 1, 2, 3, 5, 9, 0, 0, 1, 2]])
  dist = sent[:, :, None] - sent[:, None, :]
  got = np.asarray(blockwise.sentence_buckets(dist, 6, 12))[0]
  # exact buckets 0, 1, 2; then 3 + floor(ln(d/3) / ln(12/3) · 3): d=3,4 -> 3,
  # d=5..7 -> 4, d=8..11 -> 5 (and beyond, clipped to the last bucket).
  assert list(got[7, :8]) == [5, 5, 5, 5, 4, 4, 3, 0]       # query in sentence 9
  assert list(got[6, :7]) == [4, 4, 3, 3, 3, 2, 0]          # query in sentence 5
  assert list(got[11, 8:]) == [2, 2, 1, 0]                  # second document restarts
  ref = lambda d: d if d < 3 else min(3 + math.floor(math.log(d / 3) / math.log(4) * 3), 5)
  for d in range(40):
    assert int(blockwise.sentence_buckets(jnp.asarray(d), 6, 12)) == ref(d), d
  # across documents nothing is attended, whatever the bucket
  idx = blockwise.row_meta(1, 12)
  q = blockwise.Queries(main=None, rope=None, extra=None, idx=idx, seg=seg, sent=sent)
  k = blockwise.Keys(main=None, rope=None, extra=None, value=None, idx=idx, seg=seg, sent=sent,
                     kind=jnp.zeros_like(idx))
  ok = np.asarray(blockwise.mask(q, k, blockwise.Spec(scale=1.0)))[0, 0]
  assert not ok[11, :8].any() and ok[11, 8:].all() and not ok[7, 8:].any()


def test_semantic_bias_only_on_semantic_heads():
  cfg = model_cfg("semantic", layers=1, num_heads=2, semantic=dict(num_heads=1))
  sent = jnp.array([[0, 0, 1, 1, 1, 2, 2, 3]])
  ctx = attention.Context(positions=blockwise.row_meta(1, 8),
                          segment_ids=jnp.ones((1, 8), jnp.int32), sentence_ids=sent,
                          tokens=jnp.zeros((1, 8), jnp.int32))
  layer = mla.MLAttention(cfg.attention, cfg)
  p = random_params(layer, jnp.zeros((1, 8, 32)), ctx)
  p["params"]["semantic_bias"] = jnp.zeros_like(p["params"]["semantic_bias"]).at[0, 0].set(30.0)
  spec, sem = layer.apply(p, method=lambda m: (m._spec(), m._semantic_table()))
  assert sem.shape == (2, cfg.attention.semantic.num_buckets)
  idx = blockwise.row_meta(1, 8)
  zeros = jnp.zeros((1, 8, 2, 1))
  q = blockwise.Queries(main=zeros, rope=None, extra=None, idx=idx, seg=ctx.segment_ids, sent=sent)
  k = blockwise.Keys(main=zeros, rope=None, extra=None, value=None, idx=idx, seg=ctx.segment_ids,
                     sent=sent, kind=jnp.zeros_like(idx))
  z = np.asarray(blockwise.logits(q, k, spec, sem))
  same = np.asarray(sent[0][:, None] == sent[0][None, :])
  past = np.tril(np.ones((8, 8), bool))  # (future keys are masked, whatever their bias)
  np.testing.assert_allclose(z[0, 0][past], np.where(same, 30.0, 0.0)[past])
  np.testing.assert_allclose(z[0, 1], 0.0)


# ---------------------------------------------------------------------------------
# Training, validation, cache size
# ---------------------------------------------------------------------------------

def test_tiny_mla3d_model_trains():
  cfg = model_cfg(ALL_DIMS, memory=True, layers=1)
  batch = packed_batch(b=4, t=16, seed=5)
  model = transformer.Transformer(cfg, glyph=glyph_features())
  params = random_params(model, batch, scale=0.3)
  tgt = jnp.roll(batch["inputs"], -1, axis=1)
  w = valid(batch)

  def loss_fn(p):
    logp = jax.nn.log_softmax(model.apply(p, batch))
    nll = -jnp.take_along_axis(logp, tgt[..., None], -1)[..., 0]
    return jnp.sum(nll * w) / jnp.sum(w)

  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def step(p, o):
    l, g = jax.value_and_grad(loss_fn)(p)
    upd, o = tx.update(g, o, p)
    return optax.apply_updates(p, upd), o, l

  losses, init = [], params
  for _ in range(20):
    params, opt, l = step(params, opt)
    losses.append(float(l))
  assert np.all(np.isfinite(losses))
  assert losses[-1] < 0.6 * losses[0], losses
  # every dimension's parameters received gradient (Adam moves only those)
  before, after = (p["params"]["block_0"]["attention"] for p in (init, params))
  for name in ("semantic_bias", "glyph_k_proj", "glyph_encoder", "register_prototypes",
               "register_affinity", "memory_norm"):
    moved = jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), before[name], after[name])
    assert min(jax.tree.leaves(moved)) > 0, (name, moved)


@pytest.mark.parametrize("field,value,needle", [
    ("qk_rope_head_dim", 7, "config.model.attention.qk_rope_head_dim: must be even"),
    ("kv_lora_rank", 0, "config.model.attention.kv_lora_rank: must be >= 1"),
    ("dims", "semantic,phonetic", "config.model.attention.dims: unknown dimension 'phonetic'"),
    ("q_lora_rank", -1, "config.model.attention.q_lora_rank"),
    ("block_size", 0, "config.model.attention.block_size"),
])
def test_invalid_attention_config_names_the_field(field, value, needle):
  m = config_lib.default_model_config()
  m.attention.kind = "mla"
  m.attention[field] = value
  with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
    config_lib.validate_model(m)


def test_invalid_dimension_subconfigs():
  m = config_lib.default_model_config()
  m.attention.kind, m.attention.dims = "mla", "cultural"
  m.attention.cultural.num_heads = 9
  with pytest.raises(ValueError, match="config.model.attention.cultural.num_heads"):
    config_lib.validate_model(m)
  m.attention.dims = "glyph"
  with pytest.raises(ValueError, match="config.model.attention.dims: 'glyph' needs glyph"):
    cfg = ml_collections.FrozenConfigDict(m)
    batch = packed_batch()
    ctx = attention.Context(*(jnp.asarray(batch[k]) for k in
                              ("positions", "segment_ids", "sentence_ids", "inputs")))
    jax.eval_shape(mla.MLAttention(cfg.attention, cfg).init, jax.random.PRNGKey(0),
                   jnp.zeros((2, 14, cfg.d_model)), ctx)
  m.attention.dims, m.attention.yarn.factor = "", 0.5
  with pytest.raises(ValueError, match="config.model.attention.yarn.factor"):
    config_lib.validate_model(m)
  m.attention.kind, m.attention.yarn.factor = "mha", 1.0
  m.attention.kv_lora_rank = 0  # MLA fields are not checked for MHA
  config_lib.validate_model(m)


def deepseek_v3_attention(dims=""):
  a = config_lib.default_attention_config()
  a.kind, a.num_heads, a.head_dim = "mla", 128, 128
  a.q_lora_rank, a.kv_lora_rank = 1536, 512
  a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim = 128, 64, 128
  a.dims = dims
  return a


def test_cache_bytes_deepseek_v3_shapes():
  mha = deepseek_v3_attention()
  mha.kind = "mha"
  c_mha = attention.cache_bytes_per_token(mha)
  c_mla = attention.cache_bytes_per_token(deepseek_v3_attention())
  c_all = attention.cache_bytes_per_token(deepseek_v3_attention(ALL_DIMS), num_layers=1)
  assert c_mha["per_layer_values"] == 32768
  assert c_mla["per_layer_values"] == 576
  assert c_mla["per_layer_bytes"] <= 0.05 * c_mha["per_layer_bytes"]
  assert c_all["per_layer_values"] == 576 + 4
  # even counting the shared ids (sentence, token) in every layer: <= 10% more
  assert c_all["bytes_per_layer"] <= 1.10 * c_mla["bytes_per_layer"]
  # the decoding cache really has that shape
  cache = attention.init_layer_cache(deepseek_v3_attention(ALL_DIMS), 1, 3, jnp.bfloat16)
  assert sum(x.shape[-1] for x in cache.values()) == 580


# ---------------------------------------------------------------------------------
# HF transformers DeepseekV3Attention parity (weights converted as in mla.py's doc)
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("interleave", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_matches_hf_deepseek_v3_attention(interleave):
  torch = pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from transformers import DeepseekV3Config
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf
  h, kn, r, v, lat, lq, d, t = 4, 8, 8, 12, 16, 24, 32, 11
  yarn = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, beta_fast=32, beta_slow=1,
              mscale=1.0, mscale_all_dim=1.0, original_max_position_embeddings=8)
  hf_cfg = DeepseekV3Config(hidden_size=d, num_attention_heads=h, num_key_value_heads=h,
                            q_lora_rank=lq, kv_lora_rank=lat, qk_nope_head_dim=kn,
                            qk_rope_head_dim=r, v_head_dim=v, rope_parameters=yarn,
                            rope_interleave=interleave, max_position_embeddings=32,
                            attention_bias=False, rms_norm_eps=1e-6)
  hf_cfg._attn_implementation = "eager"
  torch.manual_seed(0)
  layer_hf = hf.DeepseekV3Attention(hf_cfg, 0).double()
  for prm in layer_hf.parameters():
    torch.nn.init.normal_(prm, 0.0, 0.2)
  x = np.random.RandomState(0).randn(1, t, d)
  pos = torch.arange(t)[None] + 3
  cos, sin = hf.DeepseekV3RotaryEmbedding(hf_cfg)(torch.tensor(x), pos)
  causal = torch.full((t, t), float("-inf")).triu(1)[None, None].double()
  want = layer_hf(torch.tensor(x), (cos.double(), sin.double()), causal)[0].detach().numpy()

  cfg = model_cfg("", layers=1, num_heads=h, q_lora_rank=lq, rope_interleave=interleave,
                  yarn=dict(factor=4.0, original_max_len=8, beta_fast=32.0, beta_slow=1.0,
                            mscale=1.0, mscale_all_dim=1.0))
  sd = {k: val.detach().numpy().astype(np.float32) for k, val in layer_hf.state_dict().items()}
  params = {"params": {
      "q_a_proj": sd["q_a_proj.weight"].T,
      "q_a_layernorm": {"scale": sd["q_a_layernorm.weight"]},
      "q_b_proj": sd["q_b_proj.weight"].T.reshape(lq, h, kn + r),
      "kv_a_proj_with_mqa": sd["kv_a_proj_with_mqa.weight"].T,
      "kv_a_layernorm": {"scale": sd["kv_a_layernorm.weight"]},
      "kv_b_proj": sd["kv_b_proj.weight"].T.reshape(lat, h, kn + v),
      "o_proj": sd["o_proj.weight"].T.reshape(h, v, d)}}
  ones = jnp.ones((1, t), jnp.int32)
  ctx = attention.Context(positions=jnp.asarray(pos.numpy(), jnp.int32), segment_ids=ones,
                          sentence_ids=0 * ones, tokens=0 * ones)
  got = mla.MLAttention(cfg.attention, cfg).apply(params, jnp.asarray(x, jnp.float32), ctx)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_glyph_keys_via_vocabulary_table_match_per_token():
  cfg = model_cfg("glyph", layers=1)
  batch = packed_batch()
  ctx = attention.Context(*(jnp.asarray(batch[k]) for k in
                            ("positions", "segment_ids", "sentence_ids", "inputs")))
  layer = mla.MLAttention(cfg.attention, cfg, glyph=glyph_features())
  params = random_params(layer, jnp.zeros((2, 14, 32)), ctx)
  tokens = jnp.asarray(np.r_[np.arange(VOCAB), [VOCAB + 3]])[None]  # one id past the table
  per_token, via_vocab = (layer.apply(params, tokens, v, method=lambda m, t, v: m._glyph_keys(t, v))
                          for v in (False, True))
  np.testing.assert_allclose(np.asarray(via_vocab), np.asarray(per_token), atol=1e-6)
  assert float(jnp.abs(per_token[0, -1]).max()) == 0.0  # unknown id: no glyph key


def test_bfloat16_compute_decodes_close_to_forward():
  """bf16 compute (f32 params): forward, absorbed decoding and blockwise prefill run
  and agree to bf16 precision (XLA:CPU once rejected a bf16 decode-step dot)."""
  m = config_lib.default_model_config()
  m.vocab_size, m.d_model, m.num_layers, m.compute_dtype = VOCAB, 32, 1, "bfloat16"
  a = m.attention
  a.kind, a.dims, a.impl, a.block_size = "mla", ALL_DIMS, "blockwise", 4
  cfg = ml_collections.FrozenConfigDict(m)
  batch = packed_batch(t=8)
  model, params = build(cfg, batch)
  want = jax.jit(model.apply)(params, batch)
  got = decode_token_by_token(model, params, batch, cfg, prompt=5)
  m_ = valid(batch)
  assert got.dtype == jnp.float32 and np.isfinite(np.asarray(got)).all()
  np.testing.assert_allclose(np.asarray(got)[m_], np.asarray(want)[m_], atol=0.15)
