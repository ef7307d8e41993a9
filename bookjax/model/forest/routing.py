"""The routing core: hidden states -> (expert id, gate) per routed copy.

Pure functions of arrays (no flax), shared by every dispatch back-end and meant to
be reused by an expert-parallel back-end. All router math is float32.

Notation: N tokens, D model width, E experts over all present tiers (global ids,
tiers in the order light, deep, super), R present tiers, M domains, K routed
slots per token (`spec.max_active_slots`). A slot is *inactive* when its expert id
is E (the sentinel) and its gate is 0: padding tokens, tiers not chosen.

Scores. score_fn 'softmax': s = softmax(logits); 'sigmoid': s = sigmoid(logits).
Selection adds the aux-loss-free bias b (DeepSeek-V3): the chosen set is
top-k(s + b), but the gate uses s alone, so b steers *which* experts run and never
*how much* they count, and no gradient ever reaches b.

Gates. norm_topk (DeepSeek-V3 / HF convention): when k > 1, w_i = s_i / sum_{j in
top-k} s_j; when k = 1, w = s (so the router still gets a gradient). Every gate
is multiplied by route_scale.

Depth 1 (flat, DeepSeek-V3): logits = x W_E, scores over all E experts.
  Group-limited top-k: experts split into num_groups contiguous groups; a group's
  score is the sum of its top-2 selection scores (s + b); only the topk_groups best
  groups stay, the others are masked with -inf (not 0: with sigmoid scores and a
  negative bias a 0 could still win); then top_k over the survivors.
  g_i = route_scale * w_i.
Depth 2 (tier -> expert): p_tier = softmax(x W_T) over R tiers; the token visits
  the tier_top_k tiers with the largest p_tier + b_tier; inside a visited tier r it
  picks top-k_r experts by s_r + b_r (s_r: scores over the tier's own experts,
  logits x W_r). g_i = route_scale * p_tier[r] * w_i.
Depth 3 (domain -> tier -> expert): p_dom = softmax(x W_M) over M domains; the
  tier router is a mixture of per-domain tier routers,
    tier_logits = sum_m p_dom[m] * (x W_T[:, m, :]),
  then as depth 2. The gate p_tier[r] * w_i depends on p_dom through p_tier, so the
  loss differentiates through all three levels. The tier factor is never
  renormalised over the chosen tiers: with tier_top_k = 1 that would make it 1
  and cut the gradient to levels 1 and 2.
  tier_gate 'unit' replaces the factor p_tier[r] by p_tier[r] / sg(p_tier[r]):
  value 1 (a visited tier's experts write at full scale, as at depth 1), gradient
  d/dp = 1 / p (levels 1 and 2 still learn). With 'prob' the routed output is
  scaled by p_tier, measured at 0.25-0.8 in the routing-depth study's models.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from bookjax.model.forest import spec as spec_lib


class Route(NamedTuple):
  """Routed copies. expert_NK: int32 global id (E = inactive); gate_NK: float32."""
  expert_NK: jnp.ndarray
  gate_NK: jnp.ndarray


class RouterAux(NamedTuple):
  """What the balance losses and statistics need besides the Route.

  logits: router logits whose logsumexp enters the z-loss (one per softmax group).
  tier_prob_NR: differentiable probability mass per tier (depth 2/3: p_tier;
    depth 1: sum of the token's normalised scores over the tier's experts).
  tier_scores: per tier [N, E_r] scores normalised to sum 1 inside the tier.
  visit_NR: bool, the token has a routed copy in the tier.
  domain_logits_NM: level-1 logits (depth 3) or None.
  """
  logits: tuple
  tier_prob_NR: jnp.ndarray
  tier_scores: tuple
  visit_NR: jnp.ndarray
  domain_logits_NM: Optional[jnp.ndarray]


def scores_of(logits, score_fn: str):
  """Expert scores from logits (float32): softmax or sigmoid over the last axis."""
  if score_fn == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


def _normalise(s, axis=-1):
  return s / (jnp.sum(s, axis=axis, keepdims=True) + 1e-20)


def group_limit(choice_NE, num_groups: int, topk_groups: int):
  """Masks experts outside the topk_groups best groups with -inf.

  Group score = sum of the group's two largest entries of choice (one if a group
  has a single expert), as in DeepSeek-V3.
  """
  n, e = choice_NE.shape
  if num_groups <= 1:
    return choice_NE
  g_NGS = choice_NE.reshape(n, num_groups, e // num_groups)
  group_score_NG = jnp.sum(jax.lax.top_k(g_NGS, min(2, e // num_groups))[0], axis=-1)
  _, keep_NJ = jax.lax.top_k(group_score_NG, topk_groups)
  keep_NG = jnp.any(keep_NJ[:, :, None] == jnp.arange(num_groups)[None, None, :], axis=1)
  return jnp.where(keep_NG[:, :, None], g_NGS, -jnp.inf).reshape(n, e)


def select_topk(scores_NE, bias_E, k: int, *, norm_topk: bool, num_groups: int = 1,
                topk_groups: int = 1):
  """Chooses top-k by scores + bias (optionally group-limited); gates from scores.

  Returns (idx_NK int32, w_NK float32), w normalised over the k when norm_topk
  and k > 1.
  """
  choice = jax.lax.stop_gradient(scores_NE) + jax.lax.stop_gradient(bias_E)
  choice = group_limit(choice, num_groups, topk_groups)
  _, idx_NK = jax.lax.top_k(choice, k)
  w_NK = jnp.take_along_axis(scores_NE, idx_NK, axis=-1)
  if norm_topk and k > 1:
    w_NK = w_NK / (jnp.sum(w_NK, axis=-1, keepdims=True) + 1e-20)
  return idx_NK.astype(jnp.int32), w_NK


def flat_route(x_ND, w_router_DE, bias_E, cfg, specs: Sequence[spec_lib.TierSpec],
               valid_N) -> tuple[Route, RouterAux]:
  """Depth 1: DeepSeek-V3 top-k over all experts of all tiers."""
  e_total = sum(s.num_experts for s in specs)
  logits_NE = x_ND @ w_router_DE
  s_NE = scores_of(logits_NE, cfg.score_fn)
  idx_NK, w_NK = select_topk(s_NE, bias_E, int(cfg.top_k), norm_topk=cfg.norm_topk,
                             num_groups=int(cfg.num_groups), topk_groups=int(cfg.topk_groups))
  valid = valid_N[:, None]
  expert_NK = jnp.where(valid, idx_NK, e_total)
  gate_NK = jnp.where(valid, w_NK * cfg.route_scale, 0.0)
  sn_NE = _normalise(s_NE)
  tier_prob, tier_scores, visit = [], [], []
  for s in specs:
    part = sn_NE[:, s.offset:s.offset + s.num_experts]
    tier_prob.append(jnp.sum(part, axis=-1))
    tier_scores.append(_normalise(part))
    in_tier = (expert_NK >= s.offset) & (expert_NK < s.offset + s.num_experts)
    visit.append(jnp.any(in_tier, axis=-1))
  aux = RouterAux(logits=(logits_NE,), tier_prob_NR=jnp.stack(tier_prob, -1),
                  tier_scores=tuple(tier_scores), visit_NR=jnp.stack(visit, -1),
                  domain_logits_NM=None)
  return Route(expert_NK, gate_NK), aux


def tier_logits(x_ND, router, cfg):
  """Level 1 (+2): (tier_logits_NR, domain_logits_NM or None)."""
  if cfg.routing_depth == 3:
    dom_NM = x_ND @ router["domain"]
    p_dom_NM = jax.nn.softmax(dom_NM, axis=-1)
    per_domain_NMR = jnp.einsum("nd,dmr->nmr", x_ND, router["tier"])
    return jnp.einsum("nmr,nm->nr", per_domain_NMR, p_dom_NM), dom_NM
  return x_ND @ router["tier"], None


def compact_slots(expert_NJ, gate_NJ, active_NJ, k: int):
  """Keeps k slots per token, active ones first in their order (k >= max active).

  Slot j goes to column cumsum(active)_j - 1: a one-hot match over [N, k, J]
  (tiny), cheaper on CPU than a per-row sort and differentiable in the gates.
  """
  if expert_NJ.shape[1] == k:
    return expert_NJ, gate_NJ, active_NJ
  col_NJ = jnp.cumsum(active_NJ, axis=1) - 1
  hit_NKJ = (col_NJ[:, None, :] == jnp.arange(k)[None, :, None]) & active_NJ[:, None, :]
  active_NK = jnp.any(hit_NKJ, axis=-1)
  expert_NK = jnp.sum(jnp.where(hit_NKJ, expert_NJ[:, None, :], 0), axis=-1)
  gate_NK = jnp.sum(jnp.where(hit_NKJ, gate_NJ[:, None, :], 0.0), axis=-1)
  return expert_NK, gate_NK, active_NK


def tiered_route(x_ND, router, tier_bias_R, expert_bias: Sequence, cfg,
                 specs: Sequence[spec_lib.TierSpec], valid_N) -> tuple[Route, RouterAux]:
  """Depth 2 and 3: (domain ->) tier -> top-k_r experts inside the chosen tier(s)."""
  e_total = sum(s.num_experts for s in specs)
  n_tiers = len(specs)
  t_logits_NR, dom_NM = tier_logits(x_ND, router, cfg)
  p_tier_NR = jax.nn.softmax(t_logits_NR, axis=-1)
  choice_NR = jax.lax.stop_gradient(p_tier_NR) + jax.lax.stop_gradient(tier_bias_R)
  _, tier_idx_NJ = jax.lax.top_k(choice_NR, int(cfg.tier_top_k))
  visit_NR = jnp.any(tier_idx_NJ[:, :, None] == jnp.arange(n_tiers), axis=1) & valid_N[:, None]
  tier_w_NR = p_tier_NR
  if cfg.tier_gate == "unit":
    tier_w_NR = p_tier_NR / jax.lax.stop_gradient(jnp.maximum(p_tier_NR, 1e-30))
  e_logits_NE = x_ND @ router["experts"]
  experts, gates, actives, scores, logits = [], [], [], [], []
  for r, s in enumerate(specs):
    lg_NE = e_logits_NE[:, s.offset:s.offset + s.num_experts]
    s_NE = scores_of(lg_NE, cfg.score_fn)
    idx_NK, w_NK = select_topk(s_NE, expert_bias[r], s.top_k, norm_topk=cfg.norm_topk)
    experts.append(idx_NK + s.offset)
    gates.append(cfg.route_scale * tier_w_NR[:, r:r + 1] * w_NK)
    actives.append(jnp.broadcast_to(visit_NR[:, r:r + 1], idx_NK.shape))
    scores.append(_normalise(s_NE))
    logits.append(lg_NE)
  expert_NJ, gate_NJ, active_NJ = (jnp.concatenate(a, axis=1) for a in (experts, gates, actives))
  k = spec_lib.max_active_slots(cfg)
  expert_NK, gate_NK, active_NK = compact_slots(expert_NJ, gate_NJ, active_NJ, k)
  route = Route(jnp.where(active_NK, expert_NK, e_total), jnp.where(active_NK, gate_NK, 0.0))
  head = (t_logits_NR,) if dom_NM is None else (dom_NM, t_logits_NR)
  aux = RouterAux(logits=head + tuple(logits), tier_prob_NR=p_tier_NR,
                  tier_scores=tuple(scores), visit_NR=visit_NR, domain_logits_NM=dom_NM)
  return route, aux


def route(x_ND, router, bias, cfg, specs, valid_N) -> tuple[Route, RouterAux]:
  """Dispatches on cfg.routing_depth. x_ND is cast to float32 here.

  router: {'experts': [D, E], 'tier': [D, R] or [D, M, R], 'domain': [D, M]};
  bias: {'experts': tuple of [E_r] per tier, 'tier': [R] or None}.
  """
  x32 = x_ND.astype(jnp.float32)
  router = {k: v.astype(jnp.float32) for k, v in router.items()}
  if cfg.routing_depth == 1:
    bias_E = jnp.concatenate([b for b in bias["experts"]])
    return flat_route(x32, router["experts"], bias_E, cfg, specs, valid_N)
  return tiered_route(x32, router, bias["tier"], bias["experts"], cfg, specs, valid_N)
