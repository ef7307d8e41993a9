"""Attention: the shared context, the masked softmax core, baseline MHA, the
factory that picks MHA or MLA(-3D) from the config, and decoding caches.

Masking rule everywhere: a query attends to a key iff both lie in the same packed
document (equal, non-zero `segment_ids`) and the key is not in the future
(`kv_position <= q_position` in packed-row order).

`attention.impl`: 'full' materialises the T x T logits (the reference);
'blockwise' runs the online-softmax core of bookjax/model/blockwise.py (same
numbers, memory linear in T). Decoding: `init_layer_cache` / `init_shared_cache`
build a cache, the attention modules extend it when called with `cache=` and
`shared=` (see `Transformer.extend`), and `cache_bytes_per_token` reports its size
for any config.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from bookjax.model import blockwise as core
from bookjax.model import layers

NEG_INF = -1e30  # finite, so fully-masked rows give zeros instead of NaN


@flax.struct.dataclass
class Context:
  """Per-token side information every attention layer may use. All [B, T] int32.

  positions: position inside the packed document (RoPE).
  segment_ids: packed document id per token (0 = padding).
  sentence_ids: sentence index inside the document (semantic dimension).
  tokens: input token ids (glyph dimension).
  """
  positions: jnp.ndarray
  segment_ids: jnp.ndarray
  sentence_ids: jnp.ndarray
  tokens: jnp.ndarray


def causal_segment_mask(q_seg_BT, kv_seg_BS, q_idx_T=None, kv_idx_S=None):
  """Boolean mask [B, 1, T, S]: same non-padding segment and key not in the future.

  q_idx_T / kv_idx_S are row indices of the queries / keys (default arange).
  """
  t, s = q_seg_BT.shape[1], kv_seg_BS.shape[1]
  q_idx_T = jnp.arange(t) if q_idx_T is None else q_idx_T
  kv_idx_S = jnp.arange(s) if kv_idx_S is None else kv_idx_S
  causal_TS = kv_idx_S[None, :] <= q_idx_T[:, None]
  same_BTS = (q_seg_BT[:, :, None] == kv_seg_BS[:, None, :]) & (q_seg_BT[:, :, None] > 0)
  return (same_BTS & causal_TS[None])[:, None]


def full_attention(q_BTHK, k_BSHK, v_BSHV, mask_BHTS, *, scale: float,
                   bias_BHTS: Optional[jnp.ndarray] = None):
  """Reference softmax attention; v may have a different head width than q/k.

  Logits and softmax in float32. Returns [B, T, H, V]. Masked-out rows give 0.
  """
  logits = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK,
                      preferred_element_type=jnp.float32) * scale
  if bias_BHTS is not None:
    logits = logits + bias_BHTS
  logits = jnp.where(mask_BHTS, logits, NEG_INF)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = jnp.where(mask_BHTS, probs, 0.0)
  return jnp.einsum("bhts,bshv->bthv", probs.astype(v_BSHV.dtype), v_BSHV)


class MultiHeadAttention(nn.Module):
  """Baseline multi-head attention with RoPE on the full head width.

  `impl='full'` is the reference path (unchanged); `impl='blockwise'` uses the
  online-softmax core (same numbers, linear memory). With `cache` / `shared`
  (see `init_layer_cache`) it extends a K/V decoding cache and returns (y, cache).
  """
  cfg: Any        # model.attention config
  model_cfg: Any  # model config (d_model, dtypes, init_std)

  @nn.compact
  def __call__(self, x_BTD, ctx: Context, cache=None, shared=None, naive: bool = False):
    a, m = self.cfg, self.model_cfg
    kw = dict(init_std=m.init_std, compute_dtype=m.compute_dtype,
              param_dtype=m.param_dtype)
    h, k = a.num_heads, a.head_dim
    q = layers.DenseGeneral((h, k), ("embed", "heads", "head_dim"), name="query", **kw)(x_BTD)
    kk = layers.DenseGeneral((h, k), ("embed", "heads", "head_dim"), name="key", **kw)(x_BTD)
    v = layers.DenseGeneral((h, k), ("embed", "heads", "head_dim"), name="value", **kw)(x_BTD)
    inv_freq = layers.rope_frequencies(k, a.rope_theta)
    q = layers.apply_rope(q, ctx.positions, inv_freq)
    kk = layers.apply_rope(kk, ctx.positions, inv_freq)
    q = layers.constrain(q, ("batch", "length", "heads", "head_dim"))
    if cache is not None:
      out, cache = self._extend(q, kk, v, ctx, cache, shared)
    elif a.impl == "blockwise":
      b, t = ctx.positions.shape
      idx = core.row_meta(b, t)
      qs = core.Queries(main=q, rope=None, extra=None, idx=idx, seg=ctx.segment_ids,
                        sent=ctx.sentence_ids)
      ks = core.Keys(main=kk, rope=None, extra=None, value=v, idx=idx, seg=ctx.segment_ids,
                     sent=ctx.sentence_ids, kind=jnp.zeros_like(idx))
      out = core.blockwise(qs, ks, core.Spec(scale=k ** -0.5), None, a.block_size, a.block_size)
    else:
      mask = causal_segment_mask(ctx.segment_ids, ctx.segment_ids)
      out = full_attention(q, kk, v, mask, scale=k ** -0.5)
    out_kw = dict(kw)
    w = layers.param_with_axes(self, "out", nn.initializers.normal(m.init_std),
                               (h, k, x_BTD.shape[-1]), ("heads", "head_dim", "embed"),
                               layers.dtype_of(m.param_dtype))
    dt = layers.dtype_of(out_kw["compute_dtype"])
    y = jnp.einsum("bthk,hkd->btd", out.astype(dt), w.astype(dt))
    return y if cache is None else (y, cache)

  def _extend(self, q, k_new, v_new, ctx: Context, cache, shared):
    """Writes the new K/V at shared['index'] and attends over the whole cache."""
    index = shared["index"]
    upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               index, axis=1)
    cache = dict(k=upd(cache["k"], k_new), v=upd(cache["v"], v_new))
    t, s = q.shape[1], cache["k"].shape[1]
    mask = causal_segment_mask(ctx.segment_ids, shared["segment_ids"],
                               jnp.arange(t) + index, jnp.arange(s))
    out = full_attention(q, cache["k"], cache["v"], mask, scale=self.cfg.head_dim ** -0.5)
    return out, cache


ATTENTION_KINDS = ("mha", "mla")


def make_attention(cfg, model_cfg, glyph=None, name: str = "attention") -> nn.Module:
  """Builds the attention module named by `cfg.kind`.

  glyph: the glyph feature arrays (bookjax.data.glyph.GlyphTable.feature_arrays),
  needed only by MLA with the glyph dimension on.
  """
  if cfg.kind == "mha":
    return MultiHeadAttention(cfg, model_cfg, name=name)
  if cfg.kind == "mla":
    from bookjax.model import mla  # pylint: disable=g-import-not-at-top
    return mla.MLAttention(cfg, model_cfg, glyph=glyph, name=name)
  raise ValueError(f"unknown attention kind {cfg.kind!r}")


def validate_config(cfg, model_cfg, prefix: str = "model.attention") -> None:
  """Raises ValueError naming the field for a bad attention config."""
  if cfg.kind not in ATTENTION_KINDS:
    raise ValueError(f"config.{prefix}.kind: must be one of {ATTENTION_KINDS}, got {cfg.kind!r}")
  if cfg.num_heads < 1:
    raise ValueError(f"config.{prefix}.num_heads: must be >= 1, got {cfg.num_heads}")
  if cfg.impl not in ("full", "blockwise"):
    raise ValueError(f"config.{prefix}.impl: must be 'full' or 'blockwise', got {cfg.impl!r}")
  if cfg.block_size < 1:
    raise ValueError(f"config.{prefix}.block_size: must be >= 1, got {cfg.block_size}")
  if cfg.kind == "mha":
    if cfg.head_dim < 2 or cfg.head_dim % 2:
      raise ValueError(f"config.{prefix}.head_dim: must be even and >= 2 (RoPE), got {cfg.head_dim}")
  else:
    from bookjax.model import mla  # pylint: disable=g-import-not-at-top
    mla.validate_config(cfg, model_cfg, prefix)


# ---------------------------------------------------------------------------------
# Decoding caches
# ---------------------------------------------------------------------------------

def init_layer_cache(cfg, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
  """One attention layer's decoding cache (MHA: K and V; MLA: see mla.init_layer_cache)."""
  if cfg.kind == "mla":
    from bookjax.model import mla  # pylint: disable=g-import-not-at-top
    return mla.init_layer_cache(cfg, batch_size, max_len, dtype)
  shape = (batch_size, max_len, cfg.num_heads, cfg.head_dim)
  return dict(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))


