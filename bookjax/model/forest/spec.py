"""Static description of an Expert Forest config: tiers, validation, parameter counts.

Everything here is plain Python on the config (no arrays), so it runs before
anything is traced or compiled.

Tiers are laid out in the canonical order `TIER_NAMES` (light, deep, super); a
tier is *present* when it is in the config and has `num_experts > 0`. Experts get
global ids 0..E-1 in that order: tier r owns ids [offset_r, offset_r + E_r).
"""
from __future__ import annotations

import dataclasses
from typing import Any

TIER_NAMES = ("light", "deep", "super")
DISPATCH_BACKENDS = ("sorted", "capacity", "ragged_dot", "dense_loop", "expert_parallel")
SCORE_FNS = ("softmax", "sigmoid")
TIER_GATES = ("prob", "unit")
TIER_FIELDS = ("num_experts", "d_ff", "depth", "top_k")


@dataclasses.dataclass(frozen=True)
class TierSpec:
  """One present tier.

  name: 'light' | 'deep' | 'super'; num_experts: E_r; d_ff: F_r; depth: S_r
  SwiGLU sub-layers per expert; top_k: k_r (experts per visiting token at routing
  depth 2/3); offset: first global expert id; mix: nominal share m_r (normalised
  over present tiers) of tier visits (depth 2/3) or routed copies (depth 1).
  """
  name: str
  num_experts: int
  d_ff: int
  depth: int
  top_k: int
  offset: int
  mix: float

  def params_per_expert(self, d_model: int) -> int:
    """S_r sub-layers of gate, up and down projections: 3 * S_r * D * F_r."""
    return 3 * self.depth * d_model * self.d_ff

  @property
  def width(self) -> int:
    """Matmul width of one copy, S_r * F_r: FLOPs per routed copy ∝ D * width."""
    return self.depth * self.d_ff


def _tier_cfg(cfg, name):
  tiers = cfg.tiers
  return tiers[name] if name in tiers else None


def tier_specs(cfg) -> tuple[TierSpec, ...]:
  """Present tiers in canonical order (assumes a validated config)."""
  present = []
  for name in TIER_NAMES:
    t = _tier_cfg(cfg, name)
    if t is not None and int(t.num_experts) > 0:
      present.append((name, t))
  mix = {n: float(cfg.nominal_tier_mix[n]) if n in cfg.nominal_tier_mix else 0.0
         for n, _ in present}
  total = sum(mix.values()) or 1.0
  out, offset = [], 0
  for name, t in present:
    out.append(TierSpec(name, int(t.num_experts), int(t.d_ff), int(t.depth), int(t.top_k),
                        offset, mix[name] / total))
    offset += int(t.num_experts)
  return tuple(out)


def num_experts(cfg) -> int:
  return sum(s.num_experts for s in tier_specs(cfg))


def max_active_slots(cfg) -> int:
  """K: routed copies a token can have at most (the static slot count).

  Depth 1: top_k. Depth 2/3: the tier_top_k tiers with the largest top_k.
  """
  specs = tier_specs(cfg)
  if cfg.routing_depth == 1:
    return int(cfg.top_k)
  ks = sorted((s.top_k for s in specs), reverse=True)
  return sum(ks[:int(cfg.tier_top_k)])


def tier_costs(cfg) -> tuple[float, ...]:
  """Relative compute ĉ_r per tier visit (depth 2/3) or per copy (depth 1).

  c_r = k_r * S_r * F_r at depth 2/3 (a visit runs k_r experts), c_r = S_r * F_r at
  depth 1; normalised so the nominal mix costs 1: ĉ_r = c_r / sum_s m_s c_s.
  """
  specs = tier_specs(cfg)
  c = [s.width * (s.top_k if cfg.routing_depth > 1 else 1) for s in specs]
  nominal = sum(s.mix * ci for s, ci in zip(specs, c)) or 1.0
  return tuple(ci / nominal for ci in c)


# ----------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------

def _require(cond: bool, field: str, msg: str) -> None:
  if not cond:
    raise ValueError(f"config.{field}: {msg}")


