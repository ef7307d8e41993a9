r"""Benchmark of the Expert Forest dispatch back-ends (forward + backward, one layer).

Every row is measured in this one process. For each expert layout (total experts
8 -> 32 -> 168 = 128/32/8 tiers) at a fixed activated width per token, it times the
whole forest layer (routing, dispatch, combine, losses and statistics; gradients
w.r.t. all parameters and the input) with
  (a) sorted      the default dropless back-end,
  (b) capacity    capacity factor --capacity_factor (default 1.25),
  (c) ragged_dot  jax.lax.ragged_dot per tier,
  (d) dense       one-hot dense dispatch: every token through every expert,
and divides each by
  (e) ideal       the same routed FLOPs (the tier loads of this batch) as perfectly
                  balanced batched einsums [E_r, C_r, D] with no routing at all.

A second table (--train_compare, on by default) times whole training steps
(forward, backward, AdamW, bias update) of the tiny models of the routing-depth
study (experiments/configs/ablate_routing_depth.py): the dense FFN and the forest
at routing depth 1 / 2 / 3, all with the same activated FFN width per token, and
prints each forest's tokens/s as a fraction of the dense model's.

Layouts: 'E' is a single light tier of E experts with top_k 4 and d_ff = width/4;
'L/D/S' is light L (d_ff width/4, top_k 4) / deep D (depth 2, d_ff width/4,
top_k 2) / super S (d_ff width, top_k 1): every token activates `width` hidden
units per sub-layer-weighted copy whichever tier it visits.

  python -m experiments.bench_moe                   # the full table (minutes)
  python -m experiments.bench_moe --quick           # seconds-long smoke run
  python -m experiments.bench_moe --json_out=/tmp/bench.json
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import statistics
import time
from typing import Any, Callable

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bookjax import config_lib
from bookjax.model import forest
from bookjax.model.forest import dispatch as dispatch_lib

_LAYOUTS = flags.DEFINE_list("layouts", ["8", "32", "128/32/8"],
                             "Expert layouts: 'E' (one light tier) or 'L/D/S' (three tiers).")
_METHODS = flags.DEFINE_list("methods", ["sorted", "capacity", "ragged_dot", "dense"],
                             "Back-ends to time (the ideal is always timed).")
_TOKENS = flags.DEFINE_integer("tokens", 8192, "Tokens per batch (batch 8 x tokens/8).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width D.")
_WIDTH = flags.DEFINE_integer("width", 512, "Activated hidden width per token.")
_DEPTH = flags.DEFINE_integer("routing_depth", 3, "Routing depth of the forest.")
_CF = flags.DEFINE_float("capacity_factor", 1.25, "Capacity factor of (b).")
_BLOCK = flags.DEFINE_integer("block_size", 0, "Override forest.block_size (0: config default).")
_MIN_BLOCK = flags.DEFINE_integer("min_block_size", 0, "Override forest.min_block_size.")
_BATCHED = flags.DEFINE_float("batched_factor", -1.0,
                              "Override forest.batched_factor of (a) (< 0: config default).")
_REPS = flags.DEFINE_integer("reps", 7, "Timed repetitions of the fast rows (interleaved).")
_SLOW_REPS = flags.DEFINE_integer("slow_reps", 1, "Timed repetitions of ragged_dot and dense.")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny shapes, few reps: a seconds-long smoke run.")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write every row as JSON here.")
_TRAIN = flags.DEFINE_bool("train_compare", True,
                            "Also time tiny forest vs FLOP-matched dense training steps.")
_TRAIN_REPS = flags.DEFINE_integer("train_reps", 20, "Timed train steps per model (interleaved).")
_TUNE_MALLOC = flags.DEFINE_bool(
    "tune_malloc", True, "Keep freed memory in the heap (mallopt), for every row alike.")

SLOW = ("ragged_dot", "dense")


def tune_malloc() -> bool:
  """Stops glibc from serving big buffers with fresh mmaps.

  By default allocations above 32 MiB are mmapped and unmapped on free, so every
  call of a large-batch XLA:CPU program page-faults its big buffers again
  (measured here: writing a fresh 32 MiB output ~15 ms, a reused one ~2 ms). With
  a high mmap threshold freed memory stays in the heap and is reused.
  """
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_threshold = -1, -3
  return bool(libc.mallopt(m_mmap_threshold, 1 << 30) and
              libc.mallopt(m_trim_threshold, (1 << 31) - 1))


# ----------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------

def layout_config(layout: str, width: int, routing_depth: int, **overrides):
  """Forest config for a layout string ('E' or 'L/D/S') at activated `width`."""
  f = config_lib.default_forest_config()
  f.routing_depth = routing_depth
  parts = [int(p) for p in layout.split("/")]
  if len(parts) == 1:
    parts = [parts[0], 0, 0]
  if len(parts) != 3:
    raise ValueError(f"--layouts: {layout!r} is neither 'E' nor 'L/D/S'")
  light, deep, sup = parts
  tiers = dict(light=dict(num_experts=light, d_ff=width // 4, depth=1, top_k=4 if light else 0),
               deep=dict(num_experts=deep, d_ff=width // 4, depth=2, top_k=2 if deep else 0),
               super=dict(num_experts=sup, d_ff=width, depth=1, top_k=1 if sup else 0))
  f.tiers = tiers
  f.top_k = 4
  for k, v in overrides.items():
    f[k] = v
  return f


def model_config(d_model: int):
  m = config_lib.default_model_config()
  m.d_model = d_model
  m.ffn.kind = "forest"
  return m


# ----------------------------------------------------------------------------------
# One-hot dense dispatch (every token through every expert)
# ----------------------------------------------------------------------------------

def dense_dispatch(x_ND, route, weights, specs, cfg, dt):
  """All experts on all tokens, gate-weighted: a scan over each tier's experts
  (checkpointed per expert so memory stays O(N * F))."""
  del cfg
  x_ND = x_ND.astype(dt)
  y_ND = jnp.zeros(x_ND.shape, dt)
  for s, w in zip(specs, weights):
    gate_NE = jnp.sum(jnp.where(route.expert_NK[:, :, None] == s.offset + jnp.arange(
        s.num_experts), route.gate_NK[:, :, None], 0.0), axis=1)

    @jax.checkpoint
    def step(y, inp):
      wi, wo, g_N = inp
      return y + g_N[:, None].astype(dt) * dispatch_lib.expert_ffn(x_ND, wi, wo, dt), None

    y_ND, _ = jax.lax.scan(step, y_ND, (w["wi"], w["wo"], gate_NE.T))
  routed = jnp.sum(route.expert_NK < sum(s.num_experts for s in specs))
  return y_ND, dispatch_lib.DispatchInfo(routed, jnp.zeros_like(routed))


dispatch_lib.BACKENDS.setdefault("dense", dense_dispatch)


# ----------------------------------------------------------------------------------
# Timed functions
# ----------------------------------------------------------------------------------

def layer_step(fcfg, mcfg, tokens: int, seed: int = 0):
  """(jitted fwd+bwd of one forest layer, its args, router stats of the batch)."""
  b = 8 if tokens % 8 == 0 else 1
  x = jax.random.normal(jax.random.PRNGKey(seed), (b, tokens // b, mcfg.d_model), jnp.float32)
  ct = jax.random.normal(jax.random.PRNGKey(seed + 1), x.shape, jnp.float32)
  seg = jnp.ones(x.shape[:2], jnp.int32)
  model = forest.ExpertForest(fcfg, mcfg)
  variables = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(seed + 2), x, None, seg))

  def loss(params, x):
    y, aux = model.apply({"params": params, "router_bias": variables["router_bias"]}, x, None,
                         seg, mutable=["losses", "router_stats"])
    aux_loss = sum(jnp.sum(v) for v in jax.tree.leaves(aux.get("losses", {})))
    return jnp.sum(y * ct) + aux_loss, aux.get("router_stats", {})

  step = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))
  return step, (variables["params"], x)


def ideal_step(fcfg, mcfg, tier_copies: dict[str, int], seed: int = 0):
  """Perfectly balanced batched einsums with the batch's per-tier copies, no routing."""
  dt = jnp.float32
  args = []
  for i, s in enumerate(forest.tier_specs(fcfg)):
    c = max(1, math.ceil(tier_copies[s.name] / s.num_experts))
    k = jax.random.split(jax.random.PRNGKey(seed + i), 3)
    d, f, e, depth = mcfg.d_model, s.d_ff, s.num_experts, s.depth
    args.append((jax.random.normal(k[0], (e, c, d)),
                 0.02 * jax.random.normal(k[1], (e, depth, d, 2, f)),
                 0.02 * jax.random.normal(k[2], (e, depth, f, d))))

  def loss(args):
    return sum(jnp.sum(dispatch_lib.expert_ffn_batched(x, wi, wo, dt)) for x, wi, wo in args)

  return jax.jit(jax.grad(loss)), (args,)


