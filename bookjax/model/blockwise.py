"""The softmax-attention core shared by MHA and MLA(-3D): full (reference) and
blockwise (online softmax, memory linear in sequence length).

A query/key pair's logit is

  z[b,h,t,s] = scale · (q.main[t,h]·k.main[s(,h)] + q.rope[t,h]·k.rope[s])
             + scale · q.extra[t,h]·k.extra[s]                     (MLA-3D glyph / cultural)
             + Σ_n sem[h,n] · [bucket(sent[t] - sent[s]) = n]       (MLA-3D semantic)

Keys may be per head (`main` [B,S,H,A], `value` [B,S,H,V]: expanded MLA, MHA) or
shared by all heads (`main` [B,S,A], `value` [B,S,V]: absorbed MLA, where A = V =
kv_lora_rank and attention is multi-query over the latent). `rope` / `extra` keys
are always shared ([B,S,R] / [B,S,E]).

Masking (see attention.py): same non-zero segment, and either `kind == 0` (a
token) with key row index <= query row index, or `kind == 1` (a semantic memory
slot) with key sentence < query sentence. `kind == -1` keys are never attended.
Fully masked rows give zeros.

Blockwise (flash-attention style, a custom VJP): queries are processed in blocks;
each query block loops (`fori_loop`) over only the key blocks it needs (a key block
whose valid keys all lie after the query block is never visited) with a running
(max m, normaliser l, accumulator acc):

  m' = max(m, max_s z),  p = exp(z - m'),  l' = l e^(m-m') + Σ_s p,
  acc' = acc e^(m-m') + p v,   out = acc / l,   lse = m + ln l.

Only (inputs, out, lse) are saved. The backward pass recomputes each needed block
pair's probabilities p = exp(z - lse) and applies

  dV = pᵀ dO,  dP = dO Vᵀ,  dZ = p ⊙ (dP - rowsum(dO ⊙ O)),

then the score function's own VJP maps dZ to the query, key and semantic-bias
gradients; dq is a per-block carry, dk / dv / d_sem full-size carries updated in
place. Memory is O(T) (never a T x T array); compute skips the masked half.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import flax
import jax
import jax.numpy as jnp

NEG_INF = -1e30  # finite, so fully-masked rows give zeros instead of NaN
_BIG = 2 ** 30


@flax.struct.dataclass
class Queries:
  """Query side. main/rope/extra: [B, T, H, *]; idx/seg/sent: [B, T] int32."""
  main: jnp.ndarray
  rope: Optional[jnp.ndarray]
  extra: Optional[jnp.ndarray]
  idx: jnp.ndarray
  seg: jnp.ndarray
  sent: jnp.ndarray


@flax.struct.dataclass
class Keys:
  """Key side. main [B,S,H,A] | [B,S,A]; rope [B,S,R]; extra [B,S,E];
  value [B,S,H,V] | [B,S,V]; idx/seg/sent/kind [B, S] int32."""
  main: jnp.ndarray
  rope: Optional[jnp.ndarray]
  extra: Optional[jnp.ndarray]
  value: jnp.ndarray
  idx: jnp.ndarray
  seg: jnp.ndarray
  sent: jnp.ndarray
  kind: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Spec:
  """Static settings. num_buckets 0: no semantic bias; has_memory: kind-1 keys."""
  scale: float
  num_buckets: int = 0
  max_distance: int = 32
  has_memory: bool = False


def concat_keys(a: Keys, b: Keys) -> Keys:
  """Concatenates two key sets along S (e.g. tokens then memory slots)."""
  return jax.tree.map(lambda x, y: jnp.concatenate([x, y], axis=1), a, b)


def sentence_buckets(dist, num_buckets: int, max_distance: int):
  """Buckets a sentence distance (>= 0; negative clipped to 0), T5-style.

  Distances below `exact = num_buckets // 2` get their own bucket; larger ones
  share log-spaced buckets up to `max_distance`; beyond it the last bucket:
    bucket(d) = d                                               if d < exact
              = min(exact + floor(ln(d/exact) / ln(max_distance/exact)
                                   · (num_buckets - exact)), num_buckets - 1)
  """
  d = jnp.maximum(dist, 0)
  exact = num_buckets // 2
  if exact < 1 or max_distance <= exact:
    return jnp.minimum(d, num_buckets - 1).astype(jnp.int32)
  df = jnp.maximum(d, 1).astype(jnp.float32)
  frac = jnp.log(df / exact) / math.log(max_distance / exact)
  far = exact + jnp.floor(frac * (num_buckets - exact)).astype(jnp.int32)
  return jnp.where(d < exact, d, jnp.minimum(far, num_buckets - 1)).astype(jnp.int32)


def _semantic_bias(q: Queries, k: Keys, sem_HN, spec: Spec):
  """[B, H, T, S] bias sem[h, bucket(sent_q - sent_k)] (a one-hot einsum: no scatter)."""
  b_BTS = sentence_buckets(q.sent[:, :, None] - k.sent[:, None, :], spec.num_buckets,
                           spec.max_distance)
  onehot = jax.nn.one_hot(b_BTS, spec.num_buckets, dtype=jnp.float32)
  return jnp.einsum("btsn,hn->bhts", onehot, sem_HN.astype(jnp.float32))


def _dot_f32(eq: str, a, b):
  """einsum with float32 accumulation and output. On CPU, low-precision operands are
  upcast first: XLA:CPU's DotThunk rejects some bf16 x bf16 -> f32 shapes (e.g. a
  [2,4,1,S] x [2,S,V] decode step) and has no faster bf16 path anyway."""
  if jax.default_backend() == "cpu":
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32)


def logits(q: Queries, k: Keys, spec: Spec, sem_HN=None):
  """Unmasked logits [B, H, T, S] in float32 (the equation in the module doc)."""
  eq = "bthd,bshd->bhts" if k.main.ndim == 4 else "bthd,bsd->bhts"
  z = _dot_f32(eq, q.main, k.main)
  if q.rope is not None:
    z = z + _dot_f32("bthr,bsr->bhts", q.rope, k.rope)
  z = z * spec.scale
  if q.extra is not None:
    z = z + _dot_f32("bthe,bse->bhts", q.extra, k.extra) * spec.scale
  if spec.num_buckets:
    z = z + _semantic_bias(q, k, sem_HN, spec)
  return z


def mask(q: Queries, k: Keys, spec: Spec):
  """Boolean [B, 1, T, S]: which keys each query may attend to."""
  qs, ks = q.seg[:, :, None], k.seg[:, None, :]
  ok = (qs == ks) & (qs > 0)
  past = k.idx[:, None, :] <= q.idx[:, :, None]
  if spec.has_memory:
    kind = k.kind[:, None, :]
    mem = (kind == 1) & (k.sent[:, None, :] < q.sent[:, :, None])
    ok = ok & (((kind == 0) & past) | mem)
  else:
    ok = ok & past
  return ok[:, None]


def _attend_values(p_BHTS, k: Keys):
  eq = "bhts,bshv->bthv" if k.value.ndim == 4 else "bhts,bsv->bthv"
  return _dot_f32(eq, p_BHTS.astype(k.value.dtype), k.value)


def full(q: Queries, k: Keys, spec: Spec, sem_HN=None):
  """Reference attention, T x S logits at once. Returns [B, T, H, V] (value dtype)."""
  msk = mask(q, k, spec)
  z = jnp.where(msk, logits(q, k, spec, sem_HN), NEG_INF)
  p = jnp.where(msk, jax.nn.softmax(z, axis=-1), 0.0)
  return _attend_values(p, k).astype(k.value.dtype)


# ---------------------------------------------------------------------------------
# Blockwise
# ---------------------------------------------------------------------------------

def _pad_time(tree, multiple: int):
  """Pads axis 1 of every leaf with zeros up to a multiple (seg 0 = masked)."""
  def pad(x):
    n = (-x.shape[1]) % multiple
    if not n:
      return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, n)
    return jnp.pad(x, widths)
  return jax.tree.map(pad, tree)


def _split_blocks(tree, block: int):
  """[B, N*block, ...] -> [N, B, block, ...] for every leaf."""
  def split(x):
    b, n = x.shape[0], x.shape[1] // block
    return jnp.moveaxis(x.reshape((b, n, block) + x.shape[2:]), 1, 0)
  return jax.tree.map(split, tree)


def _online_step(carry, q: Queries, k: Keys, spec: Spec, sem_HN):
  """One key block of the online softmax. carry: m, l [B,H,Tq]; acc [B,Tq,H,V] f32."""
  m, l, acc = carry
  msk = mask(q, k, spec)
  z = jnp.where(msk, logits(q, k, spec, sem_HN), NEG_INF)
  m_new = jnp.maximum(m, jnp.max(z, axis=-1))
  p = jnp.where(msk, jnp.exp(z - m_new[..., None]), 0.0)
  corr = jnp.exp(m - m_new)
  l_new = l * corr + jnp.sum(p, axis=-1)
  acc_new = acc * jnp.swapaxes(corr, 1, 2)[..., None] + _attend_values(p, k)
  return m_new, l_new, acc_new


def _floats(x):
  """The differentiable fields: (main, rope, extra) of Queries, + value for Keys."""
  if isinstance(x, Keys):
    return (x.main, x.rope, x.extra, x.value)
  return (x.main, x.rope, x.extra)


def _with_floats(x, f):
  if isinstance(x, Keys):
    return x.replace(main=f[0], rope=f[1], extra=f[2], value=f[3])
  return x.replace(main=f[0], rope=f[1], extra=f[2])


def _index(tree, j):
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False), tree)


def _add_at(tree, j, delta):
  """tree[j] += delta along the leading axis (dynamic-update-slice, no scatter)."""
  def upd(x, d):
    if d is None:
      return x
    cur = jax.lax.dynamic_index_in_dim(x, j, 0, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(x, cur + d.astype(x.dtype), j, 0)
  return jax.tree.map(upd, tree, delta, is_leaf=lambda x: x is None)


def _block_plan(qb: Queries, kb: Keys):
  """Which key blocks each query block needs: order [Nq, Nk] (needed ones first, in
  key order) and count [Nq]. A key block is skipped when every valid key in it lies
  after every query of the block (row index), for the whole batch."""
  qmax = jnp.max(jnp.where(qb.seg > 0, qb.idx, -1), axis=(1, 2))
  k_ok = (kb.seg > 0) & (kb.kind >= 0)
  kmin = jnp.min(jnp.where(k_ok, kb.idx, _BIG), axis=(1, 2))
  need = kmin[None, :] <= qmax[:, None]
  order = jnp.argsort(jnp.logical_not(need), axis=1, stable=True).astype(jnp.int32)
  return order, jnp.sum(need, axis=1).astype(jnp.int32)


def _flash_forward(spec: Spec, qb: Queries, kb: Keys, sem_HN):
  """Blocked inputs [N, B, blk, ...] -> out [Nq, B, bq, H, V] f32, lse [Nq, B, H, bq]."""
  _, b, bq, h = qb.main.shape[:4]
  v_dim = kb.value.shape[-1]
  order, count = _block_plan(qb, kb)

  def q_block(xs):
    qi, order_i, count_i = xs
    body = lambda n, c: _online_step(c, qi, _index(kb, order_i[n]), spec, sem_HN)
    init = (jnp.full((b, h, bq), NEG_INF, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
            jnp.zeros((b, bq, h, v_dim), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, count_i, body, init)
    safe_l = jnp.where(l > 0, l, 1.0)
    out = acc / jnp.swapaxes(safe_l, 1, 2)[..., None]
    return out, m + jnp.log(safe_l)

  return jax.lax.map(q_block, (qb, order, count))


def _flash_block_grads(spec: Spec, qi: Queries, ki: Keys, sem_HN, do_i, lse_i, dd_i):
  """Gradients of one (query block, key block) pair, recomputing p from the lse.

  p = exp(z - lse); dV = pᵀ dO; dP = dO Vᵀ; dZ = p ⊙ (dP - rowsum(dO ⊙ O));
  the score function's own VJP maps dZ to the query / key / bias gradients.
  """
  z_fn = lambda qf, kf, s: logits(_with_floats(qi, qf), _with_floats(ki, kf + (ki.value,)),
                                  spec, s)
  z, z_vjp = jax.vjp(z_fn, _floats(qi), _floats(ki)[:3], sem_HN)
  msk = mask(qi, ki, spec)
  p = jnp.where(msk, jnp.exp(z - lse_i[..., None]), 0.0)
  _, v_vjp = jax.vjp(lambda p_, v_: _attend_values(p_, ki.replace(value=v_)), p, ki.value)
  dp, dv = v_vjp(do_i)
  dz = p * (dp - dd_i[..., None])
  dq, dk, dsem = z_vjp(dz)
  return dq, dk + (dv,), dsem


def _zeros_like_floats(fields):
  return tuple(None if x is None else jnp.zeros(x.shape, jnp.float32) for x in fields)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec: Spec, qb: Queries, kb: Keys, sem_HN):
  return _flash_forward(spec, qb, kb, sem_HN)[0]


def _flash_fwd(spec, qb, kb, sem_HN):
  out, lse = _flash_forward(spec, qb, kb, sem_HN)
  return out, (qb, kb, sem_HN, out, lse)


def _flash_bwd(spec, res, d_out):
  """Scans query blocks; for each, loops over the key blocks it needs, accumulating
  dq (small carry) and dk, dv, d_sem (full-size carries, updated in place)."""
  qb, kb, sem_HN, out, lse = res
  dd = jnp.swapaxes(jnp.sum(d_out * out, axis=-1), 2, 3)  # rowsum(dO ⊙ O): [Nq, B, H, bq]
  order, count = _block_plan(qb, kb)
  sem0 = None if sem_HN is None else jnp.zeros(sem_HN.shape, jnp.float32)

  def q_step(carry, xs):
    qi, do_i, lse_i, dd_i, order_i, count_i = xs

    def k_step(n, c):
      dq_i, dk_all, dsem = c
      j = order_i[n]
      dq, dk, ds = _flash_block_grads(spec, qi, _index(kb, j), sem_HN, do_i, lse_i, dd_i)
      dq_i = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), dq_i, dq)
      dsem = None if dsem is None else dsem + ds
      return dq_i, _add_at(dk_all, j, dk), dsem

    dk_all, dsem = carry
    init = (_zeros_like_floats(_floats(qi)), dk_all, dsem)
    dq_i, dk_all, dsem = jax.lax.fori_loop(0, count_i, k_step, init)
    return (dk_all, dsem), dq_i

  dk0 = _zeros_like_floats(_floats(kb))
  (dk_all, dsem), dq = jax.lax.scan(q_step, (dk0, sem0), (qb, d_out, lse, dd, order, count))
  cast = lambda g, x: None if g is None else g.astype(x.dtype)
  dq = _with_floats(jax.tree.map(lambda _: None, qb), tuple(map(cast, dq, _floats(qb))))
  dk = _with_floats(jax.tree.map(lambda _: None, kb), tuple(map(cast, dk_all, _floats(kb))))
  return dq, dk, None if dsem is None else dsem.astype(sem_HN.dtype)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise(q: Queries, k: Keys, spec: Spec, sem_HN=None, block_q: int = 128,
              block_k: int = 128):
  """Same result as `full` with O(T) memory. Returns [B, T, H, V] (value dtype).

  A custom VJP (flash-attention style): the forward keeps only the output and
  the per-row log-sum-exp; the backward recomputes each block's probabilities.
  """
  b, t, h = q.main.shape[:3]
  v_dim = k.value.shape[-1]
  bq, bk = min(block_q, t), min(block_k, k.main.shape[1])
  kb = _split_blocks(_pad_time(k, bk), bk)
  qb = _split_blocks(_pad_time(q, bq), bq)
  out = _flash(spec, qb, kb, sem_HN)                     # [Nq, B, bq, H, V]
  out = jnp.moveaxis(out, 0, 1).reshape((b, -1, h, v_dim))
  return out[:, :t].astype(k.value.dtype)


def attend(q: Queries, k: Keys, spec: Spec, sem_HN=None, impl: str = "full",
           block_size: int = 128):
  """Dispatches to `full` or `blockwise` by name."""
  if impl == "full":
    return full(q, k, spec, sem_HN)
  if impl == "blockwise":
    return blockwise(q, k, spec, sem_HN, block_size, block_size)
  raise ValueError(f"unknown attention impl {impl!r}")


def row_meta(batch: int, length: int, offset=0):
  """Row indices [B, T] int32: offset + arange(T) for every row."""
  idx = jnp.arange(length, dtype=jnp.int32) + jnp.asarray(offset, jnp.int32)
  return jnp.broadcast_to(idx, (batch, length))
