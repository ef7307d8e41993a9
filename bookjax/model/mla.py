r"""MLA-3D: DeepSeek-V2/V3 Multi-head Latent Attention plus three switchable
attention dimensions (semantic, glyph, cultural), with an absorbed decoding cache.

Notation: x_t ∈ R^D (the normed hidden state of token t), H heads, Kn =
qk_nope_head_dim, R = qk_rope_head_dim, V = v_head_dim, L = kv_lora_rank, Lq =
q_lora_rank. Parameter names follow HF transformers' DeepseekV3Attention.

Base MLA (DeepSeek-V2 §2.1, V3 §2.1.1)
  queries   c^Q_t = RMSNorm(x_t W_qa)                [Lq]    q_a_proj, q_a_layernorm
            [q^N_{t,h}; q^R_{t,h}] = c^Q_t W_qb[:,h]  [Kn; R] q_b_proj (x_t W_q if Lq = 0: q_proj)
  key/value [c'_t; k'^R_t] = x_t W_kva                [L; R]  kv_a_proj_with_mqa
            c_t = RMSNorm(c'_t)                       [L]     kv_a_layernorm   (cached)
            k^R_t = RoPE(k'^R_t, pos_t)               [R]     one key for all heads (cached)
            [k^N_{t,h}; v_{t,h}] = c_t W_kvb[:,h]     [Kn; V] kv_b_proj = [W_UK | W_UV]
  q^R_{t,h} = RoPE(q^R_{t,h}, pos_t)
  z_{h,t,s} = σ · (q^N_{t,h}·k^N_{s,h} + q^R_{t,h}·k^R_s),   σ = (Kn+R)^-1/2 · mscale²
  o_{t,h} = Σ_s softmax_s(z_{h,t,s}) v_{s,h};   y_t = Σ_h o_{t,h} W_o[h]   o_proj

Absorbed decoding (only c_s and k^R_s are cached):
  q^N·k^N = (W_UK[:,h] q^N_{t,h})·c_s =: q^L_{t,h}·c_s        (key up-projection into the query)
  o_{t,h} = W_UV[:,h]ᵀ Σ_s p_{h,t,s} c_s              (value up-projection into the output)
so attention is multi-query over the L-dim latent, and K/V are never expanded.
RoPE stays on its own slice (k^R is not a function of c), or absorption breaks.

MLA-3D adds terms to z (each dimension owns its parameters and logical axis names;
with every dimension off nothing below is built and the layer is plain MLA, bit for bit):

Semantic (cross-sentence structure; axes semantic_heads, buckets). With
  d_{t,s} = sent_t - sent_s (the number of sentence boundaries between query and
  key inside their packed document) and bucket() of blockwise.sentence_buckets,
    z_{h,t,s} += β_{h, bucket(d_{t,s})}        for the first `semantic.num_heads` heads
  (β starts at 0). Optional compressed memory (`semantic.memory`): each finished
  earlier sentence j of the document becomes one extra key/value slot
    m_j = RMSNorm(mean_{s ∈ j} c_s)            (memory_norm)
    z_{h,t,j} = σ q^N_{t,h}·(W_UK m_j) + β_{h,bucket(sent_t - j)},  value W_UV m_j,
  visible iff sentence j < sent_t; it is keyed in the latent, so it absorbs too.
  Cache: the sentence id (one int per token, shared by all layers); the memory is
  recomputed from the cached latents.

Glyph (character structure; axes glyph_components, glyph_radicals, glyph_strokes,
  glyph, glyph_heads, glyph_head_dim). Per vocabulary character v with IDS
  components a_{v,1..K}, radical ρ_v and stroke class ς_v (0 = none/unknown, gives 0):
    g_v = RMSNorm(Σ_k E_comp[a_{v,k}] + E_rad[ρ_v] + E_strk[ς_v])            [E]
    k^G_s = g_{tok_s} W_gk                                                   [G]
    q^G_{t,h} = x_t W_gq[:,h] + g_{tok_t} W_gqg[:,h]                         [G]
    z_{h,t,s} += σ q^G_{t,h}·k^G_s          for the first `glyph.num_heads` heads.
  k^G depends on the token id only: decoding recomputes it from the cached token
  ids (one int per token, shared by all layers) instead of caching it.

Cultural (register / dialect; axes registers, register_keys, cultural_heads).
  Soft assignment of each token to `num_registers` learned prototypes P_r ∈ R^D
  (dialect, classical, internet, formal):
    a_t = softmax_r(x_t·P_r / √D)                                            [Rg]
    k^C_s = a_s                (cached: Rg numbers per token per layer)
    q^C_{t,h} = x_t W_cq[:,h] + a_tᵀ A_h                                     [Rg]
    z_{h,t,s} += σ q^C_{t,h}·a_s            for the last `cultural.num_heads` heads,
  i.e. σ (x_t W_cq[:,h])·a_s (content-driven preference for registers) +
  σ a_tᵀ A_h a_s (a learned register-to-register affinity per head: classical
  text attending to classical text, dialect to dialect, ...).

Glyph and cultural channels are concatenated into one extra shared key channel
k^X_s = [k^G_s; a_s] and per-head query q^X_{t,h} (zero for heads a dimension does
not own), so every impl (full, blockwise, absorbed, naive) computes the same sum.

HF DeepseekV3 -> bookjax (torch Linear weight W is [out, in]):
  q_a_proj.weight.T -> q_a_proj [D, Lq];  q_a_layernorm.weight -> q_a_layernorm/scale
  q_b_proj.weight.T.reshape(Lq, H, Kn+R) -> q_b_proj  (q_proj likewise when Lq = 0)
  kv_a_proj_with_mqa.weight.T -> kv_a_proj_with_mqa [D, L+R]
  kv_a_layernorm.weight -> kv_a_layernorm/scale
  kv_b_proj.weight.T.reshape(L, H, Kn+V) -> kv_b_proj
  o_proj.weight.T.reshape(H, V, D) -> o_proj
  RoPE: set attention.rope_interleave = config.rope_interleave (HF default True),
  or keep False and permute the RoPE columns (see rope.py). YaRN: factor,
  original_max_position_embeddings, beta_fast, beta_slow, mscale, mscale_all_dim.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from bookjax.model import blockwise as core
from bookjax.model import layers, rope

DIMENSIONS = ("semantic", "glyph", "cultural")
NUM_RADICALS = 214   # Kangxi radicals; ids 1..214, 0 = unknown
NUM_STROKE_CLASSES = 32  # residual strokes + 1, clipped at 31; 0 = unknown


def parse_dims(cfg) -> tuple[str, ...]:
  """The enabled dimensions of `attention.dims` (comma-separated), in order."""
  return tuple(x.strip() for x in str(cfg.dims).split(",") if x.strip())


def num_dim_heads(n: int, total: int) -> int:
  """A dimension's head count: n, or every head when n == 0."""
  return total if n == 0 else n