def timing_fields(ts: list[float]) -> dict[str, Any]:
  """min_s / median_s / reps of one row's timed calls."""
  return dict(min_s=min(ts), median_s=statistics.median(ts), reps=len(ts))


def _block(tree):
  jax.block_until_ready(tree)


def time_calls(fns: dict[str, tuple[Callable, tuple]], reps: dict[str, int]) -> dict[str, list]:
  """Round-robin timing (after one warm-up call each), so that load from other
  processes hits every method alike."""
  times: dict[str, list] = {k: [] for k in fns}
  for name, (fn, args) in fns.items():
    _block(fn(*args))
  for i in range(max(reps.values())):
    for name, (fn, args) in fns.items():
      if i >= reps[name]:
        continue
      t0 = time.perf_counter()
      _block(fn(*args))
      times[name].append(time.perf_counter() - t0)
  return times


def tier_copies_of(fcfg, mcfg, tokens: int) -> tuple[dict[str, int], dict[str, Any]]:
  """Per-tier routed copies of the benchmark batch (same seed as layer_step)."""
  step, args = layer_step(fcfg, mcfg, tokens)
  _, stats = step(*args)
  out = {s.name: int(stats[f"load_{s.name}"][0].sum()) for s in forest.tier_specs(fcfg)}
  return out, stats