def init_shared_cache(batch_size: int, max_len: int) -> dict:
  """Per-token ids shared by all layers, and the write index."""
  z = jnp.zeros((batch_size, max_len), jnp.int32)
  return dict(index=jnp.zeros((), jnp.int32), segment_ids=z, sentence_ids=z, tokens=z)


def write_shared_cache(shared: dict, ctx: Context) -> dict:
  """Writes the new tokens' ids at shared['index'] (the index itself is not advanced)."""
  upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                             shared["index"], axis=1)
  return dict(shared, segment_ids=upd(shared["segment_ids"], ctx.segment_ids),
              sentence_ids=upd(shared["sentence_ids"], ctx.sentence_ids),
              tokens=upd(shared["tokens"], ctx.tokens))


def cache_bytes_per_token(cfg, dtype: str = "bfloat16", num_layers: int = 1) -> dict:
  """KV-cache size per token for an attention config (any kind, any MLA-3D dims).

  Returns per_layer_values (floats cached per layer), per_layer_bytes (those, in
  `dtype`), shared_bytes (int32 ids cached once for all layers: segment id, plus
  sentence id with 'semantic' and token id with 'glyph'), and bytes_per_layer =
  per_layer_bytes + shared_bytes / num_layers.
  """
  nbytes = jnp.dtype(layers.dtype_of(dtype)).itemsize
  if cfg.kind == "mla":
    from bookjax.model import mla  # pylint: disable=g-import-not-at-top
    vals = mla.cache_values_per_token(cfg)
  else:
    vals = dict(per_layer=dict(k=cfg.num_heads * cfg.head_dim, v=cfg.num_heads * cfg.head_dim),
                shared=dict(segment_ids=1))
  per_layer = sum(vals["per_layer"].values())
  shared = 4 * sum(vals["shared"].values())
  return dict(per_layer_values=per_layer, per_layer_bytes=per_layer * nbytes,
              shared_bytes=shared, bytes_per_layer=per_layer * nbytes + shared / num_layers,
              detail=vals)
