"""Baseline MHA: blockwise == full, K/V-cache decoding == forward, cache size."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bookjax import config_lib
from bookjax.model import attention, transformer
from test_mla import VOCAB, decode_token_by_token, packed_batch, random_params, valid


def mha_cfg(impl="full"):
  m = config_lib.default_model_config()
  m.vocab_size, m.d_model, m.num_layers = VOCAB, 32, 1
  m.attention.kind, m.attention.impl, m.attention.block_size = "mha", impl, 4
  m.attention.num_heads, m.attention.head_dim = 2, 8
  config_lib.validate_model(m)
  return ml_collections.FrozenConfigDict(m)


def test_mha_blockwise_equals_full_values_and_gradients():
  batch = packed_batch(t=13, seed=2)
  full, blk = (transformer.Transformer(mha_cfg(i)) for i in ("full", "blockwise"))
  params = random_params(full, batch)
  w = valid(batch)[..., None]

  def loss(model, p):
    return jnp.sum(jax.nn.log_softmax(model.apply(p, batch))[..., :5] * w)

  lf, gf = jax.jit(jax.value_and_grad(lambda p: loss(full, p)))(params)
  lb, gb = jax.jit(jax.value_and_grad(lambda p: loss(blk, p)))(params)
  np.testing.assert_allclose(float(lb), float(lf), rtol=1e-6)
  for x, y in zip(jax.tree.leaves(gf), jax.tree.leaves(gb)):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=1e-5, rtol=1e-4)


def test_mha_decoding_matches_forward():
  cfg = mha_cfg()
  batch = packed_batch(t=10)
  model = transformer.Transformer(cfg)
  params = random_params(model, batch)
  want = jax.jit(model.apply)(params, batch)
  got = decode_token_by_token(model, params, batch, cfg, prompt=3)
  m = valid(batch)
  np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], atol=1e-5, rtol=1e-5)


def test_mha_cache_bytes_and_layout():
  a = config_lib.default_attention_config()
  c = attention.cache_bytes_per_token(a, dtype="float32", num_layers=4)
  assert c["per_layer_values"] == 2 * a.num_heads * a.head_dim
  assert c["per_layer_bytes"] == 4 * c["per_layer_values"]
  assert c["shared_bytes"] == 4 and c["bytes_per_layer"] == c["per_layer_bytes"] + 1
  cache = attention.init_layer_cache(a, 2, 7)
  assert cache["k"].shape == (2, 7, a.num_heads, a.head_dim)


def test_causal_segment_mask_packed():
  seg = jnp.array([[1, 1, 2, 2, 0]])
  m = np.asarray(attention.causal_segment_mask(seg, seg))[0, 0]
  want = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0],
                   [0, 0, 0, 0, 0]], bool)
  np.testing.assert_array_equal(m, want)