def run(layouts, methods, tokens, d_model, width, routing_depth, capacity_factor, reps,
        slow_reps, block_size=0, min_block_size=0, batched_factor=-1.0) -> list[dict[str, Any]]:
  """Measures every (layout, method); returns one dict per row."""
  mcfg = model_config(d_model)
  rows = []
  for layout in layouts:
    over = {}
    if block_size:
      over["block_size"] = block_size
    if min_block_size:
      over["min_block_size"] = min_block_size
    if batched_factor >= 0:
      over["batched_factor"] = batched_factor
    base = layout_config(layout, width, routing_depth, **over)
    forest.validate_config(base, mcfg, "bench.forest")
    copies, stats = tier_copies_of(base, mcfg, tokens)
    fns = {"ideal": ideal_step(base, mcfg, copies)}
    for method in methods:
      cfg = layout_config(layout, width, routing_depth, dispatch=method,
                          capacity_factor=capacity_factor, **over)
      fns[method] = layer_step(cfg, mcfg, tokens)
    t = time_calls(fns, {k: (slow_reps if k in SLOW else reps) for k in fns})
    ideal = min(t["ideal"])
    n_exp = sum(s.num_experts for s in forest.tier_specs(base))
    for name in ["ideal"] + list(methods):
      rows.append(dict(layout=layout, experts=n_exp, method=name, tokens=tokens,
                       d_model=d_model, width=width, routing_depth=routing_depth,
                       **timing_fields(t[name]), vs_ideal=min(t[name]) / ideal,
                       tier_copies=copies))
    print(f"measured layout {layout}", flush=True)
  return rows


def format_table(rows) -> str:
  """One text table with ratios to the ideal and sorted's growth over layouts."""
  lines = [f"{'layout':>10} {'experts':>7} {'method':>10} {'min ms':>9} {'median ms':>9} "
           f"{'reps':>4} {'x ideal':>8}"]
  for r in rows:
    lines.append(f"{r['layout']:>10} {r['experts']:>7} {r['method']:>10} {1e3 * r['min_s']:9.1f} "
                 f"{1e3 * r['median_s']:9.1f} {r['reps']:4d} {r['vs_ideal']:8.2f}")
  by = {(r["layout"], r["method"]): r["min_s"] for r in rows}
  layouts = list(dict.fromkeys(r["layout"] for r in rows))
  if ("sorted" in {r["method"] for r in rows}) and len(layouts) > 1:
    first, last = layouts[0], layouts[-1]
    lines.append(f"sorted growth {first} -> {last} experts: "
                 f"{by[(last, 'sorted')] / by[(first, 'sorted')]:.2f}x")
    if (last, "ragged_dot") in by:
      lines.append(f"ragged_dot / sorted at {last}: "
                   f"{by[(last, 'ragged_dot')] / by[(last, 'sorted')]:.1f}x")
  return "\n".join(lines)


# ----------------------------------------------------------------------------------
# Whole training steps: tiny forest vs FLOP-matched dense
# ----------------------------------------------------------------------------------

STUDY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs",
                     "ablate_routing_depth.py")
TRAIN_POINTS = ("dense", "depth1", "depth2", "depth3")
# The embedded corpus' vocabulary is ~9.6K symbols; random token ids of a fixed
# vocabulary give the same step cost without loading the corpus.
TRAIN_VOCAB = 9728


