"""Tests of the Expert Forest (bookjax/model/forest/).

Parameters are filled from numpy (shapes via jax.eval_shape): compiling the
threefry initialisers of a dozen parameters costs more than the tests themselves.
Each back-end comparison traces every back-end into one jitted function.
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from bookjax import config_lib
from bookjax.model import ffn
from bookjax.model import forest
from bookjax.model.forest import routing
from bookjax.model.forest import spec as spec_lib

D_MODEL = 16
B, T = 2, 24


def model_cfg():
  m = config_lib.default_model_config()
  m.d_model = D_MODEL
  m.ffn.kind = "forest"
  return m


def forest_cfg(depth: int, absent=(), **kw) -> ml_collections.ConfigDict:
  """Small forest: light 4 x (d_ff 8, top-2), deep 3 x (d_ff 8, depth 2), super 2 x 16."""
  f = config_lib.default_forest_config()
  f.routing_depth = depth
  f.tiers = dict(light=dict(num_experts=4, d_ff=8, depth=1, top_k=2),
                 deep=dict(num_experts=3, d_ff=8, depth=2, top_k=1),
                 super=dict(num_experts=2, d_ff=16, depth=1, top_k=1))
  for name in absent:
    f.tiers[name].num_experts = 0
    f.tiers[name].top_k = 0
  f.block_size = 8                       # tiles of 8 rows on a few dozen rows per expert
  f.min_block_size = 8
  f.capacity_factor = 100.0              # 'capacity' drops nothing unless a test says so
  for k, v in kw.items():
    f[k] = v
  forest.validate_config(f, model_cfg(), "model.ffn.forest")
  return f


def with_dispatch(cfg, kind: str, **kw):
  c = ml_collections.ConfigDict(cfg.to_dict())
  c.dispatch = kind
  for k, v in kw.items():
    c[k] = v
  return c


def inputs(seed=0, pad=True):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D_MODEL)).astype(np.float32))
  seg = np.ones((B, T), np.int32)
  if pad:
    seg[1, -5:] = 0                       # padding tokens at the end of row 1
  dom = rng.integers(-1, 4, size=(B, T)).astype(np.int32)
  return x, jnp.asarray(seg), jnp.asarray(dom)


def variables(module, x, seg, dom, std=0.4, seed=1):
  """Variables with numpy-filled params (std) and zero router bias."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), x, dom, seg))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * std),
                        shapes["params"])
  bias = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["router_bias"])
  return dict(params=params, router_bias=bias)


def _with_kind(cfg, name: str):
  """'sorted@0.5': back-end 'sorted' with batched_factor 0.5 (the tests use 0: tile
  loop only; 0.5: head and tail both busy; 8: every copy in the batched head)."""
  kind, _, factor = name.partition("@")
  return with_dispatch(cfg, kind, **(dict(batched_factor=float(factor)) if factor else {}))


def run_backends(cfg, kinds, seed=0, pad=True):
  """For each back-end: y, grads of sum(y * ct) w.r.t. (params, x), and the sown
  collections, all from one jitted function. Same params for every back-end."""
  x, seg, dom = inputs(seed, pad)
  m = model_cfg()
  mods = {k: forest.ExpertForest(_with_kind(cfg, k), m) for k in kinds}
  v = variables(mods[kinds[0]], x, seg, dom)
  ct = jnp.asarray(np.random.default_rng(seed + 7).normal(size=x.shape).astype(np.float32))

  def one(mod, params, x):
    y, aux = mod.apply({"params": params, "router_bias": v["router_bias"]}, x, dom, seg,
                       mutable=["losses", "router_stats"])
    return jnp.sum(y * ct), (y, aux)

  @jax.jit
  def all_backends(params, x):
    out = {}
    for k, mod in mods.items():
      (_, (y, aux)), g = jax.value_and_grad(functools.partial(one, mod), argnums=(0, 1),
                                            has_aux=True)(params, x)
      out[k] = dict(y=y, grads=g, aux=aux)
    return out

  return all_backends(v["params"], x), v, (x, seg, dom)


