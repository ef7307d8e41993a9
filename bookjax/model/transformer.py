"""Decoder-only transformer: pre-RMSNorm blocks of (attention, FFN).

Attention (MHA or MLA-3D) and FFN (dense or Expert Forest) are picked per block by
the config through `attention.make_attention` and `ffn.make_ffn`.

Input: a batch dict of [B, T] arrays from bookjax.data.pipeline (`inputs`,
`positions`, `segment_ids`, `sentence_ids`, `domain`). Output: logits [B, T, V]
in float32.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bookjax.model import attention, ffn, layers


class Block(nn.Module):
  """x + attn(norm(x)), then x + ffn(norm(x))."""
  model_cfg: Any
  layer_index: int
  glyph: Optional[Mapping[str, np.ndarray]] = None

  @nn.compact
  def __call__(self, x_BTD, ctx: attention.Context, domain_BT, cache=None, shared=None,
               naive: bool = False):
    """Returns x, or (x, new layer cache) when decoding with `cache` / `shared`."""
    m = self.model_cfg
    norm = lambda name: layers.RMSNorm(m.rms_eps, param_dtype=m.param_dtype, name=name)
    attn = attention.make_attention(m.attention, m, glyph=self.glyph, name="attention")
    h_BTD = norm("pre_attention_norm")(x_BTD)
    if cache is None:
      a_BTD = attn(h_BTD, ctx)
    else:
      a_BTD, cache = attn(h_BTD, ctx, cache=cache, shared=shared, naive=naive)
    x_BTD = x_BTD + a_BTD.astype(x_BTD.dtype)
    x_BTD = layers.constrain(x_BTD, ("batch", "length", "embed"))
    f = ffn.make_ffn(m.ffn, m, self.layer_index, name="ffn")
    x_BTD = x_BTD + f(norm("pre_ffn_norm")(x_BTD), domain_BT, ctx.segment_ids).astype(x_BTD.dtype)
    x_BTD = layers.constrain(x_BTD, ("batch", "length", "embed"))
    return x_BTD if cache is None else (x_BTD, cache)


class Transformer(nn.Module):
  """The BookLM decoder. `glyph` holds the glyph feature arrays (glyph dimension)."""
  model_cfg: Any
  glyph: Optional[Mapping[str, np.ndarray]] = None

  def setup(self):
    m = self.model_cfg
    if m.vocab_size < 1:
      raise ValueError("config.model.vocab_size: must be set (>= 1) before building "
                       "the model; train.py fills it from the tokenizer")
    self.embedding = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(1.0), ("vocab", "embed")),
        (m.vocab_size, m.d_model), layers.dtype_of(m.param_dtype))
    self.blocks = [Block(m, i, glyph=self.glyph, name=f"block_{i}")
                   for i in range(m.num_layers)]
    self.final_norm = layers.RMSNorm(m.rms_eps, param_dtype=m.param_dtype)
    if not m.tie_embeddings:
      self.unembed = layers.DenseGeneral(
          m.vocab_size, ("embed", "vocab"), init_std=m.init_std,
          compute_dtype=m.compute_dtype, param_dtype=m.param_dtype)

  def context(self, batch) -> attention.Context:
    return attention.Context(
        positions=batch["positions"], segment_ids=batch["segment_ids"],
        sentence_ids=batch["sentence_ids"], tokens=batch["inputs"])

  def _embed(self, tokens_BT):
    dt = layers.dtype_of(self.model_cfg.compute_dtype)
    x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(dt)
    return layers.constrain(x_BTD, ("batch", "length", "embed"))

  def __call__(self, batch):
    x_BTD = self._embed(batch["inputs"])
    ctx = self.context(batch)
    domain_BT = batch.get("domain")
    for block in self.blocks:
      x_BTD = block(x_BTD, ctx, domain_BT)
    return self._logits(x_BTD)

  def extend(self, batch, cache, naive: bool = False):
    """Decodes / prefills: appends T new tokens to the cache and returns their logits.

    batch: `inputs`, `positions`, `segment_ids`, `sentence_ids` (and optionally
    `domain`) of the new tokens, [B, T]; cache: from `init_cache`. Returns
    (logits [B, T, V] f32, new cache). Token by token this reproduces `__call__`
    on the whole sequence. MLA decodes absorbed (only the latent is read), or
    `naive=True` re-expands K/V from the cached latent (the benchmark baseline).
    Call as `model.apply(params, batch, cache, method=Transformer.extend)`.
    """
    ctx = self.context(batch)
    shared = attention.write_shared_cache(cache["shared"], ctx)
    x_BTD = self._embed(batch["inputs"])
    new_layers = []
    for block, layer_cache in zip(self.blocks, cache["layers"]):
      x_BTD, layer_cache = block(x_BTD, ctx, batch.get("domain"), cache=layer_cache,
                                 shared=shared, naive=naive)
      new_layers.append(layer_cache)
    shared = dict(shared, index=shared["index"] + batch["inputs"].shape[1])
    return self._logits(x_BTD), dict(shared=shared, layers=new_layers)

  def _logits(self, x_BTD):
    m = self.model_cfg
    dt = layers.dtype_of(m.compute_dtype)
    x_BTD = self.final_norm(x_BTD)
    if m.tie_embeddings:
      # Embeddings are N(0, 1); scale so initial logits are O(1).
      logits = jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(dt)) * (m.d_model ** -0.5)
    else:
      logits = self.unembed(x_BTD)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def init_cache(model_cfg, batch_size: int, max_len: int) -> dict:
  """An empty decoding cache for `Transformer.extend` (no parameters needed).

  {'shared': ids cached once (index, segment / sentence / token ids),
   'layers': one attention cache per block}, in the compute dtype.
  """
  dt = layers.dtype_of(model_cfg.compute_dtype)
  return dict(shared=attention.init_shared_cache(batch_size, max_len),
              layers=[attention.init_layer_cache(model_cfg.attention, batch_size, max_len, dt)
                      for _ in range(model_cfg.num_layers)])
