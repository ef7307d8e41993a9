"""Shared setup of the multi-device scripts in this folder.

The scripts run in their own process (pytest starts them, tests/test_sharding.py):
the number of emulated CPU devices must be fixed before JAX initialises its
backend, so `init_devices` is called before anything touches a device.
"""
from __future__ import annotations

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# The tiny forest + MLA-3D model. Every tier gets 8 experts so that the expert
# axis can be 1, 2, 4 or 8 (the default tiny tiers are 8 / 4 / 2).
TEST_ARG = "runlocal,ffn=forest,attention=mla,dims=semantic+glyph+cultural"
TIER_EXPERTS = 8


def init_devices(n: int) -> None:
  """n emulated CPU devices (before the backend starts); float32 matmuls exact."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_num_cpu_devices", n)


def test_config(mesh=(1, 1, 1, 1), arg: str = TEST_ARG):
  """The tiny test config on mesh (data, fsdp, expert, tensor)."""
  from bookjax import sharding  # pylint: disable=g-import-not-at-top
  from experiments.configs import tiny  # pylint: disable=g-import-not-at-top
  c = tiny.get_config(arg)
  for t in c.model.ffn.forest.tiers.keys():
    c.model.ffn.forest.tiers[t].num_experts = TIER_EXPERTS
  c.mesh = dict(zip(sharding.MESH_AXES, mesh))
  return c


def build(config):
  """(data bundle, config with vocab, model, optimizer) for `config`."""
  from bookjax import train  # pylint: disable=g-import-not-at-top
  data = train.build_data(config)
  config = train.with_vocab(config, data.tokenizer.vocab_size)
  model = train.build_model(config.model, data.glyph)
  return data, config, model, train.make_optimizer(config.train)


def to_numpy(tree):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb), (len(la), len(lb))
  return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             if np.size(x) else 0.0 for x, y in zip(la, lb))


def emit(result: dict) -> None:
  """Prints the result as the last stdout line (the test parses it)."""
  print("RESULT " + json.dumps(result), flush=True)
