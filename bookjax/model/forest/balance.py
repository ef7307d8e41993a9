"""Balancing: auxiliary losses, router statistics and the aux-loss-free bias update.

Notation: b sequences, t tokens, valid tokens only (segment id > 0); tier r with
E_r experts, nominal share m_r (config nominal_tier_mix, renormalised over the
present tiers) and relative cost ĉ_r (spec.tier_costs: FLOPs of a visit / copy,
normalised so the nominal mix costs 1).

Sequence-wise balance loss (DeepSeek-V3 eq. 17-20, applied inside each tier):
  n_{b,e}  = copies of sequence b routed to expert e,   n_{b,r} = sum_{e in r} n_{b,e}
  f_{b,e}  = E_r * n_{b,e} / n_{b,r}
  P_{b,e}  = mean over tokens t of b with a copy in tier r of s'_{t,e}
             (s' = the token's scores normalised to sum 1 over the tier's experts)
  L_bal    = mean_r  mean_{b: n_{b,r} > 0}  sum_{e in r} f_{b,e} P_{b,e}
  (= 1 when balanced; for a single tier at depth 1 this is exactly DeepSeek-V3's
  loss with f = E/(K T) * count.)  Within a tier experts cost the same, so equal
  counts are the right target there.
Router z-loss (ST-MoE): L_z = mean_t sum_{routers} logsumexp(logits_t)^2.
Compute-aware tier term. Equal counts are the wrong target *across* tiers: a
  count-balance loss over tiers (or over all experts at depth 1) pulls tokens
  into the few big experts, whose visits cost many times a light one. The target
  is the nominal mix m (which fixes the compute budget), and each tier's pull is
  weighted by its cost:
    f_r = share of tier visits (depth 2/3) or routed copies (depth 1) in tier r
    P̄_r = mean_t tier probability (depth 2/3: p_tier; depth 1: sum of s' over r)
    L_compute = sum_r ĉ_r (f_r - m_r)^2 / m_r        (value: a cost-weighted chi-square)
    dL/dθ     = sum_r ĉ_r (f_r - m_r) / m_r * dP̄_r/dθ  (gradient: f held fixed, P̄ moves)
  i.e. the Switch-style surrogate sum_r ĉ_r (f_r - m_r)(P̄_r - m_r)/m_r with its
  value replaced by the chi-square. The gradient pushes tier r's probability down
  with force ĉ_r (f_r - m_r) / m_r: over-using the super tier by 10% is corrected
  ĉ_super / ĉ_light times harder than over-using the light tier by 10%, and the
  only equilibrium is f = m (0 on budget). Realised compute is reported as compute_ratio =
  sum_r ĉ_r f_r (1 = on budget).
Domain supervision (depth 3, optional): cross-entropy of the level-1 router
  against the corpus domain label mapped by domain_label_map.

Aux-loss-free bias (DeepSeek-V3): after each step,
  b_e <- b_e + rate * sign(target_e - load_e)
with load_e the copies routed to e summed over the whole (global) batch. Targets:
  experts, depth 2/3: the tier's mean load (tokens already in the tier, experts
    of equal cost);
  experts, depth 1:   m_r * (all copies) / E_r (compute-aware split over tiers);
  tiers (depth 2/3):  m_r * (all tier visits).
The bias lives in the 'router_bias' collection: no gradient, no optimizer, no
weight decay touches it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp

from bookjax.model.forest import spec as spec_lib
from bookjax.model.forest.routing import Route, RouterAux

sg = jax.lax.stop_gradient


def per_sequence_counts(route: Route, specs, num_seqs: int):
  """Per tier: copies per sequence and expert, float32 [B, E_r].

  A scatter-add of N*K ones (integer bookkeeping, not row data: on XLA:CPU ~10x
  cheaper than summing an [N, K, E_r] one-hot).
  """
  n, k = route.expert_NK.shape
  seq_NK = jnp.broadcast_to((jnp.arange(n) // (n // num_seqs))[:, None], (n, k))
  out = []
  for s in specs:
    local = route.expert_NK - s.offset
    ok = (local >= 0) & (local < s.num_experts)
    size = num_seqs * s.num_experts
    idx = jnp.where(ok, seq_NK * s.num_experts + local, size).reshape(-1)
    flat = jnp.zeros((size + 1,), jnp.float32).at[idx].add(1.0)
    out.append(flat[:size].reshape(num_seqs, s.num_experts))
  return out


def balance_loss(counts, aux: RouterAux, specs, num_seqs: int):
  """Sequence-wise balance loss inside each tier (module docstring)."""
  terms = []
  for r, (s, c_BE) in enumerate(zip(specs, counts)):
    n_B = jnp.sum(c_BE, axis=-1)
    f_BE = s.num_experts * c_BE / jnp.maximum(n_B, 1.0)[:, None]
    v_BT = aux.visit_NR[:, r].astype(jnp.float32).reshape(num_seqs, -1)
    sc_BTE = aux.tier_scores[r].reshape(num_seqs, -1, s.num_experts)
    p_BE = jnp.einsum("bt,bte->be", v_BT, sc_BTE) / jnp.maximum(jnp.sum(v_BT, 1), 1.0)[:, None]
    has_B = (n_B > 0).astype(jnp.float32)
    per_b = jnp.sum(sg(f_BE) * p_BE, axis=-1)
    terms.append(jnp.sum(has_B * per_b) / jnp.maximum(jnp.sum(has_B), 1.0))
  return sum(terms) / len(terms)


def z_loss(aux: RouterAux, valid_N):
  """mean over valid tokens of sum over routers of logsumexp(logits)^2."""
  z_N = sum(jax.nn.logsumexp(l, axis=-1) ** 2 for l in aux.logits)
  v = valid_N.astype(jnp.float32)
  return jnp.sum(z_N * v) / jnp.maximum(jnp.sum(v), 1.0)


def tier_visits(route: Route, aux: RouterAux, cfg, specs):
  """[N, R] float32: tier visits (depth 2/3) or routed copies per tier (depth 1)."""
  if cfg.routing_depth > 1:
    return aux.visit_NR.astype(jnp.float32)
  cols = [jnp.sum((route.expert_NK >= s.offset) & (route.expert_NK < s.offset + s.num_experts),
                  axis=1, dtype=jnp.float32) for s in specs]
  return jnp.stack(cols, axis=-1)


def compute_loss(visits_NR, aux: RouterAux, valid_N, cfg, specs):
  """Compute-aware tier term (module docstring). Returns (loss, compute_ratio)."""
  m_R = jnp.array([s.mix for s in specs], jnp.float32)
  c_R = jnp.array(spec_lib.tier_costs(cfg), jnp.float32)
  tot_R = jnp.sum(visits_NR, axis=0)
  f_R = tot_R / jnp.maximum(jnp.sum(tot_R), 1.0)
  v = valid_N.astype(jnp.float32)
  pbar_R = jnp.sum(aux.tier_prob_NR * v[:, None], axis=0) / jnp.maximum(jnp.sum(v), 1.0)
  surrogate = jnp.sum(c_R * sg(f_R - m_R) * (pbar_R - m_R) / m_R)
  chi2 = jnp.sum(c_R * (f_R - m_R) ** 2 / m_R)
  # Value: the cost-weighted chi-square of the realised mix (>= 0); gradient: the
  # surrogate's (f held fixed, as in the Switch balance loss).
  return surrogate + sg(chi2 - surrogate), jnp.sum(c_R * f_R)


def router_domain_labels(domain_N, cfg):
  """Corpus domain ids -> router domain ids (-1: no label)."""
  table = tuple(cfg.domain_label_map)
  if not table:
    return jnp.where((domain_N >= 0) & (domain_N < cfg.num_domains), domain_N, -1)
  t = jnp.array(table, jnp.int32)
  ok = (domain_N >= 0) & (domain_N < len(table))
  return jnp.where(ok, t[jnp.clip(domain_N, 0, len(table) - 1)], -1)


def domain_loss(aux: RouterAux, domain_N, valid_N, cfg):
  """Cross-entropy of the level-1 router against mapped corpus domain labels."""
  lab_N = router_domain_labels(domain_N, cfg)
  ok = (valid_N & (lab_N >= 0)).astype(jnp.float32)
  logp_NM = jax.nn.log_softmax(aux.domain_logits_NM, axis=-1)
  nll_N = -jnp.take_along_axis(logp_NM, jnp.maximum(lab_N, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(nll_N * ok) / jnp.maximum(jnp.sum(ok), 1.0)


def load_targets(loads, cfg, specs):
  """Per tier [E_r] target loads for the bias update (module docstring)."""
  if cfg.routing_depth > 1:
    return [jnp.full_like(l, jnp.sum(l) / l.shape[0]) for l in loads]
  total = sum(jnp.sum(l) for l in loads)
  return [jnp.full_like(l, s.mix * total / s.num_experts) for s, l in zip(specs, loads)]


def activated_params(route: Route, valid_N, cfg, model_cfg, specs):
  """Per-token activated parameters (shared + routers + routed experts): (mean, max)."""
  d = model_cfg.d_model
  per_expert = jnp.array([p for s in specs for p in [s.params_per_expert(d)] * s.num_experts]
                         + [0], jnp.float32)
  always = 3 * d * cfg.shared_d_ff * cfg.num_shared + spec_lib.router_params(cfg, d)
  per_tok = always + jnp.sum(per_expert[route.expert_NK], axis=1)
  v = valid_N.astype(jnp.float32)
  mean = jnp.sum(per_tok * v) / jnp.maximum(jnp.sum(v), 1.0)
  return mean, jnp.max(jnp.where(valid_N, per_tok, 0.0))


def usage_by_domain(visits_NR, domain_N, valid_N, num_domains: int):
  """[C, R]: share of each corpus domain's tier visits per tier (rows sum to 1)."""
  ok = valid_N & (domain_N >= 0) & (domain_N < num_domains)
  onehot_NC = ((domain_N[:, None] == jnp.arange(num_domains)) & ok[:, None]).astype(jnp.float32)
  c_CR = onehot_NC.T @ visits_NR
  return c_CR / jnp.maximum(jnp.sum(c_CR, axis=-1, keepdims=True), 1.0)