# =================================================================================
# Dimension building blocks
# =================================================================================

class GlyphEncoder(nn.Module):
  """g_v for token ids: summed component / radical / stroke embeddings, RMS-normed.

  glyph: dict of numpy arrays (GlyphTable.feature_arrays): component_ids [V, K],
  radical [V], strokes [V], num_components (int; optional num_radicals = 215,
  num_strokes = 32). Token ids outside the table, and 0 entries, contribute nothing.
  """
  embed_dim: int
  glyph: Mapping[str, Any]
  param_dtype: str = "float32"
  eps: float = 1e-6

  @nn.compact
  def __call__(self, tokens_BT):
    g, e, pdt = self.glyph, self.embed_dim, layers.dtype_of(self.param_dtype)
    init = nn.initializers.normal(1.0)  # embedding-like tables (RMS-normed after the sum)
    comp_tab = layers.param_with_axes(self, "component_embed", init,
                                      (int(g["num_components"]), e),
                                      ("glyph_components", "glyph"), pdt)
    rad_tab = layers.param_with_axes(self, "radical_embed", init,
                                     (int(g.get("num_radicals", NUM_RADICALS + 1)), e),
                                     ("glyph_radicals", "glyph"), pdt)
    str_tab = layers.param_with_axes(self, "stroke_embed", init,
                                     (int(g.get("num_strokes", NUM_STROKE_CLASSES)), e),
                                     ("glyph_strokes", "glyph"), pdt)
    take = lambda a: jnp.take(jnp.asarray(a, jnp.int32), tokens_BT, axis=0, mode="fill",
                              fill_value=0)
    comp_BTK, rad_BT, str_BT = take(g["component_ids"]), take(g["radical"]), take(g["strokes"])
    # Row 0 (none / unknown) of every table is zeroed, so id 0 contributes nothing.
    # (Zeroing the table, not the gathered rows: a mask multiply after the gather
    # makes XLA:CPU fuse the gather badly, ~20x slower.)
    lookup = lambda tab, ids: jnp.take(
        tab.astype(jnp.float32) * (jnp.arange(tab.shape[0]) > 0)[:, None], ids, axis=0)
    g_BTE = (lookup(comp_tab, comp_BTK).sum(axis=-2) + lookup(rad_tab, rad_BT)
             + lookup(str_tab, str_BT))
    return layers.RMSNorm(self.eps, axis_name="glyph", param_dtype=self.param_dtype,
                          name="glyph_norm")(g_BTE)


