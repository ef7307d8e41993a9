"""The ExpertForest linen module: parameters, bias variables, sowing."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from bookjax.model import layers
from bookjax.model.forest import balance, dispatch, routing
from bookjax.model.forest import spec as spec_lib

EXPERT_IN_AXES = ("experts", "layers", "embed", None, "mlp")
EXPERT_OUT_AXES = ("experts", "layers", "mlp", "embed")


class TierExperts(nn.Module):
  """Stacked weights of one tier: wi [E, S, D, 2, F] (gate and up projections side
  by side: one matmul computes both), wo [E, S, F, D]."""
  num_experts: int
  depth: int
  d_ff: int
  d_model: int
  init_std: float = 0.02
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self):
    e, s, d, f = self.num_experts, self.depth, self.d_model, self.d_ff
    init = nn.initializers.normal(self.init_std)
    dt = layers.dtype_of(self.param_dtype)
    mk = lambda name, shape, axes: layers.param_with_axes(self, name, init, shape, axes, dt)
    return dict(wi=mk("wi", (e, s, d, 2, f), EXPERT_IN_AXES),
                wo=mk("wo", (e, s, f, d), EXPERT_OUT_AXES))


class ExpertForest(nn.Module):
  """Routed Expert Forest FFN (see bookjax/model/forest/__init__.py).

  __call__(x_BTD, domain_BT=None, segment_ids_BT=None) -> y_BTD.
  domain_BT: corpus domain per token (-1: none), for supervision and statistics.
  segment_ids_BT: 0 marks padding tokens: they are not routed (output 0 from the
  routed experts) and are excluded from loads, statistics and losses.
  Sows weighted losses into 'losses' and statistics into 'router_stats'; reads
  the selection bias from 'router_bias' (created at init).
  """
  cfg: Any
  model_cfg: Any

  def _bias(self, name: str, size: int, axis: str):
    init = nn.with_logical_partitioning(lambda shape: jnp.zeros(shape, jnp.float32), (axis,))
    if self.has_variable("router_bias", name) or self.is_mutable_collection("router_bias"):
      return self.variable("router_bias", name, init, (size,)).value
    return jnp.zeros((size,), jnp.float32)   # applied without the collection: no bias

  def _router_params(self, d: int, specs):
    cfg, m = self.cfg, self.model_cfg
    init = nn.initializers.normal(m.init_std)
    mk = lambda name, shape, axes: layers.param_with_axes(self, name, init, shape, axes)
    experts = [mk(f"router_{s.name}", (d, s.num_experts), ("embed", "experts")) for s in specs]
    router = dict(experts=jnp.concatenate(experts, axis=1))
    r = len(specs)
    if cfg.routing_depth == 3:
      router["domain"] = mk("router_domain", (d, cfg.num_domains), ("embed", "domains"))
      router["tier"] = mk("router_tier", (d, cfg.num_domains, r), ("embed", "domains", "tiers"))
    elif cfg.routing_depth == 2:
      router["tier"] = mk("router_tier", (d, r), ("embed", "tiers"))
    return router

  @nn.compact
  def __call__(self, x_BTD, domain_BT=None, segment_ids_BT=None):
    cfg, m = self.cfg, self.model_cfg
    specs = spec_lib.tier_specs(cfg)
    b, t, d = x_BTD.shape
    n = b * t
    dt = layers.dtype_of(m.compute_dtype)
    x_ND = x_BTD.reshape(n, d)
    valid_N = (jnp.ones((n,), bool) if segment_ids_BT is None
               else (segment_ids_BT > 0).reshape(n))
    domain_N = None if domain_BT is None else domain_BT.reshape(n).astype(jnp.int32)

    router = self._router_params(d, specs)
    bias = dict(experts=tuple(self._bias(f"{balance.EXPERT_BIAS_PREFIX}{s.name}",
                                         s.num_experts, "experts") for s in specs),
                tier=(self._bias(balance.TIER_BIAS, len(specs), "tiers")
                      if cfg.routing_depth > 1 else None))
    route, aux = routing.route(x_ND, router, bias, cfg, specs, valid_N)

    weights = tuple(TierExperts(s.num_experts, s.depth, s.d_ff, d, m.init_std, m.param_dtype,
                                name=s.name)() for s in specs)
    y_ND, info = dispatch.dispatch(cfg.dispatch, x_ND, route, weights, specs, cfg, dt)
    if cfg.num_shared > 0:
      shared = layers.SwiGLU(cfg.num_shared * cfg.shared_d_ff, init_std=m.init_std,
                             compute_dtype=m.compute_dtype, param_dtype=m.param_dtype,
                             name="shared")
      y_ND = y_ND + shared(x_ND.astype(dt))

    losses, stats = balance.losses_and_stats(route, aux, info, valid_N, domain_N, b, cfg, m,
                                             specs)
    weight = dict(balance_loss=cfg.balance_loss_weight, z_loss=cfg.z_loss_weight,
                  compute_loss=cfg.compute_loss_weight, domain_loss=cfg.domain_supervision)
    for name, value in losses.items():
      if weight[name] > 0:
        self.sow("losses", name, weight[name] * value)
    for name, value in stats.items():
      self.sow("router_stats", name, value)
    y_BTD = y_ND.reshape(b, t, d).astype(x_BTD.dtype)
    return layers.constrain(y_BTD, ("batch", "length", "embed"))
