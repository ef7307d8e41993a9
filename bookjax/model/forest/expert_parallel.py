"""Expert-parallel dispatch: each tier's experts split over the `expert` mesh axis,
tokens travel to their experts' shard and back with `jax.lax.all_to_all` inside
`jax.shard_map`.

Used automatically (through `dispatch.dispatch`) whenever a mesh is set with
`jax.set_mesh` and flax logical-axis rules are active (the trainer does both) and
the mesh splits tokens or experts (more than one shard); `dispatch='expert_parallel'`
forces it. Without a mesh every back-end runs as before.

Layout. `batch` axes: the mesh axes the logical axis `batch` maps to (default
data, fsdp, expert); tokens x_ND are split over them (N = B*T, B-major). `ep` axes:
the mesh axes `experts` maps to (default expert); they must be a subset of the
batch axes, and every tier's E_r must be divisible by their size `ep`
(bookjax/sharding.py validates this before compiling). Shard j holds experts
[j E_r/ep, (j+1) E_r/ep) of every tier r, gathered in full over the other mesh
axes (FSDP-style all-gather of the expert weights in, reduce-scatter of their
gradients out, both inserted by shard_map from the in_specs).

Formulation: fixed-size per-shard token buffers (CPU has no ragged_all_to_all).
On each device, with n = N / (batch shards) local tokens and K routed slots:
  1. For every destination shard j, the local tokens with at least one copy on j
     are packed, in token order, into a buffer of C rows (a token is sent once to
     a shard however many of its copies live there; its K expert ids, rewritten to
     j's local ids, and gates travel with it, copies living elsewhere inactive).
       dropless (dispatch 'sorted' / 'ragged_dot' / 'expert_parallel'): C = n;
       capacity (dispatch 'capacity'): C = min(n, ceil(capacity_factor * n * K / ep)),
       tokens past C are dropped on that shard (their copies there count as dropped).
  2. all_to_all over the ep axes: [ep * C, D] rows (+ [ep * C, K] ids and gates)
     -> each shard receives ep * C rows, C from every source.
  3. The shard runs its local experts on the received rows with the single-device
     back-end (`sorted`, dropless, or `ragged_dot`): out[row] = sum_k gate_k E_k(x).
  4. all_to_all back; y[t] = sum_j out_j[slot of t on j] (a gather).
All data movement is gathers with gather transposes (dispatch.gather_rows); the
all_to_all transposes to the reverse all_to_all. Routing, losses, statistics and
the aux-loss-free bias update stay outside the shard_map, in the global (GSPMD)
view: loads are sums over the whole global batch, never shard-local.

Per-device memory, one forest layer, training (activation bytes b of the compute
dtype, p of the param dtype; n local tokens, K slots, R = ep * C received rows,
bs = block_size, tier r: E_r experts, S_r sub-layers of width F_r, k_r copies a
row can have in the tier = top_k_r, at depth 1 min(top_k, E_r / ep)):
  exchange buffers   4 * R * D * b             x sent + received, y sent + received
                   + 4 * R * K * 4             expert ids and gates, both ways
  local `sorted`     2 * (R * K + bs) * D * b  rows sorted by expert, in and out
                   + sum_r (R * k_r + bs) * (2 * S_r * F_r + (S_r - 1) * D) * b
                                               saved SwiGLU pre-activations / inner
                                               residuals for the hand-written VJP
  expert weights     sum_r (E_r / ep) * S_r * 3 * D * F_r * p, and as much again
                     for their gradient (gathered in full over fsdp / tensor inside
                     the shard_map; sharded again outside it)
Dropless, C = n so R = ep * n = B*T / (data * fsdp): the token buffers do not shrink
as ep grows (static shapes must hold the worst case, every local token having a
copy on every shard), only the weights do. Capacity, R ~= capacity_factor * n * K:
proportional to the local routed copies. Compute is the true number of routed
copies either way (the grouped loop walks only the tiles that exist); devices
along mesh axes outside the batch axes (e.g. `tensor`) repeat the same work.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from bookjax.model.forest import dispatch as dispatch_lib
from bookjax.model.forest import spec as spec_lib
from bookjax.model.forest.routing import Route

BACKEND = "expert_parallel"


@dataclasses.dataclass(frozen=True)
class EPLayout:
  """Where tokens and experts live on the current mesh.

  batch_axes: mesh axes splitting the tokens; ep_axes: mesh axes splitting each
  tier's experts (a subset of batch_axes); sizes: their products.
  """
  batch_axes: tuple[str, ...]
  ep_axes: tuple[str, ...]
  batch_shards: int
  ep: int


def _mesh_axes(entry) -> tuple[str, ...]:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def current_layout() -> Optional[EPLayout]:
  """The EPLayout of the mesh set by `jax.set_mesh` under the active flax logical
  rules, or None (no mesh, no rules, already inside a shard_map, or one shard)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return None
  rules = nn.get_logical_axis_rules()
  if not rules:
    return None
  sizes = dict(mesh.shape)
  batch = tuple(a for a in _mesh_axes(nn.logical_to_mesh_axes(("batch",), rules)[0])
                if a in sizes)
  experts = tuple(a for a in _mesh_axes(nn.logical_to_mesh_axes(("experts",), rules)[0])
                  if a in sizes)
  layout = EPLayout(batch, experts, math.prod(sizes[a] for a in batch),
                    math.prod(sizes[a] for a in experts))
  if layout.batch_shards == 1 and layout.ep == 1:
    return None
  return layout


