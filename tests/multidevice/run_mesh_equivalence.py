"""One train step of the tiny forest + MLA-3D model on several meshes of 8
emulated CPU devices vs. one device; also checks the sharded init.

Usage: python tests/multidevice/run_mesh_equivalence.py [--meshes 8,1,1,1:2,1,4,1]
Prints `RESULT {json}`: per mesh the loss, the largest difference of the updated
state (params, optimizer state, router bias) and of the metrics to the
single-device step, the sharded-init check, and step times.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top

MESHES = ((8, 1, 1, 1), (2, 1, 4, 1), (1, 2, 4, 1), (2, 2, 2, 1), (1, 1, 8, 1))


def shard_report(state) -> dict:
  """Checks every sharded leaf: each device holds exactly its shard, never the
  full array when the spec shards some dim over a mesh axis of size > 1."""
  import jax  # pylint: disable=g-import-not-at-top
  bad, sharded, total = [], 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    total += 1
    sh = leaf.sharding
    expected = sh.shard_shape(leaf.shape)
    shapes = {tuple(s.data.shape) for s in leaf.addressable_shards}
    split = expected != tuple(leaf.shape)
    sharded += split
    spec_split = any(
        ax is not None and all(sh.mesh.shape[a] for a in (ax if isinstance(ax, tuple) else (ax,)))
        and _size(sh.mesh, ax) > 1 and leaf.shape[i] > 1
        for i, ax in enumerate(sh.spec))
    if shapes != {expected} or (spec_split and not split):
      bad.append(f"{jax.tree_util.keystr(path)}: shards {sorted(shapes)}, expected {expected}, "
                 f"full {leaf.shape}, spec {sh.spec}")
  return dict(bad=bad, sharded_leaves=sharded, leaves=total)


def _size(mesh, ax):
  axes = ax if isinstance(ax, tuple) else (ax,)
  n = 1
  for a in axes:
    n *= mesh.shape[a]
  return n


def run_mesh(base, data, model, tx, batch, mesh_shape, devices, steps_timed: int):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from bookjax import sharding, train  # pylint: disable=g-import-not-at-top
  config = common.test_config(mesh_shape)
  config.model.vocab_size = base.model.vocab_size
  sharding.validate(config, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.logical_rules(config.mesh_rules)
  t0 = time.perf_counter()
  state = train.create_train_state(model, tx, config, mesh, rules)
  init_report = shard_report(state)
  init_state = common.to_numpy(state)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    step = train.jit_train_step(model, tx, config, mesh, rules)
    put = sharding.put_batch(batch, sharding.batch_sharding(mesh, rules))
    new_state, metrics = step(state, put)
    metrics = common.to_numpy(metrics)
    t1 = time.perf_counter()
    times = []
    s = new_state
    for _ in range(steps_timed):
      ts = time.perf_counter()
      s, m = step(s, put)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - ts)
  return dict(state=common.to_numpy(new_state), init=init_state, metrics=metrics,
              init_report=init_report, compile_and_first_s=t1 - t0,
              step_s=sorted(times)[len(times) // 2] if times else None)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--meshes", default=":".join(",".join(map(str, m)) for m in MESHES))
  ap.add_argument("--timed_steps", type=int, default=0)
  args = ap.parse_args()
  common.init_devices(8)
  import jax  # pylint: disable=g-import-not-at-top
  meshes = [tuple(int(v) for v in m.split(",")) for m in args.meshes.split(":") if m]
  base = common.test_config()
  data, base, model, tx = common.build(base)
  batch = next(data.train_iter)
  ref = run_mesh(base, data, model, tx, batch, (1, 1, 1, 1), jax.devices()[:1],
                 args.timed_steps)
  out = dict(reference=dict(loss=float(ref["metrics"]["loss"]), step_s=ref["step_s"],
                            compile_and_first_s=ref["compile_and_first_s"]), meshes={})
  for shape in meshes:
    r = run_mesh(base, data, model, tx, batch, shape, jax.devices(), args.timed_steps)
    out["meshes"][",".join(map(str, shape))] = dict(
        loss=float(r["metrics"]["loss"]),
        loss_diff=abs(float(r["metrics"]["loss"]) - float(ref["metrics"]["loss"])),
        init_diff=common.max_abs_diff(r["init"], ref["init"]),
        params_diff=common.max_abs_diff(r["state"].params, ref["state"].params),
        opt_diff=common.max_abs_diff(r["state"].opt_state, ref["state"].opt_state),
        router_bias_diff=common.max_abs_diff(r["state"].router_bias, ref["state"].router_bias),
        metrics_diff={k: abs(float(r["metrics"][k]) - float(ref["metrics"][k]))
                      for k in ref["metrics"]},
        init_report=r["init_report"], step_s=r["step_s"],
        compile_and_first_s=r["compile_and_first_s"])
    print(shape, out["meshes"][",".join(map(str, shape))], flush=True)
  common.emit(out)


if __name__ == "__main__":
  main()
