"""Small building blocks shared by every block: dtypes, parameters with logical axes,
RMSNorm, RoPE, SwiGLU.

Every parameter is created through `param_with_axes`, which attaches logical axis
names (see bookjax/sharding.py for the rules that map them onto mesh axes). Names
used across the model:

  batch, length, embed, heads, head_dim, q_latent, kv_latent, mlp, vocab,
  experts, tiers, domains, glyph, registers, buckets, layers
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_of(name: str):
  """Maps a config dtype name ('float32' | 'bfloat16') to a jnp dtype."""
  return DTYPES[name]


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int],
                    axes: Sequence[str | None], dtype=jnp.float32):
  """Creates a parameter annotated with logical axis names (one per dimension)."""
  if len(axes) != len(shape):
    raise ValueError(f"{name}: {len(axes)} axis names for shape {tuple(shape)}")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)),
                      tuple(shape), dtype)


def constrain(x, axes: Sequence[str | None]):
  """Logical sharding constraint on an activation (a no-op without a mesh)."""
  return nn.with_logical_constraint(x, tuple(axes))


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32."""
  eps: float = 1e-6
  axis_name: str = "embed"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    scale = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],),
                            (self.axis_name,), dtype_of(self.param_dtype))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def rope_frequencies(dim: int, theta: float) -> jnp.ndarray:
  """Inverse frequencies [dim/2] of standard RoPE."""
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))


def apply_rope(x_BTHK, positions_BT, inv_freq_K2, attention_scale: float = 1.0):
  """Rotates the last axis of x by angles positions * inv_freq.

  Pairs are (x[..., :K/2], x[..., K/2:]) ("rotate-half" layout, as in HF Llama /
  DeepSeek-V3). `attention_scale` multiplies cos/sin (YaRN's mscale).
  x_BTHK: [B, T, H, K]; positions_BT: [B, T] int; inv_freq_K2: [K/2].
  """
  ang_BTK2 = positions_BT[..., None].astype(jnp.float32) * inv_freq_K2
  cos = (jnp.cos(ang_BTK2) * attention_scale)[:, :, None, :]
  sin = (jnp.sin(ang_BTK2) * attention_scale)[:, :, None, :]
  x32 = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTHK.dtype)


class DenseGeneral(nn.Module):
  """y = x @ W over the last axis of x, W annotated with logical axes.

  features: output shape (int or tuple); axes: logical names of W's dims
  (input dim first, then one per output dim).
  """
  features: int | tuple[int, ...]
  axes: tuple[str | None, ...]
  init_std: float = 0.02
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  use_bias: bool = False

  @nn.compact
  def __call__(self, x):
    feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    w = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std),
                        (x.shape[-1],) + feats, self.axes, dtype_of(self.param_dtype))
    dt = dtype_of(self.compute_dtype)
    y = jnp.tensordot(x.astype(dt), w.astype(dt), axes=((x.ndim - 1,), (0,)))
    if self.use_bias:
      b = param_with_axes(self, "bias", nn.initializers.zeros, feats, self.axes[1:],
                          dtype_of(self.param_dtype))
      y = y + b.astype(dt)
    return y


class SwiGLU(nn.Module):
  """Dense SwiGLU feed-forward: down(silu(x W_gate) * (x W_up)).

  x: [..., D] -> [..., D]. Used for dense layers and shared experts.
  """
  d_ff: int
  init_std: float = 0.02
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  mlp_axis: str = "mlp"

  @nn.compact
  def __call__(self, x_BTD):
    d = x_BTD.shape[-1]
    kw = dict(init_std=self.init_std, compute_dtype=self.compute_dtype,
              param_dtype=self.param_dtype)
    gate = DenseGeneral(self.d_ff, ("embed", self.mlp_axis), name="wi_gate", **kw)(x_BTD)
    up = DenseGeneral(self.d_ff, ("embed", self.mlp_axis), name="wi_up", **kw)(x_BTD)
    h = nn.silu(gate) * up
    h = constrain(h, ("batch", "length", self.mlp_axis)) if h.ndim == 3 else h
    return DenseGeneral(d, (self.mlp_axis, "embed"), name="wo", **kw)(h)