def train_step_fns(study_arg: str | None = None, points=TRAIN_POINTS):
  """{point: (step_fn, [state], batch)} for the routing-depth study's seed-0 points."""
  from bookjax import ablation, sharding, train  # pylint: disable=g-import-not-at-top
  module, _ = ablation.load_study(STUDY)
  base = module.get_config(study_arg)
  by_name = {p.point: p for p in ablation.points_of(module) if p.seed == 0}
  out = {}
  for name in points:
    cfg = train.with_vocab(ablation.point_config(base, by_name[name]), TRAIN_VOCAB)
    config_lib.validate(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    rules = sharding.logical_rules(cfg.mesh_rules)
    model = train.build_model(cfg.model, None)
    tx = train.make_optimizer(cfg.train)
    state = train.create_train_state(model, tx, cfg, mesh, rules)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    batch = train.dummy_batch(b, t)
    rng = np.random.default_rng(0)
    batch["inputs"] = rng.integers(4, TRAIN_VOCAB, (b, t), dtype=np.int32)
    batch["targets"] = rng.integers(4, TRAIN_VOCAB, (b, t), dtype=np.int32)
    batch["weights"] = np.ones((b, t), np.float32)
    batch["chars"] = np.ones((b, t), np.float32)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      step = train.jit_train_step(model, tx, cfg, mesh, rules)
      put = sharding.put_batch(batch, sharding.batch_sharding(mesh, rules))

    def run_step(holder, batch, step=step, mesh=mesh, rules=rules):
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        holder[0], metrics = step(holder[0], batch)
      return metrics

    out[name] = (run_step, ([state], put), b * t)
  return out


def run_train_compare(reps: int, study_arg: str | None = None) -> list[dict[str, Any]]:
  """Round-robin timed train steps; one row per model with tokens/s and x dense."""
  fns = train_step_fns(study_arg)
  t = time_calls({k: (f, a) for k, (f, a, _) in fns.items()}, {k: reps for k in fns})
  dense_tps = fns["dense"][2] / min(t["dense"])
  rows = []
  for name, (_, _, tokens) in fns.items():
    tps = tokens / min(t[name])
    rows.append(dict(table="train_compare", model=name, tokens_per_step=tokens,
                     **timing_fields(t[name]), tokens_per_sec=tps, vs_dense=tps / dense_tps))
  return rows


def format_train_table(rows) -> str:
  lines = [f"{'model':>8} {'tokens/step':>11} {'min ms':>8} {'median ms':>9} {'tokens/s':>9} "
           f"{'x dense':>8}"]
  for r in rows:
    lines.append(f"{r['model']:>8} {r['tokens_per_step']:11d} {1e3 * r['min_s']:8.1f} "
                 f"{1e3 * r['median_s']:9.1f} {r['tokens_per_sec']:9.0f} {r['vs_dense']:8.2f}")
  return "\n".join(lines)


def main(argv):
  del argv
  kw = dict(layouts=_LAYOUTS.value, methods=_METHODS.value, tokens=_TOKENS.value,
            d_model=_D_MODEL.value, width=_WIDTH.value, routing_depth=_DEPTH.value,
            capacity_factor=_CF.value, reps=_REPS.value, slow_reps=_SLOW_REPS.value,
            block_size=_BLOCK.value, min_block_size=_MIN_BLOCK.value,
            batched_factor=_BATCHED.value)
  if _QUICK.value:
    kw.update(layouts=["8/4/2"], tokens=512, d_model=64, width=128, reps=2, slow_reps=1)
  malloc = tune_malloc() if _TUNE_MALLOC.value else False
  fcfg = layout_config("8", 8, 1)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} devices); "
        f"tokens={kw['tokens']} d_model={kw['d_model']} width={kw['width']} "
        f"routing_depth={kw['routing_depth']} "
        f"block_size={kw['block_size'] or fcfg.block_size} "
        f"min_block_size={kw['min_block_size'] or fcfg.min_block_size} "
        f"batched_factor={kw['batched_factor'] if kw['batched_factor'] >= 0 else fcfg.batched_factor} "
        f"capacity_factor={kw['capacity_factor']} malloc_tuned={malloc}", flush=True)
  rows = run(**kw)
  print(format_table(rows))
  if _TRAIN.value:
    train_rows = run_train_compare(2 if _QUICK.value else _TRAIN_REPS.value,
                                   "quick" if _QUICK.value else None)
    print("\ntraining steps, tiny models of the routing-depth study (same activated FFN "
          "width per token):")
    print(format_train_table(train_rows))
    rows += train_rows
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