def _validate_tiers(cfg, p: str) -> None:
  _require(hasattr(cfg, "tiers") and len(cfg.tiers) > 0, f"{p}.tiers",
           f"must define at least one of {TIER_NAMES}")
  for name in cfg.tiers.keys():
    _require(name in TIER_NAMES, f"{p}.tiers.{name}",
             f"unknown tier name {name!r}; known tiers: {TIER_NAMES}")
  for name in cfg.tiers.keys():
    t, f = cfg.tiers[name], f"{p}.tiers.{name}"
    for k in TIER_FIELDS:
      _require(k in t, f"{f}.{k}", "missing")
    _require(t.num_experts >= 0, f"{f}.num_experts", f"must be >= 0, got {t.num_experts}")
    if t.num_experts == 0:
      _require(t.top_k == 0, f"{f}.top_k",
               f"must be 0 when num_experts is 0 (tier absent), got {t.top_k}")
      continue
    _require(1 <= t.top_k <= t.num_experts, f"{f}.top_k",
             f"must lie in [1, num_experts={t.num_experts}], got {t.top_k}")
    _require(t.d_ff >= 1, f"{f}.d_ff", f"must be >= 1, got {t.d_ff}")
    min_depth = 2 if name == "deep" else 1
    _require(t.depth >= min_depth, f"{f}.depth",
             f"must be >= {min_depth} for the {name} tier, got {t.depth}")
  _require(any(cfg.tiers[n].num_experts > 0 for n in cfg.tiers.keys()), f"{p}.tiers",
           "every tier has num_experts 0; at least one tier must be present")


def _validate_mix(cfg, p: str) -> None:
  mix = cfg.nominal_tier_mix
  for name in mix.keys():
    _require(name in TIER_NAMES, f"{p}.nominal_tier_mix.{name}",
             f"unknown tier name {name!r}; known tiers: {TIER_NAMES}")
    _require(mix[name] >= 0, f"{p}.nominal_tier_mix.{name}", f"must be >= 0, got {mix[name]}")
  present = [s.name for s in tier_specs(cfg)]
  for name in present:
    _require(name in mix and mix[name] > 0, f"{p}.nominal_tier_mix.{name}",
             f"every present tier needs a nominal share > 0 (present: {present})")