def assert_tree_close(a, b, tol=1e-5):
  """max |a - b| <= tol * max |b| (+ 1e-6) for every leaf (f32 comparison)."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    x, y = np.asarray(x), np.asarray(y)
    err = np.max(np.abs(x - y)) if x.size else 0.0
    assert err <= tol * np.max(np.abs(y)) + 1e-6, (err, np.max(np.abs(y)))


# ----------------------------------------------------------------------------------
# Back-ends agree with the dense per-expert loop (outputs and gradients)
# ----------------------------------------------------------------------------------

COMBOS = {
    # depth 1, DeepSeek-V3 semantics: sigmoid, group-limited top-k, no renorm, scale
    "depth1_sigmoid_groups": dict(depth=1, kw=dict(score_fn="sigmoid", num_groups=3,
                                                   topk_groups=2, top_k=3, norm_topk=False,
                                                   route_scale=2.5)),
    # depth 2 without the deep tier, every token visits both tiers, a shared expert
    "depth2_no_deep": dict(depth=2, absent=("deep",), kw=dict(tier_top_k=2, num_shared=1,
                                                              shared_d_ff=8)),
    # depth 3 with all tiers, domain supervision, two tile sizes (plus ragged_dot)
    "depth3_full": dict(depth=3, kw=dict(domain_supervision=0.1, min_block_size=4), ragged=True),
    # depth 3 without the light tier, unit tier gates
    "depth3_no_light": dict(depth=3, absent=("light",), kw=dict(score_fn="sigmoid",
                                                                tier_gate="unit")),
}

SLOW_COMBOS = {
    "depth1_softmax_no_super": dict(depth=1, absent=("super",), kw=dict(top_k=2)),
    "depth2_full": dict(depth=2, kw={}),
    "depth2_only_super": dict(depth=2, absent=("light", "deep"), kw={}),
    "depth3_tier_top2": dict(depth=3, kw=dict(tier_top_k=2)),
}


@functools.lru_cache(maxsize=None)
def combo_results(name):
  c = {**COMBOS, **SLOW_COMBOS}[name]
  cfg = forest_cfg(c["depth"], c.get("absent", ()), **c["kw"])
  kinds = ["dense_loop", "sorted", "sorted@0", "sorted@0.5", "sorted@8", "capacity"] + (
      ["ragged_dot"] if c.get("ragged") else [])
  return cfg, run_backends(cfg, kinds)


def check_backends_match(name):
  _, (out, _, _) = combo_results(name)
  ref = out["dense_loop"]
  assert np.max(np.abs(np.asarray(ref["y"]))) > 1e-2        # not a vacuous comparison
  for kind in out:
    assert_tree_close(out[kind]["y"], ref["y"])
    assert_tree_close(out[kind]["grads"], ref["grads"])
    stats = out[kind]["aux"]["router_stats"]
    assert float(stats["dropped_copies"][0]) == 0.0


@pytest.mark.parametrize("name", sorted(COMBOS))
def test_backends_match_dense_loop(name):
  check_backends_match(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SLOW_COMBOS))
def test_backends_match_dense_loop_more_layouts(name):
  check_backends_match(name)


# ----------------------------------------------------------------------------------
# Routing semantics
# ----------------------------------------------------------------------------------

def test_group_limited_topk_hand_example():
  """6 experts in 3 groups of 2; keep 2 groups by top-2 sum; top-3 inside."""
  s = jnp.array([[0.9, 0.1, 0.5, 0.45, 0.0, 0.8]])
  idx, w = routing.select_topk(s, jnp.zeros(6), 3, norm_topk=True, num_groups=3,
                               topk_groups=2)
  # group scores 1.0, 0.95, 0.8 -> groups 0, 1; without the limit expert 5 would win.
  np.testing.assert_array_equal(np.asarray(idx), [[0, 2, 3]])
  np.testing.assert_allclose(np.asarray(w), [[0.9 / 1.85, 0.5 / 1.85, 0.45 / 1.85]], rtol=1e-6)


def test_group_mask_is_minus_inf_not_zero():
  """With a negative bias the kept groups score below 0: masking with 0 would
  wrongly pick experts 2 and 3 of the dropped group."""
  s = jnp.array([[0.9, 0.1, 0.5, 0.45, 0.0, 0.8]])
  bias = jnp.array([-1.0, -1.0, -1.0, -1.0, 0.0, 0.0])
  masked = routing.group_limit(s + bias, 3, 2)       # group scores -1.0, -1.05, 0.8
  assert np.all(np.isneginf(np.asarray(masked)[0, 2:4]))
  idx, w = routing.select_topk(s, bias, 3, norm_topk=True, num_groups=3, topk_groups=2)
  np.testing.assert_array_equal(np.asarray(idx), [[5, 4, 0]])
  # gates come from the scores, never from the bias
  np.testing.assert_allclose(np.asarray(w), [[0.8 / 1.7, 0.0, 0.9 / 1.7]], rtol=1e-6)


def test_flat_route_scale_and_sentinel():
  cfg = forest_cfg(1, top_k=2, route_scale=3.0, norm_topk=True)
  specs = spec_lib.tier_specs(cfg)
  logits = jnp.array([2.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 0.0])
  w = jnp.zeros((9, 9)).at[0].set(logits)       # token 0 gets these logits
  route, _ = routing.flat_route(jnp.eye(2, 9), w, jnp.zeros(9), cfg, specs,
                                jnp.array([True, False]))
  p = np.asarray(jax.nn.softmax(logits))
  np.testing.assert_array_equal(np.asarray(route.expert_NK[0]), [0, 1])
  np.testing.assert_allclose(np.asarray(route.gate_NK[0]), 3.0 * p[:2] / p[:2].sum(), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(route.expert_NK[1]), [9, 9])   # padding: sentinel
  np.testing.assert_array_equal(np.asarray(route.gate_NK[1]), [0.0, 0.0])


def test_tiered_route_matches_numpy():
  """Depth 3 by hand: domain softmax -> mixture of tier routers -> top-k in tier."""
  cfg = forest_cfg(3, tier_top_k=1)
  specs = spec_lib.tier_specs(cfg)
  rng = np.random.default_rng(3)
  n, d = 6, D_MODEL
  x = rng.normal(size=(n, d)).astype(np.float32)
  router = dict(experts=rng.normal(size=(d, 9)).astype(np.float32),
                domain=rng.normal(size=(d, 3)).astype(np.float32),
                tier=rng.normal(size=(d, 3, 3)).astype(np.float32))
  tier_bias = np.array([0.0, 0.3, -0.2], np.float32)
  ebias = [rng.normal(size=(s.num_experts,)).astype(np.float32) * 0.1 for s in specs]
  route, _ = routing.tiered_route(jnp.asarray(x), {k: jnp.asarray(v) for k, v in router.items()},
                                  jnp.asarray(tier_bias), [jnp.asarray(b) for b in ebias], cfg,
                                  specs, jnp.ones(n, bool))
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  for t in range(n):
    p_dom = softmax(x[t] @ router["domain"])
    p_tier = softmax(np.einsum("dmr,m->r", np.einsum("d,dmr->dmr", x[t], router["tier"]), p_dom))
    r = int(np.argmax(p_tier + tier_bias))
    s = specs[r]
    sc = softmax(x[t] @ router["experts"][:, s.offset:s.offset + s.num_experts])
    top = np.argsort(-(sc + ebias[r]), kind="stable")[:s.top_k]
    w = sc[top] / sc[top].sum() if s.top_k > 1 else sc[top]
    want_e = np.full(2, 9)
    want_g = np.zeros(2, np.float32)
    want_e[:s.top_k] = top + s.offset
    want_g[:s.top_k] = p_tier[r] * w
    np.testing.assert_array_equal(np.asarray(route.expert_NK[t]), want_e)
    np.testing.assert_allclose(np.asarray(route.gate_NK[t]), want_g, rtol=1e-5, atol=1e-7)


def test_unit_tier_gate_has_value_one_and_keeps_the_gradient():
  """tier_gate='unit': gates equal the in-tier weights (p_tier factor of value 1), and
  the loss still differentiates into the domain and tier routers."""
  cfg = forest_cfg(3, tier_gate="unit")
  specs = spec_lib.tier_specs(cfg)
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(6, D_MODEL)).astype(np.float32))
  router = dict(experts=rng.normal(size=(D_MODEL, 9)), domain=rng.normal(size=(D_MODEL, 3)),
                tier=rng.normal(size=(D_MODEL, 3, 3)))
  router = {k: jnp.asarray(v.astype(np.float32)) for k, v in router.items()}
  bias = [jnp.zeros((s.num_experts,)) for s in specs]

  def gates(router, c):
    return routing.tiered_route(x, router, jnp.zeros(3), bias, c, specs, jnp.ones(6, bool))[0]

  unit, prob = gates(router, cfg), gates(router, with_dispatch(cfg, "sorted", tier_gate="prob"))
  np.testing.assert_array_equal(np.asarray(unit.expert_NK), np.asarray(prob.expert_NK))
  sums = np.asarray(unit.gate_NK).sum(1)
  assert np.all(sums > np.asarray(prob.gate_NK).sum(1))
  for t in range(6):   # one tier per token; its weights sum to 1 (top-2) or are s (top-1)
    e = np.asarray(unit.expert_NK[t])
    if np.sum(e < 9) > 1:
      np.testing.assert_allclose(sums[t], 1.0, rtol=1e-6)
  g = jax.grad(lambda r: jnp.sum(gates(r, cfg).gate_NK ** 2))(router)
  for name in ("domain", "tier", "experts"):
    assert float(jnp.max(jnp.abs(g[name]))) > 0, name


def test_gradients_reach_all_three_levels():
  _, (out, _, _) = combo_results("depth3_full")
  g = out["sorted"]["grads"][0]
  for name in ("router_domain", "router_tier", "router_light"):
    assert float(jnp.max(jnp.abs(g[name]))) > 0, name


# ----------------------------------------------------------------------------------
# Collections, statistics, losses
# ----------------------------------------------------------------------------------

def test_sown_collections_and_stats():
  cfg, (out, v, (x, seg, dom)) = combo_results("depth3_full")
  assert set(v["router_bias"]) == {"expert_bias_light", "expert_bias_deep",
                                   "expert_bias_super", "tier_bias"}
  assert not any("bias" in k for k in v["params"])
  res = out["sorted"]
  stats = {k: np.asarray(val[0]) for k, val in res["aux"]["router_stats"].items()}
  losses = {k: float(val[0]) for k, val in res["aux"]["losses"].items()}
  n_valid = int(np.sum(np.asarray(seg) > 0))
  assert stats["tokens"] == n_valid
  loads = sum(stats[f"load_{t}"].sum() for t in ("light", "deep", "super"))
  assert loads == stats["routed_copies"]
  np.testing.assert_allclose(stats["tier_usage"].sum(), 1.0, rtol=1e-6)
  np.testing.assert_allclose(stats["tier_usage_by_domain"].sum(-1)[:3], 1.0, rtol=1e-6)
  assert stats["tier_load"].sum() == n_valid            # tier_top_k = 1
  for name, weight in (("balance_loss", cfg.balance_loss_weight), ("z_loss", cfg.z_loss_weight),
                       ("compute_loss", cfg.compute_loss_weight),
                       ("domain_loss", cfg.domain_supervision)):
    np.testing.assert_allclose(losses[name], weight * stats[name], rtol=1e-6)
  acc = forest.activated_params_per_token(cfg, model_cfg())
  assert acc["min"] <= stats["activated_params_mean"] <= acc["max"]
  assert stats["activated_params_max"] <= acc["max"]
  # padding tokens are not routed: their routed output is exactly 0
  y = np.asarray(res["y"])
  assert np.all(y[np.asarray(seg) == 0] == 0)


def test_activated_params_per_token_by_hand():
  m = model_cfg()
  cfg = forest_cfg(3, num_shared=1, shared_d_ff=4)
  d = D_MODEL
  light, deep, sup = 2 * 3 * d * 8, 1 * 3 * 2 * d * 8, 1 * 3 * d * 16   # k_r * params
  router = d * 9 + d * 3 * (1 + 3)
  always = 3 * d * 4 + router
  mix = np.array([0.6, 0.3, 0.1])
  got = forest.activated_params_per_token(cfg, m)
  assert got["nominal"] == pytest.approx(always + float(mix @ [light, deep, sup]))
  assert got["min"] == always + min(light, deep, sup)
  assert got["max"] == always + max(light, deep, sup)
  cfg1 = forest_cfg(1, top_k=3)
  got1 = forest.activated_params_per_token(cfg1, m)
  per = [3 * d * 8] * 4 + [3 * 2 * d * 8] * 3 + [3 * d * 16] * 2
  assert got1["min"] == d * 9 + sum(sorted(per)[:3])
  assert got1["max"] == d * 9 + sum(sorted(per)[-3:])


def test_capacity_reports_drops():
  cfg = forest_cfg(1, absent=("deep", "super"), top_k=2)
  out, _, _ = run_backends(with_dispatch(cfg, "capacity", capacity_factor=0.5), ["capacity"],
                           pad=False)
  stats = out["capacity"]["aux"]["router_stats"]
  load = np.asarray(stats["load_light"][0])
  cap = forest.dispatch.capacity(with_dispatch(cfg, "capacity", capacity_factor=0.5),
                                 spec_lib.tier_specs(cfg)[0], B * T)
  assert float(stats["dropped_copies"][0]) == np.maximum(load - cap, 0).sum() > 0
  np.testing.assert_allclose(float(stats["drop_rate"][0]),
                             np.maximum(load - cap, 0).sum() / load.sum(), rtol=1e-6)


# ----------------------------------------------------------------------------------
# Aux-loss-free bias
# ----------------------------------------------------------------------------------

def _skewed_setup(depth):
  """Varied tokens with a shared first feature whose router weight favours light
  expert 0 (and, at depth 2/3, the super tier)."""
  cfg = forest_cfg(depth, z_loss_weight=0.0)
  mod = forest.ExpertForest(cfg, model_cfg())
  x, seg, dom = inputs(5, pad=False)
  x = x.at[:, :, 0].set(1.0)
  v = variables(mod, x, seg, dom, std=0.3)
  p = dict(v["params"])
  p["router_light"] = p["router_light"].at[0, 0].set(1.5)
  if depth > 1:
    p["router_tier"] = p["router_tier"].at[0, ..., 2].set(1.5)
  return mod, cfg, p, v["router_bias"], (x, seg, dom)


@pytest.mark.parametrize("depth", [1, 3])
def test_bias_update_moves_load_toward_balance(depth):
  mod, cfg, params, bias, (x, seg, dom) = _skewed_setup(depth)

  @jax.jit
  def step(bias):
    _, aux = mod.apply({"params": params, "router_bias": bias}, x, dom, seg,
                       mutable=["losses", "router_stats"])
    stats = aux["router_stats"]
    return forest.update_router_bias(bias, stats, 0.02), stats

  def imbalance(stats):
    l, t = np.asarray(stats["load_light"][0]), np.asarray(stats["load_target_light"][0])
    out = np.abs(l - t).sum()
    if depth > 1:
      out += np.abs(np.asarray(stats["tier_load"][0]) - np.asarray(stats["tier_load_target"][0])).sum()
    return out

  history = []
  for _ in range(40):
    bias, stats = step(bias)
    history.append(imbalance(stats))
  assert history[0] > 0
  assert np.mean(history[-5:]) < 0.4 * history[0], history
  light = np.asarray(bias["expert_bias_light"])
  assert light[0] < light[1:].mean()                  # the favoured expert is pushed down
  if depth > 1:
    tier = np.asarray(bias["tier_bias"])
    assert tier[2] < tier[:2].mean()                  # and the favoured (super) tier


def test_bias_gets_no_gradient_and_is_not_a_param():
  mod, cfg, params, bias, (x, seg, dom) = _skewed_setup(3)

  def loss(params, bias):
    y, aux = mod.apply({"params": params, "router_bias": bias}, x, dom, seg,
                       mutable=["losses", "router_stats"])
    return jnp.sum(y ** 2) + sum(jnp.sum(l) for l in jax.tree.leaves(aux["losses"]))

  g_bias = jax.jit(jax.grad(loss, argnums=1))(params, bias)
  assert all(float(jnp.max(jnp.abs(g))) == 0.0 for g in jax.tree.leaves(g_bias))
  # 'router_bias' lives outside 'params': an optimizer (and its weight decay) built on
  # the params tree never sees it.
  shapes = jax.eval_shape(mod.init, jax.random.PRNGKey(0), x, dom, seg)
  assert "router_bias" in shapes and "params" in shapes
  assert not any("bias" in "/".join(map(str, k)) for k, _ in
                 jax.tree_util.tree_flatten_with_path(shapes["params"])[0])


def test_update_router_bias_on_a_model_tree():
  """Nested like the model's collections; sown tuples are summed; other leaves kept."""
  bias = {"block_1": {"ffn": {"expert_bias_light": jnp.zeros(3), "tier_bias": jnp.zeros(2)}},
          "block_2": {"ffn": {"expert_bias_light": jnp.ones(3)}}}
  stats = {"block_1": {"ffn": {"load_light": (jnp.array([5.0, 1.0, 3.0]),),
                               "load_target_light": (jnp.array([3.0, 3.0, 3.0]),),
                               "tier_load": (jnp.array([1.0, 0.0]), jnp.array([2.0, 0.0])),
                               "tier_load_target": (jnp.array([1.0, 1.0]),
                                                    jnp.array([1.0, 1.0]))}}}
  new = forest.update_router_bias(bias, stats, 0.5)
  np.testing.assert_allclose(new["block_1"]["ffn"]["expert_bias_light"], [-0.5, 0.5, 0.0])
  np.testing.assert_allclose(new["block_1"]["ffn"]["tier_bias"], [-0.5, 0.5])
  np.testing.assert_allclose(new["block_2"]["ffn"]["expert_bias_light"], [1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------------
# Config validation
# ----------------------------------------------------------------------------------

def _bad(mutate):
  m = model_cfg()
  mutate(m.ffn.forest)
  return m


BAD = [
    (lambda f: f.tiers.light.update(top_k=99), "config.model.ffn.forest.tiers.light.top_k:"),
    (lambda f: setattr(f.tiers, "mega", ml_collections.ConfigDict(
        dict(num_experts=2, d_ff=8, depth=1, top_k=1))), "config.model.ffn.forest.tiers.mega:"),
    (lambda f: f.tiers.super.update(num_experts=0), "config.model.ffn.forest.tiers.super.top_k:"),
    (lambda f: f.tiers.deep.update(depth=1), "config.model.ffn.forest.tiers.deep.depth:"),
    (lambda f: f.update(routing_depth=4), "config.model.ffn.forest.routing_depth:"),
    (lambda f: f.update(routing_depth=1, top_k=15), "config.model.ffn.forest.top_k:"),
    (lambda f: f.update(routing_depth=1, num_groups=5), "config.model.ffn.forest.num_groups:"),
    (lambda f: f.update(routing_depth=2, num_groups=2), "config.model.ffn.forest.num_groups:"),
    (lambda f: f.update(tier_top_k=4), "config.model.ffn.forest.tier_top_k:"),
    (lambda f: f.update(dispatch="scatter"), "config.model.ffn.forest.dispatch:"),
    (lambda f: f.update(score_fn="relu"), "config.model.ffn.forest.score_fn:"),
    (lambda f: f.update(tier_gate="half"), "config.model.ffn.forest.tier_gate:"),
    (lambda f: f.update(block_size=48), "config.model.ffn.forest.block_size:"),
    (lambda f: f.update(batched_factor=-1.0), "config.model.ffn.forest.batched_factor:"),
    (lambda f: f.nominal_tier_mix.update(deep=0.0), "config.model.ffn.forest.nominal_tier_mix.deep:"),
    (lambda f: f.update(balance_loss_weight=-1.0), "config.model.ffn.forest.balance_loss_weight:"),
    (lambda f: [f.tiers[n].update(num_experts=0, top_k=0) for n in ("light", "deep", "super")],
     "config.model.ffn.forest.tiers:"),
]


@pytest.mark.parametrize("mutate,field", BAD, ids=[b[1].split(".forest.")[1] for b in BAD])
def test_bad_config_raises_naming_field(mutate, field):
  m = _bad(mutate)
  with pytest.raises(ValueError) as e:
    ffn.validate_config(m.ffn, m, "model.ffn")     # pure Python: nothing is traced
  assert str(e.value).startswith(field), str(e.value)


def test_default_configs_validate():
  m = model_cfg()
  ffn.validate_config(m.ffn, m, "model.ffn")
  c = config_lib.default_config()
  assert c.model.ffn.forest.dispatch == "sorted"


# ----------------------------------------------------------------------------------
# In the transformer
# ----------------------------------------------------------------------------------

def test_transformer_blocks_after_dense_layers_use_the_forest():
  from bookjax.model import transformer  # pylint: disable=g-import-not-at-top
  c = config_lib.default_config()
  m = c.model
  m.vocab_size, m.d_model, m.num_layers, m.num_dense_layers = 40, D_MODEL, 3, 1
  m.attention.num_heads, m.attention.head_dim = 2, 8
  m.ffn.kind = "forest"
  m.ffn.forest = forest_cfg(3)
  config_lib.validate_model(m)
  model = transformer.Transformer(m)
  bt = (2, 8)
  batch = dict(inputs=jnp.ones(bt, jnp.int32), targets=jnp.ones(bt, jnp.int32),
               positions=jnp.tile(jnp.arange(8), (2, 1)), segment_ids=jnp.ones(bt, jnp.int32),
               sentence_ids=jnp.zeros(bt, jnp.int32), domain=jnp.zeros(bt, jnp.int32))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), batch))
  assert set(shapes["router_bias"]) == {"block_1", "block_2"}      # block_0 is dense
  rng = np.random.default_rng(0)
  v = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * 0.1),
                   shapes)
  logits, aux = jax.jit(lambda v: model.apply(v, batch, mutable=["losses", "router_stats"]))(v)
  assert logits.shape == (2, 8, 40)
  assert set(aux["losses"]) == {"block_1", "block_2"}
  new = forest.update_router_bias(v["router_bias"], aux["router_stats"], 0.1)
  assert jax.tree.structure(new) == jax.tree.structure(v["router_bias"])
  assert any(float(jnp.max(jnp.abs(a - b))) > 0
             for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(v["router_bias"])))


def test_bfloat16_compute_close_to_oracle():
  """bf16 compute, f32 params: `sorted` within bf16 rounding of the oracle, and
  gradient dtypes follow the primals (params f32, activations bf16)."""
  cfg = forest_cfg(2)
  m = model_cfg()
  m.compute_dtype = "bfloat16"
  x, seg, dom = inputs(2)
  x = x.astype(jnp.bfloat16)
  mods = {k: forest.ExpertForest(with_dispatch(cfg, k), m) for k in ("dense_loop", "sorted")}
  v = variables(mods["sorted"], x, seg, dom)

  @jax.jit
  def grads(params, x):
    out = {}
    for k, mod in mods.items():
      f = lambda p, x, mod=mod: jnp.sum(mod.apply(
          {"params": p, "router_bias": v["router_bias"]}, x, dom, seg,
          mutable=["losses", "router_stats"])[0].astype(jnp.float32) ** 2)
      out[k] = jax.grad(f, argnums=(0, 1))(params, x)
    return out

  g = grads(v["params"], x)
  assert g["sorted"][1].dtype == jnp.bfloat16
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(g["sorted"][0]))
  to32 = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)
  assert_tree_close(to32(g["sorted"]), to32(g["dense_loop"]), tol=3e-2)