def losses_and_stats(route: Route, aux: RouterAux, info, valid_N, domain_N: Optional[Any],
                     num_seqs: int, cfg, model_cfg, specs):
  """All raw (unweighted) losses and statistics of one forest call.

  Returns (losses: name -> differentiable scalar, stats: name -> array). Loads are
  sums over the batch (not means), so sums over data shards stay exact.
  """
  counts = per_sequence_counts(route, specs, num_seqs)
  loads = [jnp.sum(c, axis=0) for c in counts]
  visits_NR = tier_visits(route, aux, cfg, specs)
  losses = dict(balance_loss=balance_loss(counts, aux, specs, num_seqs),
                z_loss=z_loss(aux, valid_N))
  losses["compute_loss"], ratio = compute_loss(visits_NR, aux, valid_N, cfg, specs)
  if aux.domain_logits_NM is not None and domain_N is not None:
    losses["domain_loss"] = domain_loss(aux, domain_N, valid_N, cfg)
  stats: dict[str, Any] = {}
  targets = load_targets(loads, cfg, specs)
  for s, l, t in zip(specs, loads, targets):
    stats[f"load_{s.name}"] = l
    stats[f"load_target_{s.name}"] = t
  tier_load = jnp.sum(visits_NR, axis=0)
  stats["tier_load"] = tier_load
  stats["tier_load_target"] = jnp.array([s.mix for s in specs]) * jnp.sum(tier_load)
  stats["tier_usage"] = tier_load / jnp.maximum(jnp.sum(tier_load), 1.0)
  if domain_N is not None:
    stats["tier_usage_by_domain"] = usage_by_domain(visits_NR, domain_N, valid_N,
                                                    int(cfg.num_corpus_domains))
  if aux.domain_logits_NM is not None:
    v = valid_N.astype(jnp.float32)[:, None]
    p = jax.nn.softmax(aux.domain_logits_NM, axis=-1)
    stats["domain_usage"] = jnp.sum(p * v, 0) / jnp.maximum(jnp.sum(v), 1.0)
    if domain_N is not None:
      # [C, M] soft counts: corpus domain x level-1 router domain (mutual information,
      # confusion against corpus labels); a sum, so it adds up exactly over shards.
      c = int(cfg.num_corpus_domains)
      ok = valid_N & (domain_N >= 0) & (domain_N < c)
      onehot_NC = ((domain_N[:, None] == jnp.arange(c)) & ok[:, None]).astype(jnp.float32)
      stats["domain_joint"] = onehot_NC.T @ p
  for s, l, t in zip(specs, loads, targets):
    vio = jnp.max(jnp.where(t > 0, (l - t) / jnp.maximum(t, 1e-9), 0.0))
    stats["max_violation"] = vio if "max_violation" not in stats else \
        jnp.maximum(stats["max_violation"], vio)
  stats["tokens"] = jnp.sum(valid_N.astype(jnp.float32))
  stats["routed_copies"] = info.routed.astype(jnp.float32)
  stats["dropped_copies"] = info.dropped.astype(jnp.float32)
  stats["drop_rate"] = stats["dropped_copies"] / jnp.maximum(stats["routed_copies"], 1.0)
  stats["activated_params_mean"], stats["activated_params_max"] = activated_params(
      route, valid_N, cfg, model_cfg, specs)
  stats["compute_ratio"] = ratio
  for k, v in losses.items():
    stats[k] = v
  return losses, {k: sg(v) for k, v in stats.items()}