def segmented_prefix_mean(c_BSL, seg_BS, sent_BS):
  """Mean of c over the positions so far of each token's (segment, sentence). f32."""
  b, s = seg_BS.shape
  change = (seg_BS[:, 1:] != seg_BS[:, :-1]) | (sent_BS[:, 1:] != sent_BS[:, :-1])
  start = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)

  def combine(a, z):
    sa, na, fa = a
    sz, nz, fz = z
    return (jnp.where(fz[..., None], sz, sa + sz), jnp.where(fz, nz, na + nz), fa | fz)

  tot, cnt, _ = jax.lax.associative_scan(
      combine, (c_BSL.astype(jnp.float32), jnp.ones((b, s), jnp.float32), start), axis=1)
  return tot / cnt[..., None]


def sentence_ends(seg_BS, sent_BS):
  """True where the next row position starts another sentence / segment (or at the end)."""
  b = seg_BS.shape[0]
  change = (seg_BS[:, 1:] != seg_BS[:, :-1]) | (sent_BS[:, 1:] != sent_BS[:, :-1])
  return jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)


# =================================================================================
# The layer
# =================================================================================

class MLAttention(nn.Module):
  """MLA-3D attention. `__call__(x, ctx)` for training / prefill; with `cache` and
  `shared` it extends a decoding cache (see `init_layer_cache`) and returns
  (y, new_cache): absorbed by default, or `naive=True` re-expanding K/V."""
  cfg: Any        # model.attention config
  model_cfg: Any  # model config
  glyph: Optional[Mapping[str, Any]] = None

  # ---- parameters -----------------------------------------------------------------
  def setup(self):
    a, m = self.cfg, self.model_cfg
    d, h = m.d_model, a.num_heads
    kn, r, v, lat = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim, a.kv_lora_rank
    self.dims = parse_dims(a)
    pdt = layers.dtype_of(m.param_dtype)
    w = lambda name, shape, axes, init=None: layers.param_with_axes(
        self, name, init or nn.initializers.normal(m.init_std), shape, axes, pdt)
    norm = lambda name, axis: layers.RMSNorm(m.rms_eps, axis_name=axis,
                                             param_dtype=m.param_dtype, name=name)
    if a.q_lora_rank > 0:
      self.q_a_proj = w("q_a_proj", (d, a.q_lora_rank), ("embed", "q_latent"))
      self.q_a_layernorm = norm("q_a_layernorm", "q_latent")
      self.q_b_proj = w("q_b_proj", (a.q_lora_rank, h, kn + r), ("q_latent", "heads", "head_dim"))
    else:
      self.q_proj = w("q_proj", (d, h, kn + r), ("embed", "heads", "head_dim"))
    self.kv_a_proj_with_mqa = w("kv_a_proj_with_mqa", (d, lat + r), ("embed", "kv_latent"))
    self.kv_a_layernorm = norm("kv_a_layernorm", "kv_latent")
    self.kv_b_proj = w("kv_b_proj", (lat, h, kn + v), ("kv_latent", "heads", "head_dim"))
    self.o_proj = w("o_proj", (h, v, d), ("heads", "head_dim", "embed"))
    if "semantic" in self.dims:
      hs = num_dim_heads(a.semantic.num_heads, h)
      self.semantic_bias = w("semantic_bias", (hs, a.semantic.num_buckets),
                             ("semantic_heads", "buckets"), nn.initializers.zeros)
      if a.semantic.memory:
        self.memory_norm = norm("memory_norm", "kv_latent")
    if "glyph" in self.dims:
      if self.glyph is None:
        raise ValueError("config.model.attention.dims: 'glyph' needs glyph features; build "
                         "the model with glyph=GlyphTable.feature_arrays(max_components=4)")
      gc = a.glyph
      hg = num_dim_heads(gc.num_heads, h)
      self.glyph_encoder = GlyphEncoder(gc.embed_dim, self.glyph, m.param_dtype, m.rms_eps)
      self.glyph_q_proj = w("glyph_q_proj", (d, hg, gc.head_dim),
                            ("embed", "glyph_heads", "glyph_head_dim"))
      self.glyph_q_glyph_proj = w("glyph_q_glyph_proj", (gc.embed_dim, hg, gc.head_dim),
                                  ("glyph", "glyph_heads", "glyph_head_dim"))
      self.glyph_k_proj = w("glyph_k_proj", (gc.embed_dim, gc.head_dim),
                            ("glyph", "glyph_head_dim"))
    if "cultural" in self.dims:
      cc = a.cultural
      hc = num_dim_heads(cc.num_heads, h)
      self.register_prototypes = w("register_prototypes", (cc.num_registers, d),
                                   ("registers", "embed"), nn.initializers.normal(1.0))
      self.cultural_q_proj = w("cultural_q_proj", (d, hc, cc.num_registers),
                               ("embed", "cultural_heads", "registers"))
      self.register_affinity = w("register_affinity", (hc, cc.num_registers, cc.num_registers),
                                 ("cultural_heads", "registers", "register_keys"))

  # ---- helpers ----------------------------------------------------------------------
  @property
  def _dt(self):
    return layers.dtype_of(self.model_cfg.compute_dtype)

  def _mm(self, eq, x, w):
    """einsum in the compute dtype."""
    return jnp.einsum(eq, x.astype(self._dt), w.astype(self._dt))

  def _spec(self) -> core.Spec:
    a = self.cfg
    sem = "semantic" in self.dims
    return core.Spec(
        scale=rope.softmax_scale(a.qk_nope_head_dim + a.qk_rope_head_dim, a.yarn),
        num_buckets=a.semantic.num_buckets if sem else 0,
        max_distance=a.semantic.max_distance,
        has_memory=bool(sem and a.semantic.memory))

  def _semantic_table(self):
    """β padded to all heads [H, buckets] (zeros for heads without the bias), or None."""
    if "semantic" not in self.dims:
      return None
    hs = self.semantic_bias.shape[0]
    return jnp.pad(self.semantic_bias, ((0, self.cfg.num_heads - hs), (0, 0)))

  def _w_uk_uv(self):
    """W_UK [L, H, Kn] and W_UV [L, H, V] from kv_b_proj."""
    kn = self.cfg.qk_nope_head_dim
    return self.kv_b_proj[..., :kn], self.kv_b_proj[..., kn:]

  def _rope(self, x, positions):
    a = self.cfg
    inv = rope.rope_inv_freq(a.qk_rope_head_dim, a.rope_theta, a.yarn)
    return rope.apply_rope(x, positions, inv, rope.yarn_attention_factor(a.yarn),
                           interleave=bool(a.rope_interleave))

  def _project(self, x_BTD, positions_BT):
    """q^N [B,T,H,Kn], RoPE'd q^R [B,T,H,R], latent c [B,T,L], RoPE'd k^R [B,T,R]."""
    a = self.cfg
    if a.q_lora_rank > 0:
      cq = self.q_a_layernorm(self._mm("btd,dq->btq", x_BTD, self.q_a_proj))
      q = self._mm("btq,qhk->bthk", cq, self.q_b_proj)
    else:
      q = self._mm("btd,dhk->bthk", x_BTD, self.q_proj)
    q = layers.constrain(q, ("batch", "length", "heads", "head_dim"))
    q_nope, q_rope = q[..., :a.qk_nope_head_dim], q[..., a.qk_nope_head_dim:]
    ckv = self._mm("btd,dl->btl", x_BTD, self.kv_a_proj_with_mqa)
    c = self.kv_a_layernorm(ckv[..., :a.kv_lora_rank])
    c = layers.constrain(c, ("batch", "length", "kv_latent"))
    return q_nope, self._rope(q_rope, positions_BT), c, self._rope(ckv[..., a.kv_lora_rank:],
                                                                   positions_BT)

  def _registers(self, x_BTD):
    """Soft register assignment a [B,T,Rg] (compute dtype)."""
    p = self.register_prototypes.astype(jnp.float32)
    z = jnp.einsum("btd,rd->btr", x_BTD.astype(jnp.float32), p) * (x_BTD.shape[-1] ** -0.5)
    return jax.nn.softmax(z, axis=-1).astype(self._dt)

  def _extra_query(self, x_BTD, tokens_BT, reg_BTR):
    """q^X [B,T,H,G+Rg] (glyph heads first, cultural heads last; zeros elsewhere)."""
    h, parts = self.cfg.num_heads, []
    if "glyph" in self.dims:
      g = self.glyph_encoder(tokens_BT)
      qg = (self._mm("btd,dhg->bthg", x_BTD, self.glyph_q_proj)
            + self._mm("bte,ehg->bthg", g, self.glyph_q_glyph_proj))
      parts.append(jnp.pad(qg, ((0, 0), (0, 0), (0, h - qg.shape[2]), (0, 0))))
    if "cultural" in self.dims:
      qc = (self._mm("btd,dhr->bthr", x_BTD, self.cultural_q_proj)
            + self._mm("btr,hrs->bths", reg_BTR, self.register_affinity))
      parts.append(jnp.pad(qc, ((0, 0), (0, 0), (h - qc.shape[2], 0), (0, 0))))
    return jnp.concatenate(parts, axis=-1) if parts else None

  def _glyph_keys(self, tokens_BS, via_vocab: bool = False):
    """k^G [B,S,G] = g_tok W_gk. via_vocab: compute k^G for the whole glyph table
    once and gather rows (cheaper when B·S exceeds the vocabulary, as in decoding)."""
    if not via_vocab:
      return self._mm("bse,eg->bsg", self.glyph_encoder(tokens_BS), self.glyph_k_proj)
    vocab = self.glyph["radical"].shape[0]
    table = self._mm("bve,eg->bvg", self.glyph_encoder(jnp.arange(vocab)[None]),
                     self.glyph_k_proj)[0]
    return jnp.take(table, tokens_BS, axis=0, mode="fill", fill_value=0)

  def _extra_key(self, tokens_BS, reg_BSR, decoding: bool = False):
    """k^X [B,S,G+Rg]: glyph keys (from token ids) and register assignments."""
    parts = []
    if "glyph" in self.dims:
      via_vocab = decoding and tokens_BS.size >= self.glyph["radical"].shape[0]
      parts.append(self._glyph_keys(tokens_BS, via_vocab))
    if "cultural" in self.dims:
      parts.append(reg_BSR.astype(self._dt))
    return jnp.concatenate(parts, axis=-1) if parts else None

  def _memory_keys(self, keys: core.Keys, c_BSL, absorbed: bool) -> core.Keys:
    """Appends one memory slot per finished sentence (kind 1) after the token keys."""
    m = self.memory_norm(segmented_prefix_mean(c_BSL, keys.seg, keys.sent).astype(self._dt))
    if absorbed:
      main, value = m, m
    else:
      w_uk, w_uv = self._w_uk_uv()
      main, value = self._mm("bsl,lhk->bshk", m, w_uk), self._mm("bsl,lhv->bshv", m, w_uv)
    ends = sentence_ends(keys.seg, keys.sent)
    mem = core.Keys(main=main, rope=jnp.zeros_like(keys.rope),
                    extra=None if keys.extra is None else jnp.zeros_like(keys.extra),
                    value=value, idx=keys.idx, seg=keys.seg, sent=keys.sent,
                    kind=jnp.where(ends, 1, -1).astype(jnp.int32))
    return core.concat_keys(keys, mem)

  def _out(self, o_BTHV):
    y = self._mm("bthv,hvd->btd", o_BTHV, self.o_proj)
    return layers.constrain(y, ("batch", "length", "embed"))

  # ---- training / prefill -------------------------------------------------------------
  def __call__(self, x_BTD, ctx, cache=None, shared=None, naive: bool = False):
    if cache is not None:
      return self._extend(x_BTD, ctx, cache, shared, naive)
    a = self.cfg
    b, t = ctx.positions.shape
    q_nope, q_rope, c, k_rope = self._project(x_BTD, ctx.positions)
    w_uk, w_uv = self._w_uk_uv()
    k_nope = self._mm("btl,lhk->bthk", c, w_uk)
    v = self._mm("btl,lhv->bthv", c, w_uv)
    reg = self._registers(x_BTD) if "cultural" in self.dims else None
    idx = core.row_meta(b, t)
    q = core.Queries(main=q_nope, rope=q_rope, extra=self._extra_query(x_BTD, ctx.tokens, reg),
                     idx=idx, seg=ctx.segment_ids, sent=ctx.sentence_ids)
    keys = core.Keys(main=k_nope, rope=k_rope, extra=self._extra_key(ctx.tokens, reg), value=v,
                     idx=idx, seg=ctx.segment_ids, sent=ctx.sentence_ids,
                     kind=jnp.zeros_like(idx))
    spec = self._spec()
    if spec.has_memory:
      keys = self._memory_keys(keys, c, absorbed=False)
    out = core.attend(q, keys, spec, self._semantic_table(), a.impl, a.block_size)
    return self._out(out)

  # ---- decoding -------------------------------------------------------------------
  def _extend(self, x_BTD, ctx, cache, shared, naive: bool):
    """Appends T new tokens at `shared['index']` and attends over the cache.

    cache: this layer's {'c_kv' [B,S,L], 'k_rope' [B,S,R], ('registers' [B,S,Rg])};
    shared: {'index', 'segment_ids', 'sentence_ids', 'tokens'} with the new tokens
    already written. Returns (y [B,T,D], new cache).
    """
    b, t = ctx.positions.shape
    index = shared["index"]
    q_nope, q_rope, c_new, kr_new = self._project(x_BTD, ctx.positions)
    upd = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype),
                                                               index, axis=1)
    cache = dict(cache, c_kv=upd(cache["c_kv"], c_new), k_rope=upd(cache["k_rope"], kr_new))
    reg_new = None
    if "cultural" in self.dims:
      reg_new = self._registers(x_BTD)
      cache["registers"] = upd(cache["registers"], reg_new)
    c = cache["c_kv"]
    s = c.shape[1]
    w_uk, w_uv = self._w_uk_uv()
    if naive:
      q_main = q_nope
      k_main, v = self._mm("bsl,lhk->bshk", c, w_uk), self._mm("bsl,lhv->bshv", c, w_uv)
    else:
      q_main = self._mm("bthk,lhk->bthl", q_nope, w_uk)
      k_main, v = c, c
    q = core.Queries(main=q_main, rope=q_rope,
                     extra=self._extra_query(x_BTD, ctx.tokens, reg_new),
                     idx=core.row_meta(b, t, index), seg=ctx.segment_ids, sent=ctx.sentence_ids)
    kidx = core.row_meta(b, s)
    keys = core.Keys(main=k_main, rope=cache["k_rope"],
                     extra=self._extra_key(shared["tokens"], cache.get("registers"),
                                           decoding=True),
                     value=v, idx=kidx, seg=shared["segment_ids"], sent=shared["sentence_ids"],
                     kind=jnp.zeros_like(kidx))
    spec = self._spec()
    if spec.has_memory:
      keys = self._memory_keys(keys, c, absorbed=not naive)
    impl = self.cfg.impl if t > 1 else "full"
    out = core.attend(q, keys, spec, self._semantic_table(), impl, self.cfg.block_size)
    if not naive:
      out = self._mm("bthl,lhv->bthv", out, w_uv)
    return self._out(out), cache


