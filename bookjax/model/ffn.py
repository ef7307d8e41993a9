"""Feed-forward factory: a dense SwiGLU or the routed Expert Forest, by config.

Contract of an FFN module: `__call__(x_BTD, domain_BT, segment_ids_BT) -> y_BTD`.
Routed FFNs additionally sow auxiliary losses into the 'losses' collection and
router statistics into 'router_stats' (see bookjax/model/forest.py).
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from bookjax.model import layers

FFN_KINDS = ("dense", "forest")


class DenseFFN(nn.Module):
  """Dense SwiGLU FFN with the routed-FFN call signature."""
  d_ff: int
  model_cfg: Any

  @nn.compact
  def __call__(self, x_BTD, domain_BT=None, segment_ids_BT=None):
    m = self.model_cfg
    return layers.SwiGLU(self.d_ff, init_std=m.init_std, compute_dtype=m.compute_dtype,
                         param_dtype=m.param_dtype, name="mlp")(x_BTD)


def make_ffn(cfg, model_cfg, layer_index: int, name: str = "ffn") -> nn.Module:
  """Dense for the first `num_dense_layers` blocks (or everywhere if kind='dense')."""
  if cfg.kind == "dense" or layer_index < model_cfg.num_dense_layers:
    return DenseFFN(cfg.d_ff, model_cfg, name=name)
  if cfg.kind == "forest":
    from bookjax.model import forest  # pylint: disable=g-import-not-at-top
    return forest.ExpertForest(cfg.forest, model_cfg, name=name)
  raise ValueError(f"unknown ffn kind {cfg.kind!r}")


def validate_config(cfg, model_cfg, prefix: str = "model.ffn") -> None:
  if cfg.kind not in FFN_KINDS:
    raise ValueError(f"config.{prefix}.kind: must be one of {FFN_KINDS}, got {cfg.kind!r}")
  if cfg.d_ff < 1:
    raise ValueError(f"config.{prefix}.d_ff: must be >= 1, got {cfg.d_ff}")
  if cfg.kind == "forest":
    from bookjax.model import forest  # pylint: disable=g-import-not-at-top
    forest.validate_config(cfg.forest, model_cfg, f"{prefix}.forest")