# ----------------------------------------------------------------------------------
# Bias update
# ----------------------------------------------------------------------------------

EXPERT_BIAS_PREFIX = "expert_bias_"
TIER_BIAS = "tier_bias"


def _sown_sum(v):
  """Sown values are tuples (one entry per call of the module): sum them."""
  if isinstance(v, (tuple, list)):
    return sum(v[1:], v[0])
  return v


def _stat_names(bias_key: str) -> Optional[tuple[str, str]]:
  if bias_key.startswith(EXPERT_BIAS_PREFIX):
    tier = bias_key[len(EXPERT_BIAS_PREFIX):]
    return f"load_{tier}", f"load_target_{tier}"
  if bias_key == TIER_BIAS:
    return "tier_load", "tier_load_target"
  return None


def _update_leaf(bias, stats: Mapping, key: str, rate: float):
  names = _stat_names(key)
  if names is None or names[0] not in stats or names[1] not in stats:
    return bias
  load, target = _sown_sum(stats[names[0]]), _sown_sum(stats[names[1]])
  boxed = isinstance(bias, flax.core.meta.AxisMetadata)
  value = bias.unbox() if boxed else bias
  new = value + jnp.asarray(rate, value.dtype) * jnp.sign(target - load).astype(value.dtype)
  return bias.replace_boxed(new) if boxed else new


def update_router_bias(router_bias, router_stats, rate: float):
  """b <- b + rate * sign(target - load) for every forest layer in the model.

  router_bias: the model's 'router_bias' collection; router_stats: the
  'router_stats' collection sown by the same step (trees nested like the params,
  leaves as sown: tuples). Layers without stats keep their bias. Pure: returns a
  new tree of the same structure; the trainer calls it after the optimizer step.
  Loads must be sums over the global batch (they are: see losses_and_stats).
  """
  def walk(bias_tree, stats_tree):
    out = {}
    for key, val in bias_tree.items():
      if isinstance(val, Mapping):
        sub = stats_tree.get(key, {}) if isinstance(stats_tree, Mapping) else {}
        out[key] = walk(val, sub)
      else:
        out[key] = _update_leaf(val, stats_tree if isinstance(stats_tree, Mapping) else {},
                                key, rate)
    return type(bias_tree)(out) if isinstance(bias_tree, flax.core.FrozenDict) else out

  return walk(router_bias, router_stats)
