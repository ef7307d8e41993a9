"""Device mesh, logical-axis rules, validation and batch placement.

Every parameter and main activation carries logical axis names (bookjax/model/
layers.py). `DEFAULT_RULES` maps them onto the mesh axes `data`, `fsdp`, `expert`,
`tensor`; the config may override single rules through `config.mesh_rules`
(pairs `(logical, mesh axis | tuple of mesh axes | None)`). The mesh shape comes
from `config.mesh` (one axis may be -1: it takes the remaining devices).

Meshes are built with `AxisType.Auto` axes: jax 0.10's `make_mesh` defaults to
Explicit axes, under which linen's logical constraints raise. Linen applies
`nn.with_logical_constraint` only when a mesh is set (`jax.set_mesh`) and rules
are active (`nn.logical_axis_rules`); the trainer traces under both.

Scale-out in one paragraph: parameters are created already sharded (train.py:
shapes by `jax.eval_shape`, shardings from the logical axes, a jit init with
`out_shardings`); the batch is split over the `batch` axes (data, fsdp, expert);
Expert Forest experts are split over `expert` and tokens reach them by
all_to_all (bookjax/model/forest/expert_parallel.py); `validate` checks that all
of this fits before anything is compiled.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("q_latent", None),
    ("kv_latent", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("tiers", None),
    ("domains", None),
    ("glyph", None),
    ("glyph_components", None),
    ("glyph_radicals", None),
    ("glyph_strokes", None),
    ("glyph_heads", None),
    ("glyph_head_dim", None),
    ("semantic_heads", None),
    ("cultural_heads", None),
    ("registers", None),
    ("register_keys", None),
    ("buckets", None),
    ("layers", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Resolves the config's mesh sizes (one may be -1) against the device count."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"config.mesh.{a}: must be >= 1 or -1, got {s}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if num_devices % known:
    raise ValueError(f"config.mesh: axes {dict(zip(MESH_AXES, sizes))} (product {known}) do not "
                     f"divide the {num_devices} available devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(f"config.mesh: axes {dict(zip(MESH_AXES, sizes))} use {int(np.prod(sizes))} "
                     f"devices but {num_devices} are available")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over all (or the given) devices with Auto axes named MESH_AXES."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto)
  return jax.sharding.Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=auto)


def logical_rules(overrides: Iterable = ()) -> tuple[tuple[str, object], ...]:
  """DEFAULT_RULES with `overrides` ((logical, mesh axes) pairs) applied; validated."""
  rules = dict(DEFAULT_RULES)
  for item in overrides:
    logical, target = item
    rules[logical] = tuple(target) if isinstance(target, list) else target
  for logical, target in rules.items():
    targets = target if isinstance(target, tuple) else (target,)
    for t in targets:
      if t is not None and t not in MESH_AXES:
        raise ValueError(f"config.mesh_rules: logical axis {logical!r} maps to unknown mesh axis "
                         f"{t!r}; mesh axes are {MESH_AXES}")
  return tuple(rules.items())


def logical_to_shardings(abstract_tree, mesh, rules):
  """NamedShardings for a tree of (possibly nn.Partitioned-boxed) abstract values."""
  specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh, rules) -> jax.sharding.NamedSharding:
  """Sharding of [B, T] input arrays: batch over the data-parallel axes."""
  spec = nn.logical_to_mesh_axes(("batch", "length"), rules)
  return jax.sharding.NamedSharding(mesh, spec)


def mesh_axes_of(logical: str, rules) -> tuple[str, ...]:
  """The mesh axes a logical axis maps to under `rules` (() = replicated)."""
  target = dict(rules).get(logical)
  if target is None:
    return ()
  return tuple(target) if isinstance(target, (tuple, list)) else (target,)


def validate(config, num_devices: int | None = None) -> tuple[int, ...]:
  """Checks the mesh and rules against the devices and the model; compiles nothing.

  Raises ValueError naming the field when: the mesh does not divide the device
  count (or has two -1 axes), a rule names an unknown mesh axis, a forest tier's
  expert count is not divisible by the mesh axes `experts` maps to, the experts
  are split over an axis that does not split the tokens, or the batch does not
  split over the `batch` axes (or the processes). Returns the mesh shape.
  """
  num_devices = jax.device_count() if num_devices is None else num_devices
  shape = mesh_shape(config.mesh, num_devices)
  sizes = dict(zip(MESH_AXES, shape))
  rules = logical_rules(config.mesh_rules)
  batch_axes = mesh_axes_of("batch", rules)
  shards = math.prod(sizes[a] for a in batch_axes)
  bs = int(config.data.batch_size)
  if bs % shards:
    raise ValueError(f"config.data.batch_size: {bs} rows cannot be split over the {shards} "
                     f"batch shards (mesh axes {batch_axes} of {sizes})")
  if bs % jax.process_count():
    raise ValueError(f"config.data.batch_size: {bs} rows cannot be split over "
                     f"{jax.process_count()} processes")
  ffn = config.model.ffn
  if ffn.kind == "forest" and config.model.num_layers > config.model.num_dense_layers:
    from bookjax.model.forest import spec as spec_lib  # pylint: disable=g-import-not-at-top
    ep_axes = mesh_axes_of("experts", rules)
    ep = math.prod(sizes[a] for a in ep_axes)
    for s in spec_lib.tier_specs(ffn.forest):
      if s.num_experts % ep:
        raise ValueError(
            f"config.model.ffn.forest.tiers.{s.name}.num_experts: {s.num_experts} experts "
            f"cannot be split over the {ep} expert shards of mesh axes {ep_axes} "
            f"({sizes}); use a multiple of {ep} or a smaller mesh.expert")
    outside = [a for a in ep_axes if a not in batch_axes and sizes[a] > 1]
    if outside:
      raise ValueError(
          f"config.mesh_rules: 'experts' maps to mesh axes {ep_axes} but 'batch' maps to "
          f"{batch_axes}; expert parallelism needs the tokens split over {outside} too")
  return shape


def put_batch(batch: Mapping[str, Any], sharding: jax.sharding.NamedSharding) -> dict:
  """Places a host batch (the *global* batch, identical on every process) on the
  mesh; each process transfers only the rows its devices hold.

  Every process runs the same deterministic data pipeline (packing is sequential,
  so a process cannot skip the other processes' rows cheaply) and keeps its own
  rows: the global batch is the same as in a single-process run.
  """
  if jax.process_count() == 1:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = jax.make_array_from_callback(v.shape, sharding, lambda idx, v=v: v[idx])
  return out


def spec_table(boxed_variables, rules) -> list[tuple[str, tuple, jax.sharding.PartitionSpec]]:
  """(path, logical axes, PartitionSpec) of every annotated leaf, sorted by path.

  Paths look like `params/block_1/ffn/light/wi_gate`. For the golden table test.
  """
  rows = []
  flat = jax.tree_util.tree_flatten_with_path(
      boxed_variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  for path, leaf in flat:
    if not isinstance(leaf, nn.Partitioned):
      continue
    name = "/".join(str(getattr(p, "key", getattr(p, "idx", p))) for p in path)
    rows.append((name, tuple(leaf.names), nn.logical_to_mesh_axes(leaf.names, rules)))
  return sorted(rows)
