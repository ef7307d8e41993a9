"""RoPE for MLA's decoupled slice, with YaRN context extension.

Layout. `apply_rope(..., interleave=False)` pairs dims (i, i + K/2) ("rotate-half",
HF Llama / HF DeepseekV3 with `rope_interleave=False`). With `interleave=True` the
input pairs are (2i, 2i+1), as in the original DeepSeek checkpoints and HF
DeepseekV3's default `rope_interleave=True`; the output is then written in the
rotate-half layout, exactly as HF's `apply_rotary_pos_emb_interleave` does, so
q·k is unchanged and the cached RoPE key has the same layout either way. A
checkpoint can therefore be loaded as is with `interleave=True`, or converted once
to `interleave=False` by permuting the RoPE output columns of `q_b_proj` (per
head) and of `kv_a_proj_with_mqa` (the last `qk_rope_head_dim` columns) with
`interleaved_to_half_permutation(K)`.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"), as in HF
transformers' `_compute_yarn_parameters` / `yarn_apply_mscale`. For RoPE width K
(d = 0 .. K/2-1), base θ, scale s = `factor`, original length L0:

  inv_freq_extra[d]  = θ^(-2d/K)                         (original frequencies)
  inv_freq_inter[d]  = θ^(-2d/K) / s                     (position interpolation)
  corr(n)            = K ln(L0 / (2π n)) / (2 ln θ)       (dim that turns n times in L0)
  lo = max(floor(corr(beta_fast)), 0),  hi = min(ceil(corr(beta_slow)), K-1)
  ramp[d]            = clip((d - lo) / (hi - lo), 0, 1)   (hi += 0.001 if hi == lo)
  inv_freq[d]        = inv_freq_inter[d] ramp[d] + inv_freq_extra[d] (1 - ramp[d])

  get_mscale(s, m)   = 0.1 m ln s + 1   (1 if s <= 1)
  attention_factor   = get_mscale(s, mscale) / get_mscale(s, mscale_all_dim)
                         if mscale and mscale_all_dim else get_mscale(s)
                       multiplies cos and sin (so q_rope·k_rope by its square);
  softmax scale      = (qk_nope + qk_rope)^-1/2 · get_mscale(s, mscale_all_dim)^2
                         (if mscale_all_dim), scaling the whole logit.

DeepSeek-V3 (s=40, mscale=mscale_all_dim=1): attention_factor = 1, softmax scale
× (0.1 ln 40 + 1)^2. Note: DeepSeek's own modelling code gives attention_factor
get_mscale(s, mscale) when mscale_all_dim = 0; HF (matched here) then uses
get_mscale(s, 1); the two agree whenever mscale = 1.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def yarn_enabled(yarn_cfg) -> bool:
  return float(yarn_cfg.factor) > 1.0


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
  """0.1 · mscale · ln(scale) + 1, or 1 when scale <= 1 (YaRN eq. 21)."""
  if scale <= 1:
    return 1.0
  return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_len: int) -> float:
  return (dim * math.log(max_len / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, factor: float, original_max_len: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  truncate: bool = True) -> np.ndarray:
  """YaRN inverse frequencies [dim/2] (float32), computed in float64."""
  pos = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  extra, inter = 1.0 / pos, 1.0 / (factor * pos)
  lo = _correction_dim(beta_fast, dim, base, original_max_len)
  hi = _correction_dim(beta_slow, dim, base, original_max_len)
  if truncate:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
  return (inter * ramp + extra * (1 - ramp)).astype(np.float32)


def rope_inv_freq(dim: int, theta: float, yarn_cfg=None) -> np.ndarray:
  """Inverse frequencies [dim/2]: plain RoPE, or YaRN when yarn_cfg.factor > 1."""
  if yarn_cfg is None or not yarn_enabled(yarn_cfg):
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))).astype(np.float32)
  return yarn_inv_freq(dim, theta, float(yarn_cfg.factor), int(yarn_cfg.original_max_len),
                       float(yarn_cfg.beta_fast), float(yarn_cfg.beta_slow),
                       bool(yarn_cfg.get("truncate", True)))


def yarn_attention_factor(yarn_cfg) -> float:
  """The cos/sin multiplier (HF `attention_factor`); 1 when YaRN is off."""
  if yarn_cfg is None or not yarn_enabled(yarn_cfg):
    return 1.0
  s, m, m_all = float(yarn_cfg.factor), float(yarn_cfg.mscale), float(yarn_cfg.mscale_all_dim)
  if m and m_all:
    return yarn_get_mscale(s, m) / yarn_get_mscale(s, m_all)
  return yarn_get_mscale(s)


def softmax_scale(qk_head_dim: int, yarn_cfg=None) -> float:
  """qk_head_dim^-1/2, times get_mscale(factor, mscale_all_dim)^2 under YaRN."""
  scale = qk_head_dim ** -0.5
  if yarn_cfg is not None and yarn_enabled(yarn_cfg) and float(yarn_cfg.mscale_all_dim):
    m = yarn_get_mscale(float(yarn_cfg.factor), float(yarn_cfg.mscale_all_dim))
    scale = scale * m * m
  return scale


def interleaved_to_half_permutation(dim: int) -> np.ndarray:
  """perm with x_half = x_interleaved[..., perm]: [0, 2, 4, ..., 1, 3, 5, ...]."""
  return np.concatenate([np.arange(0, dim, 2), np.arange(1, dim, 2)])


def apply_rope(x, positions, inv_freq, attention_factor: float = 1.0,
               interleave: bool = False):
  """Rotates the last axis of x by angles positions · inv_freq.

  x: [B, T, K] (shared key) or [B, T, H, K]; positions: [B, T] int;
  inv_freq: [K/2]. Output in rotate-half layout, computed in float32, cast back.
  """
  ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq, jnp.float32)
  cos, sin = jnp.cos(ang) * attention_factor, jnp.sin(ang) * attention_factor
  if x.ndim == 4:
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  x32 = x.astype(jnp.float32)
  if interleave:
    x1, x2 = x32[..., 0::2], x32[..., 1::2]
  else:
    x1, x2 = jnp.split(x32, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
