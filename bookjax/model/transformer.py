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
  def __call__(self, x_BTD, ctx: attention.Context, domain_BT):
    m = self.model_cfg
    norm = lambda name: layers.RMSNorm(m.rms_eps, param_dtype=m.param_dtype, name=name)
    attn = attention.make_attention(m.attention, m, glyph=self.glyph, name="attention")
    x_BTD = x_BTD + attn(norm("pre_attention_norm")(x_BTD), ctx).astype(x_BTD.dtype)
    x_BTD = layers.constrain(x_BTD, ("batch", "length", "embed"))
    f = ffn.make_ffn(m.ffn, m, self.layer_index, name="ffn")
    x_BTD = x_BTD + f(norm("pre_ffn_norm")(x_BTD), domain_BT, ctx.segment_ids).astype(x_BTD.dtype)
    return layers.constrain(x_BTD, ("batch", "length", "embed"))


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

  def __call__(self, batch):
    m = self.model_cfg
    dt = layers.dtype_of(m.compute_dtype)
    tokens_BT = batch["inputs"]
    x_BTD = jnp.take(self.embedding, tokens_BT, axis=0).astype(dt)
    x_BTD = layers.constrain(x_BTD, ("batch", "length", "embed"))
    ctx = self.context(batch)
    domain_BT = batch.get("domain")
    for block in self.blocks:
      x_BTD = block(x_BTD, ctx, domain_BT)
    x_BTD = self.final_norm(x_BTD)
    if m.tie_embeddings:
      # Embeddings are N(0, 1); scale so initial logits are O(1).
      logits = jnp.einsum("btd,vd->btv", x_BTD, self.embedding.astype(dt)) * (m.d_model ** -0.5)
    else:
      logits = self.unembed(x_BTD)
    return layers.constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