# =================================================================================
# Cache
# =================================================================================

def init_layer_cache(cfg, batch_size: int, max_len: int, dtype=jnp.float32) -> dict:
  """One MLA layer's decoding cache: normalised latent, RoPE key, register assignment."""
  out = dict(c_kv=jnp.zeros((batch_size, max_len, cfg.kv_lora_rank), dtype),
             k_rope=jnp.zeros((batch_size, max_len, cfg.qk_rope_head_dim), dtype))
  if "cultural" in parse_dims(cfg):
    out["registers"] = jnp.zeros((batch_size, max_len, cfg.cultural.num_registers), dtype)
  return out


def cache_values_per_token(cfg) -> dict:
  """Per token: floats cached per layer, and int32 ids shared by all layers.

  Every decoding cache also holds the segment id (1 int, all attention kinds).
  """
  dims = parse_dims(cfg)
  floats = dict(c_kv=cfg.kv_lora_rank, k_rope=cfg.qk_rope_head_dim)
  if "cultural" in dims:
    floats["registers"] = cfg.cultural.num_registers
  ints = dict(segment_ids=1)
  if "semantic" in dims:
    ints["sentence_ids"] = 1
  if "glyph" in dims:
    ints["tokens"] = 1
  return dict(per_layer=floats, shared=ints)


