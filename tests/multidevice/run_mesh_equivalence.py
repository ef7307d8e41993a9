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
  """Checks every leaf after the sharded init: each device holds exactly its shard
  of the sharding the rules gave (for a sharded leaf: never the full array)."""
  import jax  # pylint: disable=g-import-not-at-top
  bad, sharded = [], 0
  leaves = jax.tree_util.tree_flatten_with_path(state)[0]
  for path, leaf in leaves:
    expected = leaf.sharding.shard_shape(leaf.shape)
    shapes = {tuple(s.data.shape) for s in leaf.addressable_shards}
    sharded += expected != tuple(leaf.shape)
    if shapes != {expected}:
      bad.append(f"{jax.tree_util.keystr(path)}: shards {sorted(shapes)}, expected {expected}, "
                 f"full {leaf.shape}, spec {leaf.sharding.spec}")
  return dict(bad=bad, sharded_leaves=sharded, leaves=len(leaves))


def run_mesh(base, model, tx, batches, mesh_shape, devices, steps_timed: int):
  """Sharded init + two train steps (the first has learning rate 0 under warmup,
  so the second is the one that moves the parameters)."""
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
    puts = [sharding.put_batch(b, sharding.batch_sharding(mesh, rules)) for b in batches]
    state, metrics1 = step(state, puts[0])
    state, metrics2 = step(state, puts[1])
    metrics1, metrics2 = common.to_numpy(metrics1), common.to_numpy(metrics2)
    t1 = time.perf_counter()
    final = common.to_numpy(state)
    times = []
    for _ in range(steps_timed):
      ts = time.perf_counter()
      state, m = step(state, puts[0])
      jax.block_until_ready(m)
      times.append(time.perf_counter() - ts)
  return dict(state=final, init=init_state, metrics=metrics1, metrics2=metrics2,
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
  batches = [next(data.train_iter), next(data.train_iter)]
  ref = run_mesh(base, model, tx, batches, (1, 1, 1, 1), jax.devices()[:1], args.timed_steps)
  loss = lambda r, m="metrics": float(r[m]["loss"])
  out = dict(reference=dict(loss=loss(ref), loss2=loss(ref, "metrics2"), step_s=ref["step_s"],
                            compile_and_first_s=ref["compile_and_first_s"]), meshes={})
  for shape in meshes:
    r = run_mesh(base, model, tx, batches, shape, jax.devices(), args.timed_steps)
    name = ",".join(map(str, shape))
    out["meshes"][name] = dict(
        loss=loss(r), loss_diff=abs(loss(r) - loss(ref)),
        loss2_diff=abs(loss(r, "metrics2") - loss(ref, "metrics2")),
        init_diff=common.max_abs_diff(r["init"], ref["init"]),
        params_diff=common.max_abs_diff(r["state"].params, ref["state"].params),
        params_moved=common.max_abs_diff(r["state"].params, r["init"].params),
        opt_diff=common.max_abs_diff(r["state"].opt_state, ref["state"].opt_state),
        router_bias_diff=common.max_abs_diff(r["state"].router_bias, ref["state"].router_bias),
        metrics={k: float(v) for k, v in ref["metrics2"].items()},
        metrics_diff={k: max(abs(float(r[m][k]) - float(ref[m][k]))
                             for m in ("metrics", "metrics2")) for k in ref["metrics"]},
        init_report=r["init_report"], step_s=r["step_s"],
        compile_and_first_s=r["compile_and_first_s"])
    print(name, {k: v for k, v in out["meshes"][name].items()
                 if k not in ("metrics", "metrics_diff")}, flush=True)
  common.emit(out)


if __name__ == "__main__":
  main()