def check_layout(layout: EPLayout, specs: Sequence[spec_lib.TierSpec],
                 prefix: str = "model.ffn.forest") -> None:
  """Raises ValueError when the experts cannot be split over the ep axes."""
  missing = [a for a in layout.ep_axes if a not in layout.batch_axes]
  if missing:
    raise ValueError(
        f"config.mesh_rules: the 'experts' logical axis maps to mesh axes {layout.ep_axes} "
        f"but 'batch' maps to {layout.batch_axes}; expert parallelism needs the tokens split "
        f"over every expert axis (missing {missing})")
  for s in specs:
    if s.num_experts % layout.ep:
      raise ValueError(
          f"config.{prefix}.tiers.{s.name}.num_experts: {s.num_experts} experts cannot be "
          f"split over {layout.ep} expert shards (mesh axes {layout.ep_axes}); use a multiple "
          f"of {layout.ep} or a smaller mesh.expert")


def wanted(kind: str) -> bool:
  """Whether `dispatch.dispatch(kind, ...)` should go expert-parallel here."""
  if kind == "dense_loop":
    return False
  return current_layout() is not None


def buffer_rows(cfg, n_local: int, k: int, ep: int) -> int:
  """C: token rows per (source, destination) shard pair (module docstring)."""
  if cfg.dispatch != "capacity":
    return n_local
  return int(max(1, min(n_local, math.ceil(cfg.capacity_factor * n_local * k / ep))))