# =================================================================================
# Validation
# =================================================================================

def validate_config(cfg, model_cfg, prefix: str = "model.attention") -> None:
  """Raises ValueError naming the field, e.g. 'config.model.attention.qk_rope_head_dim: ...'."""
  def req(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{prefix}.{field}: {msg}")

  h = cfg.num_heads
  req(cfg.kv_lora_rank >= 1, "kv_lora_rank",
      f"must be >= 1 with kind='mla' (the KV latent rank), got {cfg.kv_lora_rank}")
  req(cfg.q_lora_rank >= 0, "q_lora_rank",
      f"must be >= 0 (0: direct query projection), got {cfg.q_lora_rank}")
  req(cfg.qk_rope_head_dim >= 2 and cfg.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
      f"must be even and >= 2 (RoPE rotates pairs), got {cfg.qk_rope_head_dim}")
  req(cfg.qk_nope_head_dim >= 1, "qk_nope_head_dim", f"must be >= 1, got {cfg.qk_nope_head_dim}")
  req(cfg.v_head_dim >= 1, "v_head_dim", f"must be >= 1, got {cfg.v_head_dim}")
  req(cfg.rope_theta > 0, "rope_theta", f"must be > 0, got {cfg.rope_theta}")
  req(cfg.block_size >= 1, "block_size", f"must be >= 1, got {cfg.block_size}")
  dims = parse_dims(cfg)
  for name in dims:
    req(name in DIMENSIONS, "dims", f"unknown dimension {name!r}; known: {list(DIMENSIONS)}")
  req(len(set(dims)) == len(dims), "dims", f"repeats a dimension: {cfg.dims!r}")
  if "semantic" in dims:
    s = cfg.semantic
    req(s.num_buckets >= 1, "semantic.num_buckets", f"must be >= 1, got {s.num_buckets}")
    req(0 <= s.num_heads <= h, "semantic.num_heads",
        f"must lie in [0, num_heads={h}] (0: every head), got {s.num_heads}")
    req(s.max_distance >= s.num_buckets, "semantic.max_distance",
        f"must be >= semantic.num_buckets={s.num_buckets}, got {s.max_distance}")
  if "glyph" in dims:
    g = cfg.glyph
    req(0 <= g.num_heads <= h, "glyph.num_heads",
        f"must lie in [0, num_heads={h}] (0: every head), got {g.num_heads}")
    req(g.head_dim >= 1, "glyph.head_dim", f"must be >= 1, got {g.head_dim}")
    req(g.embed_dim >= 1, "glyph.embed_dim", f"must be >= 1, got {g.embed_dim}")
  if "cultural" in dims:
    c = cfg.cultural
    req(c.num_registers >= 2, "cultural.num_registers", f"must be >= 2, got {c.num_registers}")
    req(0 <= c.num_heads <= h, "cultural.num_heads",
        f"must lie in [0, num_heads={h}] (0: every head), got {c.num_heads}")
  y = cfg.yarn
  req(y.factor >= 1.0, "yarn.factor", f"must be >= 1 (1: YaRN off), got {y.factor}")
  if y.factor > 1.0:
    req(y.original_max_len >= 1, "yarn.original_max_len", f"must be >= 1, got {y.original_max_len}")
    req(y.beta_fast > y.beta_slow > 0, "yarn.beta_fast",
        f"need beta_fast > beta_slow > 0, got {y.beta_fast}, {y.beta_slow}")
    req(y.mscale >= 0, "yarn.mscale", f"must be >= 0, got {y.mscale}")
    req(y.mscale_all_dim >= 0, "yarn.mscale_all_dim", f"must be >= 0, got {y.mscale_all_dim}")
