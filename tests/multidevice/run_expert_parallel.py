"""The Expert Forest layer alone under expert parallelism, 8 emulated devices.

Dropless EP on several meshes (tensor > 1 included) vs. the single-device
`sorted` back-end: outputs, gradients (parameters and inputs), weighted losses and
router statistics. Capacity buffers: a tight factor drops copies (and counts
them), a loose one equals dropless.
Usage: python tests/multidevice/run_expert_parallel.py [--meshes 1,2,2,2:...]
  [--capacity tight,loose]; prints `RESULT {json}`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top

MESHES = ((2, 1, 4, 1), (1, 1, 4, 2), (1, 2, 2, 2), (1, 1, 8, 1))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--meshes", default=":".join(",".join(map(str, m)) for m in MESHES))
  ap.add_argument("--capacity", default="tight,loose")
  args = ap.parse_args()
  meshes = [tuple(int(v) for v in m.split(",")) for m in args.meshes.split(":") if m]
  factors = dict(tight=0.25, loose=100.0)
  common.init_devices(8)
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from bookjax import sharding, train  # pylint: disable=g-import-not-at-top
  from bookjax.model import forest  # pylint: disable=g-import-not-at-top

  base = common.test_config()
  b, t, d = 8, 32, base.model.d_model
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  dom = jnp.asarray(rng.integers(-1, 4, size=(b, t)), jnp.int32)
  seg = jnp.asarray(np.where(rng.random((b, t)) < 0.1, 0, 1), jnp.int32)  # some padding
  w_out = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)

  def make(dispatch="sorted", capacity_factor=1.25):
    c = ml_collections.ConfigDict(base.to_dict())
    c.model.ffn.forest.dispatch = dispatch
    c.model.ffn.forest.capacity_factor = capacity_factor
    return forest.ExpertForest(ml_collections.FrozenConfigDict(c.model.ffn.forest),
                               ml_collections.FrozenConfigDict(c.model))

  layer = make()
  boxed = jax.eval_shape(lambda r: layer.init(r, x, dom, seg), jax.random.PRNGKey(0))
  variables = train.strip_boxes(layer.init(jax.random.PRNGKey(1), x, dom, seg))
  params, bias = variables["params"], variables["router_bias"]

  def run(module, params, x):
    def loss(params, x):
      y, aux = module.apply({"params": params, "router_bias": bias}, x, dom, seg,
                            mutable=["losses", "router_stats"])
      total = jnp.sum(y * w_out) + sum(jnp.sum(v[0]) for v in aux["losses"].values())
      return total, (y, aux["router_stats"])
    (l, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return dict(loss=l, y=y, grads=grads, stats=stats)

  ref = common.to_numpy(jax.jit(lambda p, x: run(layer, p, x))(params, x))
  out = dict(dropless={}, capacity={})

  def on_mesh(module, shape):
    mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
    rules = sharding.logical_rules(())
    p_sh = sharding.logical_to_shardings(boxed, mesh, rules)["params"]
    x_sh = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(("batch", "length", "embed"),
                                                                     rules))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      p = jax.device_put(params, p_sh)
      xs = jax.device_put(x, x_sh)
      return common.to_numpy(jax.jit(lambda p, x: run(module, p, x))(p, xs))

  for shape in meshes:
    r = on_mesh(layer, shape)
    out["dropless"][",".join(map(str, shape))] = dict(
        loss=abs(float(r["loss"]) - float(ref["loss"])) / max(1.0, abs(float(ref["loss"]))),
        y=common.max_abs_diff(r["y"], ref["y"]),
        grads=common.max_abs_diff(r["grads"], ref["grads"]),
        stats=common.max_abs_diff(r["stats"], ref["stats"]))
    print(shape, out["dropless"][",".join(map(str, shape))], flush=True)
  for name in filter(None, args.capacity.split(",")):
    factor = factors[name]
    r = on_mesh(make("capacity", factor), (1, 1, 8, 1))
    st = r["stats"]
    out["capacity"][name] = dict(
        dropped=float(st["dropped_copies"][0]), routed=float(st["routed_copies"][0]),
        y_norm=float(np.linalg.norm(r["y"])), y_diff=common.max_abs_diff(r["y"], ref["y"]))
    print(name, out["capacity"][name], flush=True)
  common.emit(out)


if __name__ == "__main__":
  main()
