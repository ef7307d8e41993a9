"""Dispatch back-ends: run routed copies through their experts and combine.

All back-ends take the same inputs, the Route from routing.py (expert id and gate
per slot, sentinel E for inactive slots) and the stacked tier weights, and compute

    y[n] = sum_j gate[n, j] * Expert_{expert[n, j]}(x[n]).

An expert of a tier with depth S is S SwiGLU sub-layers with inner residuals:
    z_0 = x,  f_s = SwiGLU_s(z_{s-1}),  z_s = z_{s-1} + f_s,  Expert(x) = sum_s f_s
(= z_S - x; light and super tiers have S = 1, i.e. a plain SwiGLU).

Back-ends:
  sorted      (default, dropless) sort copies by expert; each expert's first C_r
              copies run as one batched einsum per tier (the capacity code path
              with C_r = batched_factor x nominal load), the rest through one
              grouped-matmul loop per tier over row tiles; gathers only.
  capacity    capacity-factor buffers [E_r, C_r, D] per tier and batched einsums;
              copies past an expert's capacity are dropped (and counted).
  ragged_dot  jax.lax.ragged_dot per tier on the sorted copies (for accelerators;
              XLA:CPU lowers it densely, every row through every expert).
  dense_loop  Python loop over all experts on all tokens: the test oracle.

The `sorted` algorithm (N tokens, K slots, E experts, P = N*K + block_size rows).
  0. The batched head (`_batched_head`, shared with `capacity`): each expert's
     first C_r copies in sorted order as a [E_r, C_r, D] batched einsum. Measured
     on 2 cores (experiments/bench_moe.py): with 8 experts the head takes the
     layer from 1.9x to 1.5x the ideal; with 168 experts it neither helps nor
     hurts (the loop's fixed costs remain). The copies past C_r (the tail) get
     their own plan and go through steps 1-3; with batched_factor 0, all do.
  1. make_plan: sort the N*K copies by expert id (one integer sort of the
     composite key e*NK + copy, i.e. a stable argsort), inactive copies (id E)
     last; per-expert group starts by binary search; the inverse permutation
     (sorted row of every copy) and the token of every sorted row.
  2. routed_ffn, per tier: each expert's rows [start_e, start_e + c_e) are cut
     into full tiles of block_size rows, and the rest, rounded up to a multiple of
     min_block_size, into at most one tile of each smaller power of two (padding
     < min_block_size rows per expert). One flat while loop per tile size walks
     the tiles that exist (trip count = true tile count, from small tile tables
     built with cumsum + searchsorted); its body gathers the tile's token rows
     from x, slices its expert's weights and runs the expert's sub-layers as plain
     matmuls, writing the rows of y_PD (rows past the expert's end are masked out
     of every write).
  3. y[n] = sum_k gate[n, k] * y_PD[pos[n, k]] (a gate-weighted gather-sum).

Why (XLA:CPU, measured on 2 cores): scatters (`.at[].add`) are slow, so every
data movement is a gather whose VJP is the gather with the inverse permutation
(`gather_rows`); a static [blocks, rows, D] buffer would have to be sized for
the worst case (every token in one tier: the super tier's buffer alone would
cost as much as routing every token there), so the loop instead runs exactly the
tiles that exist; flat loops rather than an expert loop with a tile loop inside
(nesting made XLA copy the carried row buffers on every outer iteration); a
hand-written VJP (while loops are not reverse-differentiable) that recomputes
nothing: the forward saves each tile's gate/up pre-activations (and the inputs
of inner sub-layers) in tier-local buffers, and the backward sums each expert's
weight gradient over its consecutive tiles in the loop carry; no [rows, D]
sorted copy of x or dy is materialised (tiles gather their own rows), which
took ~10% off the layer.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bookjax.model import layers
from bookjax.model.forest import spec as spec_lib
from bookjax.model.forest.routing import Route

_ds = jax.lax.dynamic_slice_in_dim
_dus = jax.lax.dynamic_update_slice_in_dim


# ----------------------------------------------------------------------------------
# Gathers with gather transposes
# ----------------------------------------------------------------------------------

def _gather_sum(x_AD, idx_BJ, weight_BJ=None):
  """out[b] = sum_j w[b, j] * x[idx[b, j]] (w = 1 when not given); indices >= A
  read zeros."""
  out = None
  for j in range(idx_BJ.shape[1]):
    g = jnp.take(x_AD, idx_BJ[:, j], axis=0, mode="fill", fill_value=0)
    if weight_BJ is not None:
      g = g * weight_BJ[:, j:j + 1].astype(x_AD.dtype)
    out = g if out is None else out + g
  return out


@jax.custom_vjp
def gather_rows(x_AD, idx_BJ, tidx_AI):
  """out[b] = sum_j x[idx[b, j]] (idx >= A reads 0), with a gather as transpose.

  tidx_AI must list, for every row a of x, the output rows that read it (padded
  with an index >= B): then dx[a] = sum_i dout[tidx[a, i]] is the exact VJP, and
  no scatter-add is ever emitted.
  """
  return _gather_sum(x_AD, idx_BJ)


def _gather_rows_fwd(x_AD, idx_BJ, tidx_AI):
  return _gather_sum(x_AD, idx_BJ), (idx_BJ, tidx_AI)


def _gather_rows_bwd(res, dout_BD):
  idx_BJ, tidx_AI = res
  return _gather_sum(dout_BD, tidx_AI), None, None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


# ----------------------------------------------------------------------------------
# Sorting copies by expert
# ----------------------------------------------------------------------------------

class SortPlan(NamedTuple):
  """Copies b = n*K + j sorted (stably) by expert id; P = N*K + pad sorted rows.

  src_P1: token of each sorted row, N for rows holding no active copy.
  copy_P1: copy id of each sorted row, N*K for rows holding no active copy.
  pos_NK: sorted row of each copy, P for inactive copies.
  starts_E1: first sorted row of each expert's group; starts[E] = active copies.
  """
  src_P1: jnp.ndarray
  copy_P1: jnp.ndarray
  pos_NK: jnp.ndarray
  starts_E1: jnp.ndarray


def make_plan(expert_NK, num_experts: int, pad_rows: int = 0) -> SortPlan:
  """Sorts the copies by expert (inactive copies, id E, go last)."""
  n, k = expert_NK.shape
  b = n * k
  e_B = expert_NK.reshape(b).astype(jnp.int32)
  rows_B = jnp.arange(b, dtype=jnp.int32)
  if (num_experts + 1) * b < 2 ** 31:
    # Sorting the composite key e*B + b is a stable argsort by e; on XLA:CPU it
    # is ~5x faster than jnp.argsort (a single-operand integer sort).
    key_B = jnp.sort(e_B * b + rows_B)
    order_B, sorted_e_B = key_B % b, key_B // b
  else:
    order_B = jnp.argsort(e_B, stable=True).astype(jnp.int32)
    sorted_e_B = e_B[order_B]
  starts = jnp.searchsorted(sorted_e_B, jnp.arange(num_experts + 1, dtype=jnp.int32),
                            side="left").astype(jnp.int32)
  active_B = rows_B < starts[num_experts]
  copy_B = jnp.where(active_B, order_B, b)
  # Inverse permutation: a scatter of B int32 indices (index math, not row data).
  inv_B = jnp.zeros((b,), jnp.int32).at[order_B].set(rows_B, unique_indices=True)
  p = b + pad_rows
  pos_B = jnp.where(e_B < num_experts, inv_B, p)
  copy_P = jnp.concatenate([copy_B, jnp.full((pad_rows,), b, jnp.int32)])
  src_P = jnp.where(copy_P < b, copy_P // k, n)
  return SortPlan(src_P[:, None], copy_P[:, None], pos_B.reshape(n, k), starts)


def tier_row_bound(cfg, s: spec_lib.TierSpec, n_tokens: int) -> int:
  """Static bound on the copies one tier can receive from n_tokens tokens."""
  if cfg.routing_depth == 1:
    return n_tokens * min(int(cfg.top_k), s.num_experts)
  return n_tokens * s.top_k


# ----------------------------------------------------------------------------------
# Expert math. Tier weights: wi [E, S, D, 2, F] (gate and up projections side by
# side, so one matmul computes both) and wo [E, S, F, D].
# ----------------------------------------------------------------------------------

def _swiglu_in(z, wi_D2F):
  """[M, D] @ [D, 2, F] -> gate [M, F], up [M, F] in one matmul."""
  d, _, f = wi_D2F.shape
  gu = z @ wi_D2F.reshape(d, 2 * f)
  return gu[:, :f], gu[:, f:]


def expert_ffn(z_MD, wi_SD2F, wo_SFD, dt):
  """One expert (S sub-layers with inner residuals) on rows z_MD; returns [M, D]."""
  out = None
  for s in range(wi_SD2F.shape[0]):
    g, u = _swiglu_in(z_MD, wi_SD2F[s].astype(dt))
    f = (jax.nn.silu(g) * u) @ wo_SFD[s].astype(dt)
    out = f if out is None else out + f
    z_MD = z_MD + f
  return out


def expert_ffn_batched(z_ECD, wi_ESD2F, wo_ESFD, dt):
  """All experts of a tier on their own rows: z_ECD [E, C, D] -> [E, C, D]."""
  out = None
  e, _, d, _, f = wi_ESD2F.shape
  for s in range(wi_ESD2F.shape[1]):
    gu = jnp.einsum("ecd,edf->ecf", z_ECD, wi_ESD2F[:, s].astype(dt).reshape(e, d, 2 * f))
    fs = jnp.einsum("ecf,efd->ecd", jax.nn.silu(gu[..., :f]) * gu[..., f:],
                    wo_ESFD[:, s].astype(dt))
    out = fs if out is None else out + fs
    z_ECD = z_ECD + fs
  return out


def _sublayers_fwd(z, wi, wo):
  """One expert on a tile: (out, [gate|up pre-activations per sub-layer],
  [sub-layer inputs z_s for s >= 1])."""
  out, gus, zs = None, [], []
  f = wo.shape[1]
  for s in range(wi.shape[0]):
    gu = z @ wi[s].reshape(-1, 2 * f)
    fs = (jax.nn.silu(gu[:, :f]) * gu[:, f:]) @ wo[s]
    gus.append(gu)
    if s > 0:
      zs.append(z)
    out = fs if out is None else out + fs
    z = z + fs
  return out, gus, zs


def _sublayers_bwd(xb, dyb, gus, zs, wi, wo):
  """VJP of `_sublayers_fwd` on a tile: (dx, dwi [S, D, 2, F], dwo [S, F, D]), f32.

  With out = sum_s f_s and z_s = z_{s-1} + f_s: f_s receives dy plus a_s, the
  gradient that reached z_s from the sub-layers above; a_{s-1} = a_s + J_s^T(..).
  """
  f32 = functools.partial(jnp.matmul, preferred_element_type=jnp.float32)
  depth, d, _, f = wi.shape
  a = None
  gi, go = [None] * depth, [None] * depth
  for s in reversed(range(depth)):
    df = dyb if a is None else dyb + a
    g, u = gus[s][:, :f], gus[s][:, f:]
    z_in = xb if s == 0 else zs[s - 1]
    sg = jax.nn.sigmoid(g)
    act = g * sg
    dh = df @ wo[s].T
    go[s] = f32((act * u).T, df)
    # silu'(g) = sg (1 + g (1 - sg)); gate and up gradients side by side.
    dgu = jnp.concatenate([dh * u * (sg * (1 + g * (1 - sg))), dh * act], axis=1)
    gi[s] = f32(z_in.T, dgu).reshape(d, 2, f)
    dz = dgu @ wi[s].reshape(d, 2 * f).T
    a = dz if a is None else a + dz
  return a, jnp.stack(gi), jnp.stack(go)


# ----------------------------------------------------------------------------------
# The grouped FFN: per tier, flat loops over row tiles of the sorted copies
# ----------------------------------------------------------------------------------

def block_classes(block_size: int, min_block_size: int) -> tuple[int, ...]:
  """Tile sizes block_size, block_size / 2, ..., min_block_size (powers of two)."""
  out, b = [], block_size
  while b >= min_block_size:
    out.append(b)
    b //= 2
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class TierKernel:
  """Static shape info of one tier for the grouped-FFN loop.

  depth: sub-layers per expert; classes: tile sizes; local_rows: rows of the
  saved-activation buffers (static bound on the tier's rows + largest tile).
  """
  depth: int
  classes: tuple[int, ...]
  local_rows: int


@dataclasses.dataclass(frozen=True)
class KernelSpec:
  tiers: tuple[TierKernel, ...]
  dtype: str


def _put(buf, blk, row, mask):
  """buf[row:row+b] = blk where mask (rows past an expert's end keep buf)."""
  old = _ds(buf, row, blk.shape[0])
  return _dus(buf, jnp.where(mask, blk.astype(buf.dtype), old), row, 0)


class TileTable(NamedTuple):
  """Tiles of one size: expert (tier-local), first sorted row, valid rows; count."""
  expert_T: jnp.ndarray
  row_T: jnp.ndarray
  valid_T: jnp.ndarray
  count: jnp.ndarray


def _table(n_tiles_E, first_E, stride: int, counts_E, starts_E, size: int, max_tiles: int):
  """Expands per-expert tile counts into a table of max_tiles (static) entries.

  Expert e owns the tiles at rows starts_e + first_e + j * stride, j < n_tiles_e.
  """
  num_e = n_tiles_E.shape[0]
  cum_E = jnp.cumsum(n_tiles_E)
  t = jnp.arange(max_tiles, dtype=jnp.int32)
  e = jnp.minimum(jnp.searchsorted(cum_E, t, side="right"), num_e - 1).astype(jnp.int32)
  off = first_E[e] + (t - (cum_E[e] - n_tiles_E[e])) * stride
  valid = jnp.clip(counts_E[e] - off, 0, size).astype(jnp.int32)
  return TileTable(e, starts_E[e] + off, valid, cum_E[-1].astype(jnp.int32))


def tile_tables(starts_E1, classes, max_rows: int) -> tuple[TileTable, ...]:
  """Cuts each expert's c_e rows into tiles, one table per tile size.

  Full tiles of classes[0] rows, then the remainder rounded up to a multiple of
  classes[-1], as at most one tile of each smaller size (its binary digits,
  largest first): padding < classes[-1] rows per expert, at most len(classes)
  tiles beyond the full ones. starts_E1: [E_r + 1] sorted-row boundaries of the
  tier's experts; max_rows: static bound on the tier's rows (sizes the tables,
  not the work).
  """
  big, step = classes[0], classes[-1]
  counts = (starts_E1[1:] - starts_E1[:-1]).astype(jnp.int32)
  starts = starts_E1[:-1]
  num_e = counts.shape[0]
  full = counts // big
  rem = -(-(counts - full * big) // step) * step
  extra = rem >= big                       # the remainder rounds up to a full tile
  full = full + extra.astype(jnp.int32)
  rem = jnp.where(extra, 0, rem)
  tables = [_table(full, jnp.zeros_like(counts), big, counts, starts, big,
                   max_rows // big + min(num_e, max_rows))]
  for b in classes[1:]:
    first = full * big + (rem // (2 * b)) * (2 * b)      # after the larger digits
    tables.append(_table(((rem & b) != 0).astype(jnp.int32), first, b, counts, starts, b,
                         max(1, min(num_e, max_rows // (b - step + 1)))))
  return tuple(tables)


def _rows_of(x_ND, src_P, r, b: int):
  """The b token rows feeding sorted rows r..r+b (a small gather; sentinel N -> 0)."""
  return jnp.take(x_ND, _ds(src_P, r, b), axis=0, mode="fill", fill_value=0)


def _tier_forward(tk: TierKernel, dt, x_ND, src_P, y_PD, w2, starts_E1, save: bool):
  """Runs one tier's experts on their sorted rows, writing those rows of y_PD.

  One flat while loop per tile size over the tiles that exist (trip count =
  true tile count). Flat on purpose: nesting a tile loop inside an expert loop
  made XLA copy the big carried buffers on every outer iteration. Each tile
  gathers its b token rows straight from x_ND (no sorted copy of x is ever
  materialised). Returns (y_PD, saved pre-activations and sub-layer inputs in
  tier-local rows): the backward then recomputes nothing.
  """
  d, f = x_ND.shape[1], w2[1].shape[-2]
  tier_start = starts_E1[0]
  saves = None
  if save:
    saves = dict(gu=[jnp.zeros((tk.local_rows, 2 * f), dt) for _ in range(tk.depth)],
                 z=[jnp.zeros((tk.local_rows, d), dt) for _ in range(tk.depth - 1)])
  tables = tile_tables(starts_E1, tk.classes, tk.local_rows - tk.classes[0])
  for b, tab in zip(tk.classes, tables):
    def body(t, carry, b=b, tab=tab):
      y, sv = carry
      r, mask = tab.row_T[t], (jnp.arange(b) < tab.valid_T[t])[:, None]
      wi, wo = (_ds(w, tab.expert_T[t], 1)[0].astype(dt) for w in w2)
      out, gus, zs = _sublayers_fwd(_rows_of(x_ND, src_P, r, b), wi, wo)
      if sv is not None:
        lr = r - tier_start
        sv = dict(gu=[_put(buf, v, lr, mask) for buf, v in zip(sv["gu"], gus)],
                  z=[_put(buf, v, lr, mask) for buf, v in zip(sv["z"], zs)])
      return _put(y, out, r, mask), sv
    y_PD, saves = jax.lax.fori_loop(0, tab.count, body, (y_PD, saves))
  return y_PD, saves


def _add_at(dw, e, part):
  """dw[e] += part (one read-modify-write of a single expert's slice)."""
  return _dus(dw, _ds(dw, e, 1) + part[None], e, 0)


def _tier_backward(tk: TierKernel, dt, x_ND, src_P, gate_P, dy_ND, dx_PD, w2, starts_E1,
                   saves):
  """VJP of `_tier_forward` + gating: the tier's rows of dx_PD, and dW of its experts.

  The gradient reaching sorted row p is gate[p] * dy[token of p], gathered per
  tile. dW contributions of consecutive tiles of one expert are summed in the
  loop carry and added to dW once, when the expert changes (lax.cond: no copy of
  dW), instead of a read-modify-write of dW[e] per tile.
  """
  tier_start = starts_E1[0]
  tables = tile_tables(starts_E1, tk.classes, tk.local_rows - tk.classes[0])
  dw = tuple(jnp.zeros(w.shape, jnp.float32) for w in w2)
  flush = lambda dw, acc, e: tuple(_add_at(d, e, a) for d, a in zip(dw, acc))
  keep = lambda dw, acc, e: dw
  for b, tab in zip(tk.classes, tables):
    def body(t, carry, b=b, tab=tab):
      dx, dw, acc, prev = carry
      e, r = tab.expert_T[t], tab.row_T[t]
      mask = (jnp.arange(b) < tab.valid_T[t])[:, None]
      lr = r - tier_start
      wi, wo = (_ds(w, e, 1)[0].astype(dt) for w in w2)
      # Rows past the expert's end hold other experts' copies: zero their dy so
      # they add nothing to this expert's dW.
      dyb = _rows_of(dy_ND, src_P, r, b) * _ds(gate_P, r, b)[:, None].astype(dy_ND.dtype)
      dyb = jnp.where(mask, dyb, 0).astype(dt)
      rows = lambda bufs: [_ds(v, lr, b) for v in bufs]
      dxb, gi, go = _sublayers_bwd(_rows_of(x_ND, src_P, r, b), dyb, rows(saves["gu"]),
                                   rows(saves["z"]), wi, wo)
      changed = e != prev
      dw = jax.lax.cond(changed & (prev >= 0), flush, keep, dw, acc, prev)
      acc = tuple(jnp.where(changed, part, a + part) for a, part in zip(acc, (gi, go)))
      return _put(dx, dxb, r, mask), dw, acc, e
    acc0 = tuple(jnp.zeros(w.shape[1:], jnp.float32) for w in w2)
    dx_PD, dw, acc, last = jax.lax.fori_loop(0, tab.count, body,
                                             (dx_PD, dw, acc0, jnp.int32(-1)))
    dw = jax.lax.cond(last >= 0, flush, keep, dw, acc, last)
  return dx_PD, tuple(d.astype(w.dtype) for d, w in zip(dw, w2))


def _routed_forward(ks: KernelSpec, x_ND, gate_NK, weights, plan: "SortPlan", starts,
                    save: bool):
  dt = layers.dtype_of(ks.dtype)
  src_P = plan.src_P1[:, 0]
  y_PD = jnp.zeros((src_P.shape[0], x_ND.shape[1]), dt)
  all_saves = []
  for tk, w2, st in zip(ks.tiers, weights, starts):
    y_PD, sv = _tier_forward(tk, dt, x_ND, src_P, y_PD, w2, st, save)
    all_saves.append(sv)
  # y[n] = sum_k gate[n, k] * y_PD[pos[n, k]]
  return _gather_sum(y_PD, plan.pos_NK, gate_NK), y_PD, all_saves


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def routed_ffn(ks: KernelSpec, x_ND, gate_NK, weights, plan: "SortPlan", starts):
  """y[n] = sum_k gate[n, k] * Expert_{e(n, k)}(x[n]) over the sorted plan.

  weights: per tier (wi [E,S,D,2,F], wo [E,S,F,D]); starts: per tier the
  [E_r + 1] sorted-row boundaries of its experts. Forward: the tiles gather their
  token rows from x_ND and write expert outputs y_PD in sorted order; a
  gate-weighted gather-sum combines. The VJP is hand-written (while loops are not
  reverse-differentiable): the tiles gather gate * dy per row, write dx in sorted
  order, and dx = a gather-sum of it; dgate[n, k] = <dy[n], y_PD[pos[n, k]]>. No
  scatter, and no [rows, D] copy of x or dy is ever materialised.
  """
  return _routed_forward(ks, x_ND, gate_NK, weights, plan, starts, save=False)[0]


def _routed_ffn_fwd(ks, x_ND, gate_NK, weights, plan, starts):
  y_ND, y_PD, saves = _routed_forward(ks, x_ND, gate_NK, weights, plan, starts, save=True)
  return y_ND, (x_ND, gate_NK, weights, plan, starts, y_PD, saves)


def _routed_ffn_bwd(ks, res, dy_ND):
  x_ND, gate_NK, weights, plan, starts, y_PD, saves = res
  dt = layers.dtype_of(ks.dtype)
  n, k = gate_NK.shape
  src_P = plan.src_P1[:, 0]
  gate_P = jnp.take(gate_NK.reshape(n * k), plan.copy_P1[:, 0], mode="fill", fill_value=0)
  dx_PD = jnp.zeros(y_PD.shape, x_ND.dtype)
  dws = []
  for tk, w2, st, sv in zip(ks.tiers, weights, starts, saves):
    dx_PD, dw = _tier_backward(tk, dt, x_ND, src_P, gate_P, dy_ND, dx_PD, w2, st, sv)
    dws.append(dw)
  dx_ND = _gather_sum(dx_PD, plan.pos_NK)
  dgate = [jnp.sum(jnp.take(y_PD, plan.pos_NK[:, j], axis=0, mode="fill", fill_value=0)
                   .astype(jnp.float32) * dy_ND.astype(jnp.float32), axis=-1)
           for j in range(k)]
  dgate_NK = jnp.stack(dgate, axis=1).astype(gate_NK.dtype)
  return dx_ND, dgate_NK, tuple(dws), None, None


routed_ffn.defvjp(_routed_ffn_fwd, _routed_ffn_bwd)


# ----------------------------------------------------------------------------------
# Back-ends
# ----------------------------------------------------------------------------------

class DispatchInfo(NamedTuple):
  """routed: active copies; dropped: copies that got no expert (capacity only)."""
  routed: jnp.ndarray
  dropped: jnp.ndarray


def _weights(w):
  return (w["wi"], w["wo"])


def _gate_sorted(route: Route, plan: SortPlan):
  n, k = route.gate_NK.shape
  return gather_rows(route.gate_NK.reshape(n * k, 1), plan.copy_P1, plan.pos_NK.reshape(n * k, 1))


def sorted_dispatch(x_ND, route: Route, weights, specs, cfg, dt, *, batched_head: bool = True):
  """Dropless: sort copies by expert; the first C_r rows of every expert run as one
  batched einsum (`batched_rows`), the rest through the grouped tile loop.

  batched_head=False (used inside expert parallelism, where the received buffer's
  load per local expert is not known statically) sends every row through the loop.
  """
  n, k = route.expert_NK.shape
  e_total = sum(s.num_experts for s in specs)
  classes = block_classes(int(cfg.block_size), int(cfg.min_block_size))
  caps = [batched_rows(cfg, s, n) if batched_head else 0 for s in specs]
  if any(caps):
    plan = make_plan(route.expert_NK, e_total)
    y_ND, kept_B = _batched_head(x_ND, route, plan, weights, specs, caps, e_total, dt)
    # The tail: copies past their expert's first C_r rows, re-sorted on their own.
    tail_NK = jnp.where(kept_B.reshape(n, k), e_total, route.expert_NK)
    tail = Route(tail_NK, route.gate_NK)
  else:
    y_ND, tail = None, route
  plan = make_plan(tail.expert_NK, e_total, pad_rows=classes[0])
  ks = KernelSpec(tuple(TierKernel(s.depth, classes, tier_row_bound(cfg, s, n) + classes[0])
                        for s in specs), jnp.dtype(dt).name)
  starts = tuple(plan.starts_E1[s.offset:s.offset + s.num_experts + 1] for s in specs)
  y_tail = routed_ffn(ks, x_ND.astype(dt), tail.gate_NK, tuple(_weights(w) for w in weights),
                      plan, starts)
  y_ND = y_tail if y_ND is None else y_ND + y_tail
  routed = jnp.sum(route.expert_NK < e_total, dtype=jnp.int32)
  return y_ND, DispatchInfo(routed, jnp.zeros_like(routed))


def capacity(cfg, s: spec_lib.TierSpec, n_tokens: int, factor: float | None = None) -> int:
  """Slots per expert: `factor` (default capacity_factor) x the nominal load of one
  expert of tier s.

  Nominal load: depth 1, N*K*m_r/E_r; depth 2/3, N*tier_top_k*m_r*k_r/E_r.
  """
  if cfg.routing_depth == 1:
    load = n_tokens * int(cfg.top_k) * s.mix / s.num_experts
  else:
    load = n_tokens * int(cfg.tier_top_k) * s.mix * s.top_k / s.num_experts
  factor = cfg.capacity_factor if factor is None else factor
  return int(max(1, min(n_tokens, -(-factor * load // 1))))


def batched_rows(cfg, s: spec_lib.TierSpec, n_tokens: int) -> int:
  """`sorted`: rows per expert of tier s run as one batched einsum, batched_factor x
  the nominal load (0 when batched_factor is 0: every row goes through the loop)."""
  if float(cfg.batched_factor) <= 0:
    return 0
  return capacity(cfg, s, n_tokens, factor=float(cfg.batched_factor))


def _batched_head(x_ND, route: Route, plan: SortPlan, weights, specs, caps, e_total, dt):
  """Per tier, a [E_r, C_r, D] buffer filled with each expert's first C_r copies
  in sorted order (earlier tokens first), run as one batched einsum.

  Returns (gate-weighted y_ND, kept_B: which of the N*K copies were run). Data
  movement is gathers only (`gather_rows`, whose transpose is again a gather).
  """
  n, k = route.expert_NK.shape
  b = n * k
  e_B = route.expert_NK.reshape(b)
  pos_B = plan.pos_NK.reshape(b)
  rank_B = pos_B - plan.starts_E1[jnp.minimum(e_B, e_total)]
  gate_B1 = route.gate_NK.reshape(b, 1)
  x_ND = x_ND.astype(dt)
  y_ND = jnp.zeros(x_ND.shape, dt)
  kept_B = jnp.zeros((b,), bool)
  for s, w, cap in zip(specs, weights, caps):
    n_slots = s.num_experts * cap
    local_B = e_B - s.offset
    keep_B = (local_B >= 0) & (local_B < s.num_experts) & (rank_B < cap)
    slot_NK = jnp.where(keep_B, local_B * cap + rank_B, n_slots).reshape(n, k)
    c_C = jnp.arange(cap, dtype=jnp.int32)
    counts_E = plan.starts_E1[s.offset + 1:s.offset + s.num_experts + 1] - \
        plan.starts_E1[s.offset:s.offset + s.num_experts]
    rows_EC = plan.starts_E1[s.offset:s.offset + s.num_experts, None] + c_C[None]
    ok_EC = c_C[None] < counts_E[:, None]
    tok_Q1 = jnp.where(ok_EC, plan.src_P1[jnp.minimum(rows_EC, b - 1), 0], n).reshape(-1, 1)
    copy_Q1 = jnp.where(ok_EC, plan.copy_P1[jnp.minimum(rows_EC, b - 1), 0], b).reshape(-1, 1)
    buf_QD = gather_rows(x_ND, tok_Q1, slot_NK)
    out_ECD = expert_ffn_batched(buf_QD.reshape(s.num_experts, cap, -1), *_weights(w), dt)
    gate_Q1 = gather_rows(gate_B1, copy_Q1, slot_NK.reshape(b, 1)).astype(dt)
    y_ND = y_ND + gather_rows(out_ECD.reshape(n_slots, -1) * gate_Q1, slot_NK, tok_Q1)
    kept_B = kept_B | keep_B
  return y_ND, kept_B


def capacity_dispatch(x_ND, route: Route, weights, specs, cfg, dt):
  """Capacity-factor dispatch: per tier a [E_r, C_r, D] buffer filled in sorted
  order (so within an expert, earlier tokens win), overflow dropped."""
  n, _ = route.expert_NK.shape
  e_total = sum(s.num_experts for s in specs)
  plan = make_plan(route.expert_NK, e_total)
  caps = [capacity(cfg, s, n) for s in specs]
  y_ND, kept_B = _batched_head(x_ND, route, plan, weights, specs, caps, e_total, dt)
  routed = plan.starts_E1[e_total]
  return y_ND, DispatchInfo(routed, routed - jnp.sum(kept_B, dtype=jnp.int32))


# XLA:CPU lowers ragged_dot densely, materialising [groups, rows, features]: run it
# over row chunks there so that memory stays bounded (the compute stays dense).
CPU_RAGGED_CHUNK_ROWS = 1024


def _ragged_expert(z_MD, wi, wo, sizes_E, f: int, dt):
  """One tier's experts on rows grouped by expert (sizes_E), via ragged_dot."""
  out = None
  for d in range(wi.shape[1]):
    wi_d = wi[:, d].astype(dt).reshape(wi.shape[0], -1, 2 * f)
    gu = jax.lax.ragged_dot(z_MD, wi_d, sizes_E)
    f_d = jax.lax.ragged_dot(jax.nn.silu(gu[:, :f]) * gu[:, f:], wo[:, d].astype(dt), sizes_E)
    out = f_d if out is None else out + f_d
    z_MD = z_MD + f_d
  return out


def ragged_dot_dispatch(x_ND, route: Route, weights, specs, cfg, dt):
  """Sorted copies through jax.lax.ragged_dot per tier (accelerators, benchmark).

  Each tier reads a static window of tier_row_bound rows starting at its first
  sorted row; rows past its groups come out 0 and later tiers overwrite them.
  On CPU the window is cut into chunks of CPU_RAGGED_CHUNK_ROWS rows, each a
  ragged_dot whose group sizes are the groups' overlaps with the chunk.
  """
  n, _ = route.expert_NK.shape
  e_total = sum(s.num_experts for s in specs)
  chunk = CPU_RAGGED_CHUNK_ROWS if jax.default_backend() == "cpu" else None
  bounds = [tier_row_bound(cfg, s, n) for s in specs]
  windows = [b if chunk is None else -(-b // chunk) * chunk for b in bounds]
  plan = make_plan(route.expert_NK, e_total, pad_rows=max(windows))
  x_PD = gather_rows(x_ND.astype(dt), plan.src_P1, plan.pos_NK)
  y_PD = jnp.zeros(x_PD.shape, dt)
  for s, w, window in zip(specs, weights, windows):
    start = plan.starts_E1[s.offset]
    edges = plan.starts_E1[s.offset:s.offset + s.num_experts + 1] - start
    z = _ds(x_PD, start, window)
    wi, wo = _weights(w)
    if chunk is None or window == chunk:
      out = _ragged_expert(z, wi, wo, (edges[1:] - edges[:-1]).astype(jnp.int32), s.d_ff, dt)
    else:
      lo = jnp.arange(0, window, chunk, dtype=jnp.int32)[:, None]
      sizes_CE = jnp.clip(jnp.minimum(edges[None, 1:], lo + chunk)
                          - jnp.maximum(edges[None, :-1], lo), 0, chunk).astype(jnp.int32)
      out = jax.lax.map(lambda a: _ragged_expert(a[0], wi, wo, a[1], s.d_ff, dt),
                        (z.reshape(-1, chunk, z.shape[1]), sizes_CE)).reshape(z.shape)
    y_PD = _dus(y_PD, out, start, 0)
  y_PD = y_PD * _gate_sorted(route, plan).astype(dt)
  y_ND = gather_rows(y_PD, plan.pos_NK, plan.src_P1)
  routed = plan.starts_E1[e_total]
  return y_ND, DispatchInfo(routed, jnp.zeros_like(routed))


def dense_loop_dispatch(x_ND, route: Route, weights, specs, cfg, dt):
  """Oracle: every expert on every token, weighted by its summed gate (tests only)."""
  del cfg
  x_ND = x_ND.astype(dt)
  y_ND = jnp.zeros(x_ND.shape, dt)
  for s, w in zip(specs, weights):
    wi, wo = _weights(w)
    for e in range(s.num_experts):
      gate_N = jnp.sum(jnp.where(route.expert_NK == s.offset + e, route.gate_NK, 0.0), axis=1)
      y_ND = y_ND + gate_N[:, None].astype(dt) * expert_ffn(x_ND, wi[e], wo[e], dt)
  routed = jnp.sum(route.expert_NK < sum(s.num_experts for s in specs))
  return y_ND, DispatchInfo(routed, jnp.zeros_like(routed))


BACKENDS = dict(sorted=sorted_dispatch, capacity=capacity_dispatch,
                ragged_dot=ragged_dot_dispatch, dense_loop=dense_loop_dispatch)


def dispatch(kind: str, x_ND, route: Route, weights, specs, cfg, dt):
  """Runs back-end `kind`; returns (y_ND in dt, DispatchInfo).

  Under a mesh (`jax.set_mesh` + flax logical rules, as in the trainer) every
  back-end but `dense_loop` runs expert-parallel (expert_parallel.py), with
  `kind` choosing dropless or capacity buffers and the per-shard compute.
  """
  from bookjax.model.forest import expert_parallel  # pylint: disable=g-import-not-at-top
  if kind == expert_parallel.BACKEND or expert_parallel.wanted(kind):
    return expert_parallel.ep_dispatch(x_ND, route, weights, specs, cfg, dt)
  return BACKENDS[kind](x_ND, route, weights, specs, cfg, dt)