def _validate_routing(cfg, p: str) -> None:
  _require(cfg.routing_depth in (1, 2, 3), f"{p}.routing_depth",
           f"must be 1, 2 or 3, got {cfg.routing_depth}")
  _require(cfg.score_fn in SCORE_FNS, f"{p}.score_fn",
           f"must be one of {SCORE_FNS}, got {cfg.score_fn!r}")
  specs = tier_specs(cfg)
  e_total = sum(s.num_experts for s in specs)
  if cfg.routing_depth == 1:
    _require(1 <= cfg.top_k <= e_total, f"{p}.top_k",
             f"must lie in [1, total experts={e_total}], got {cfg.top_k}")
    _require(cfg.num_groups >= 1 and e_total % cfg.num_groups == 0, f"{p}.num_groups",
             f"must be >= 1 and divide the {e_total} experts, got {cfg.num_groups}")
    _require(1 <= cfg.topk_groups <= cfg.num_groups, f"{p}.topk_groups",
             f"must lie in [1, num_groups={cfg.num_groups}], got {cfg.topk_groups}")
    kept = cfg.topk_groups * (e_total // cfg.num_groups)
    _require(cfg.top_k <= kept, f"{p}.top_k",
             f"must be <= topk_groups * experts per group = {kept}, got {cfg.top_k}")
  else:
    _require(1 <= cfg.tier_top_k <= len(specs), f"{p}.tier_top_k",
             f"must lie in [1, present tiers={len(specs)}], got {cfg.tier_top_k}")
    _require(cfg.tier_gate in TIER_GATES, f"{p}.tier_gate",
             f"must be one of {TIER_GATES}, got {cfg.tier_gate!r}")
    _require(cfg.num_groups == 1 and cfg.topk_groups == 1, f"{p}.num_groups",
             "group-limited routing is only defined for routing_depth 1; set "
             "num_groups = topk_groups = 1")
  if cfg.routing_depth == 3:
    _require(cfg.num_domains >= 1, f"{p}.num_domains", f"must be >= 1, got {cfg.num_domains}")
  _require(cfg.domain_supervision >= 0, f"{p}.domain_supervision",
           f"must be >= 0, got {cfg.domain_supervision}")
  _require(cfg.domain_supervision == 0 or cfg.routing_depth == 3, f"{p}.domain_supervision",
           "domain supervision needs the level-1 domain router (routing_depth 3)")
  for i, d in enumerate(cfg.domain_label_map):
    _require(-1 <= d < cfg.num_domains, f"{p}.domain_label_map",
             f"entry {i} must lie in [-1, num_domains={cfg.num_domains}), got {d}")
  _require(cfg.num_corpus_domains >= 1, f"{p}.num_corpus_domains",
           f"must be >= 1, got {cfg.num_corpus_domains}")
  _require(cfg.route_scale > 0, f"{p}.route_scale", f"must be > 0, got {cfg.route_scale}")


def _validate_dispatch(cfg, p: str) -> None:
  _require(cfg.dispatch in DISPATCH_BACKENDS, f"{p}.dispatch",
           f"must be one of {DISPATCH_BACKENDS}, got {cfg.dispatch!r}")
  _require(cfg.capacity_factor > 0, f"{p}.capacity_factor",
           f"must be > 0, got {cfg.capacity_factor}")
  pow2 = lambda v: v >= 1 and (v & (v - 1)) == 0
  _require(cfg.batched_factor >= 0, f"{p}.batched_factor",
           f"must be >= 0 (0: tile loop only), got {cfg.batched_factor}")
  _require(pow2(cfg.block_size), f"{p}.block_size",
           f"must be a power of two, got {cfg.block_size}")
  _require(pow2(cfg.min_block_size) and cfg.min_block_size <= cfg.block_size,
           f"{p}.min_block_size",
           f"must be a power of two <= block_size={cfg.block_size}, got {cfg.min_block_size}")


def validate_config(cfg, model_cfg, prefix: str = "model.ffn.forest") -> None:
  """Checks a forest config; raises ValueError('config.<prefix>.<field>: ...').

  Plain Python on the config: runs before anything is traced or compiled.
  """
  p = prefix
  _validate_tiers(cfg, p)
  _validate_mix(cfg, p)
  _validate_routing(cfg, p)
  _validate_dispatch(cfg, p)
  _require(cfg.num_shared >= 0, f"{p}.num_shared", f"must be >= 0, got {cfg.num_shared}")
  _require(cfg.num_shared == 0 or cfg.shared_d_ff >= 1, f"{p}.shared_d_ff",
           f"must be >= 1 when num_shared > 0, got {cfg.shared_d_ff}")
  for k in ("bias_update_rate", "balance_loss_weight", "z_loss_weight", "compute_loss_weight"):
    _require(cfg[k] >= 0, f"{p}.{k}", f"must be >= 0, got {cfg[k]}")
  del model_cfg  # the forest needs nothing from the model section beyond d_model


# ----------------------------------------------------------------------------------
# Parameter accounting
# ----------------------------------------------------------------------------------

def router_params(cfg, d_model: int) -> int:
  """Router weights touched by every token (domain, tier and expert routers)."""
  specs = tier_specs(cfg)
  n = d_model * sum(s.num_experts for s in specs)
  if cfg.routing_depth == 3:
    n += d_model * cfg.num_domains * (1 + len(specs))
  elif cfg.routing_depth == 2:
    n += d_model * len(specs)
  return n


def total_params(cfg, model_cfg) -> int:
  """All parameters of one forest layer."""
  d = model_cfg.d_model
  n = sum(s.num_experts * s.params_per_expert(d) for s in tier_specs(cfg))
  return n + router_params(cfg, d) + 3 * d * cfg.shared_d_ff * cfg.num_shared


def activated_params_per_token(cfg, model_cfg) -> dict[str, float]:
  """Parameters one token touches in one forest layer: nominal, min and max.

  Always: shared experts (3 * D * num_shared * shared_d_ff) and the routers.
  Depth 2/3: a token visits tier_top_k tiers and k_r experts in each;
    nominal = tier_top_k * sum_r m_r k_r P_r   (P_r = params per expert of tier r),
    min / max: the tier_top_k tiers with the smallest / largest k_r P_r.
  Depth 1: top_k experts anywhere; nominal = top_k * sum_r m_r P_r (m_r = share of
    copies), min / max: the top_k cheapest / dearest experts (group limits ignored,
    so these are bounds).
  """
  d = model_cfg.d_model
  specs = tier_specs(cfg)
  always = 3 * d * cfg.shared_d_ff * cfg.num_shared + router_params(cfg, d)
  if cfg.routing_depth == 1:
    per = sorted(p for s in specs for p in [s.params_per_expert(d)] * s.num_experts)
    k = int(cfg.top_k)
    nominal = k * sum(s.mix * s.params_per_expert(d) for s in specs)
    lo, hi = sum(per[:k]), sum(per[-k:])
  else:
    visit = sorted(s.top_k * s.params_per_expert(d) for s in specs)
    k = int(cfg.tier_top_k)
    nominal = k * sum(s.mix * s.top_k * s.params_per_expert(d) for s in specs)
    lo, hi = sum(visit[:k]), sum(visit[-k:])
  return dict(nominal=float(always + nominal), min=float(always + lo), max=float(always + hi))


def describe(cfg: Any) -> str:
  """One line per tier, for logs."""
  return "; ".join(f"{s.name}: {s.num_experts}x(d_ff={s.d_ff}, depth={s.depth}), top_k={s.top_k}"
                   for s in tier_specs(cfg))
