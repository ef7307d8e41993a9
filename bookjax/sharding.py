"""Device mesh and logical-axis rules.

Every parameter and main activation carries logical axis names (bookjax/model/
layers.py). `DEFAULT_RULES` maps them onto the mesh axes `data`, `fsdp`, `expert`,
`tensor`; the config may override single rules through `config.mesh_rules`.

Meshes are built with `AxisType.Auto` axes: jax 0.10's `make_mesh` defaults to
Explicit axes, under which linen's logical constraints raise.
"""
from __future__ import annotations

from typing import Iterable, Sequence

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
    ("registers", None),
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
