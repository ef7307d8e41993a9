"""The Expert Forest: BookLM's routed MoE FFN over heterogeneous expert tiers.

Layout of the package (each part usable alone, so an expert-parallel back-end can
reuse the routing core and the per-tier compute):
  spec.py      tiers from the config, validation, parameter accounting (no arrays)
  routing.py   routing core: depth 1 (flat, DeepSeek-V3), 2 (tier -> expert),
               3 (domain -> tier -> expert); formulas in its docstring
  dispatch.py  back-ends 'sorted' (default, dropless), 'capacity', 'ragged_dot',
               'dense_loop' (test oracle); the algorithm in its docstring
  expert_parallel.py  the same back-ends split over a device mesh (experts over
               the `expert` axis, all_to_all in shard_map); used automatically
               under `jax.set_mesh` + logical rules, or `dispatch='expert_parallel'`
  balance.py   balance / z / compute-aware losses, statistics, bias update
  module.py    the ExpertForest linen module

Contract with the trainer:
  ExpertForest(cfg, model_cfg)(x_BTD, domain_BT=None, segment_ids_BT=None) -> y_BTD
  'router_bias' collection: selection biases `expert_bias_<tier>` [E_r] and
      `tier_bias` [R] (depth 2/3), created at init, never in 'params'.
  'losses' collection: balance_loss, z_loss, compute_loss, domain_loss, each a
      scalar already multiplied by its config weight (absent when the weight is 0).
  'router_stats' collection: load_<tier> [E_r] (copies per expert, summed over
      the batch), load_target_<tier>, tier_load / tier_load_target [R],
      tier_usage [R], tier_usage_by_domain [C, R], domain_usage [M],
      domain_joint [C, M] (corpus domain x router domain soft counts), tokens,
      routed_copies, dropped_copies, drop_rate, activated_params_mean / _max,
      compute_ratio, max_violation and the raw (unweighted) losses.
  update_router_bias(router_bias, router_stats, rate) -> new router_bias.
  validate_config(cfg, model_cfg, prefix) raises ValueError("config.<prefix>.x: ...").
  activated_params_per_token(cfg, model_cfg) -> dict(nominal=, min=, max=).
"""
from bookjax.model.forest.balance import update_router_bias
from bookjax.model.forest.module import ExpertForest, TierExperts
from bookjax.model.forest.spec import (TIER_NAMES, activated_params_per_token, tier_specs,
                                       total_params, validate_config)

__all__ = ["ExpertForest", "TierExperts", "update_router_bias", "validate_config",
           "activated_params_per_token", "total_params", "tier_specs", "TIER_NAMES"]