def local_specs(specs: Sequence[spec_lib.TierSpec], ep: int) -> tuple[spec_lib.TierSpec, ...]:
  """The tiers as one expert shard sees them: E_r / ep experts, offsets / ep."""
  return tuple(dataclasses.replace(s, num_experts=s.num_experts // ep, offset=s.offset // ep)
               for s in specs)


def _tables(specs: Sequence[spec_lib.TierSpec], ep: int):
  """Global expert id (E = inactive) -> destination shard (ep = none), local id."""
  e_total = sum(s.num_experts for s in specs)
  dest = np.full((e_total + 1,), ep, np.int32)
  local = np.full((e_total + 1,), e_total // ep, np.int32)
  for s in specs:
    per = s.num_experts // ep
    ids = np.arange(s.num_experts)
    dest[s.offset + ids] = ids // per
    local[s.offset + ids] = s.offset // ep + ids % per
  return jnp.asarray(dest), jnp.asarray(local)


def _shard_body(layout: EPLayout, specs, cfg, dt, inner: str, c_rows: int):
  """The per-device function of the shard_map (module docstring, steps 1-4)."""
  ep = layout.ep
  lspecs = local_specs(specs, ep)
  dest_tab, local_tab = _tables(specs, ep)
  e_local_total = sum(s.num_experts for s in lspecs)

  def body(x_nD, expert_nK, gate_nK, weights):
    n, k = expert_nK.shape
    j_J = jnp.arange(ep, dtype=jnp.int32)
    dest_nK = dest_tab[expert_nK]
    here_nJK = dest_nK[:, None, :] == j_J[None, :, None]
    need_nJ = jnp.any(here_nJK, axis=-1)
    t_n = jnp.arange(n, dtype=jnp.int32)
    if c_rows >= n:
      keep_nJ = need_nJ
      slot_nJ = jnp.broadcast_to(t_n[:, None], (n, ep))
      src_JC = jnp.where(need_nJ.T, t_n[None, :], n)
    else:
      rank_nJ = jnp.cumsum(need_nJ, axis=0, dtype=jnp.int32) - 1
      keep_nJ = need_nJ & (rank_nJ < c_rows)
      slot_nJ = rank_nJ
      src_JC = jnp.sort(jnp.where(keep_nJ.T, t_n[None, :], n), axis=1)[:, :c_rows]
    rows = ep * c_rows
    # Buffer row (j, c) -> j * C + c; tokens not kept on j point past the buffer.
    flat_nJ = jnp.where(keep_nJ, j_J[None, :] * c_rows + slot_nJ, rows)
    src_R1 = src_JC.reshape(rows, 1)
    # Expert ids local to the destination, gates; copies living elsewhere inactive.
    loc_nJK = jnp.where(here_nJK, local_tab[expert_nK][:, None, :], e_local_total)
    gate_nJK = jnp.where(here_nJK, gate_nK[:, None, :], 0.0)
    pair_R1 = jnp.where(src_R1 < n, src_R1 * ep + (jnp.arange(rows) // c_rows)[:, None], n * ep)
    send_x = dispatch_lib.gather_rows(x_nD.astype(dt), src_R1, flat_nJ)
    send_e = jnp.take(loc_nJK.reshape(n * ep, k), pair_R1[:, 0], axis=0, mode="fill",
                      fill_value=e_local_total)
    send_g = dispatch_lib.gather_rows(gate_nJK.reshape(n * ep, k), pair_R1,
                                      flat_nJ.reshape(n * ep, 1))
    a2a = lambda v: jax.lax.all_to_all(v, layout.ep_axes, 0, 0, tiled=True) if ep > 1 else v
    recv_x, recv_e, recv_g = a2a(send_x), a2a(send_e), a2a(send_g)
    # The received buffer's load per local expert is not known statically: no
    # batched head, every received copy goes through the tile loop.
    run = (functools.partial(dispatch_lib.sorted_dispatch, batched_head=False)
           if inner == "sorted" else dispatch_lib.BACKENDS[inner])
    out_RD, _ = run(recv_x, Route(recv_e, recv_g), weights, lspecs, cfg, dt)
    back_RD = a2a(out_RD)
    y_nD = dispatch_lib.gather_rows(back_RD, flat_nJ, src_R1)
    lost = jnp.sum(here_nJK & (need_nJ & ~keep_nJ)[:, :, None], dtype=jnp.int32)
    return y_nD, lost.reshape(1)

  return body


def ep_dispatch(x_ND, route: Route, weights, specs, cfg, dt,
                layout: Optional[EPLayout] = None):
  """Expert-parallel dispatch; same contract as the back-ends in dispatch.py:
  returns (y_ND in dt, DispatchInfo). Falls back to the single-device back-end
  (under GSPMD) when no mesh / rules are active or N does not split evenly."""
  layout = current_layout() if layout is None else layout
  inner = "ragged_dot" if cfg.dispatch == "ragged_dot" else "sorted"
  n, k = route.expert_NK.shape
  if layout is None or n % layout.batch_shards:
    kind = "sorted" if cfg.dispatch == BACKEND else cfg.dispatch
    return dispatch_lib.BACKENDS[kind](x_ND, route, weights, specs, cfg, dt)
  check_layout(layout, specs)
  n_local = n // layout.batch_shards
  c_rows = buffer_rows(cfg, n_local, k, layout.ep)
  tok = P(layout.batch_axes or None)
  ep_spec = P(layout.ep_axes or None)
  w_specs = tuple({name: ep_spec for name in w} for w in weights)
  body = _shard_body(layout, specs, cfg, dt, inner, c_rows)
  # check_vma=False: the single-device back-ends carry loop state created with
  # jnp.zeros (invariant) that the loop body makes shard-varying. Gradients stay
  # exact: shard_map's transpose then psums the weights' cotangents over the axes
  # their in_specs leave out (each expert shard's partial dW from its token
  # shards) and divides the output cotangents by the replication of the out_specs.
  y_ND, lost = jax.shard_map(
      body, in_specs=(tok, tok, tok, w_specs), out_specs=(tok, tok), check_vma=False)(
          x_ND, route.expert_NK, route.gate_NK, tuple(dict(w) for w in weights))
  e_total = sum(s.num_experts for s in specs)
  routed = jnp.sum(route.expert_NK < e_total, dtype=jnp.int32)
  return y_ND, dispatch_lib.DispatchInfo(routed, jnp.sum(lost))
