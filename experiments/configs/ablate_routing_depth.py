r"""Study: does deeper routing help? Dense FFN vs Expert Forest depth 1 / 2 / 3.

Every point has the same activated FFN width per token (128 units of SwiGLU width),
so the same activated FLOPs, and trains on the same tokens:
  dense    dense SwiGLU, d_ff = 128
  depth1   flat top-2 over 16 light experts of width 64 (DeepSeek-style routing)
  depth2   tier -> expert over light (8 x 64, top-2), deep (4 x 2 sub-layers of 64,
           top-1) and super (2 x 128, top-1): every tier costs 128 units, so a token's
           compute does not depend on the tier it is sent to
  depth3   domain -> tier -> expert over the same tiers
Run:  python experiments/ablate.py --config=experiments/configs/ablate_routing_depth.py \
        --outdir=workdirs/ablate_routing_depth
`:quick` shrinks the model, the steps and the evaluation (CI-sized).
"""
from bookjax import config_lib, presets

SEEDS = (0, 1)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, quick=False, steps=600)
  c = presets.tiny(f"runlocal,steps={min(a.steps, 12)}" if a.quick else f"steps={a.steps}")
  c.study = "routing depth (equal activated FFN width per token)"
  c.quick = a.quick
  c.model.ffn.d_ff = 128
  f = c.model.ffn.forest
  f.tiers.light.update(num_experts=8, d_ff=64, depth=1, top_k=2)
  f.tiers.deep.update(num_experts=4, d_ff=64, depth=2, top_k=1)
  f.tiers.super.update(num_experts=2, d_ff=128, depth=1, top_k=1)
  f.tier_top_k = 1
  f.top_k = 2
  return c


def sweep(add):
  flat_tiers = {"model.ffn.forest.tiers": dict(
      light=dict(num_experts=16, d_ff=64, depth=1, top_k=2),
      deep=dict(num_experts=0, d_ff=64, depth=2, top_k=0),
      super=dict(num_experts=0, d_ff=128, depth=1, top_k=0))}
  for seed in SEEDS:
    add(point="dense", seed=seed, **{"model.ffn.kind": "dense"})
    add(point="depth1", seed=seed, **{"model.ffn.kind": "forest",
                                      "model.ffn.forest.routing_depth": 1, **flat_tiers})
    add(point="depth2", seed=seed, **{"model.ffn.kind": "forest",
                                      "model.ffn.forest.routing_depth": 2})
    add(point="depth3", seed=seed, **{"model.ffn.kind": "forest",
                                      "model.ffn.forest.routing_depth": 3})


def metrics():
  return [("bpc/overall", "test bits/char"), ("bpc/rare", "rare-char bits/char"),
          ("bpc/poetry", "poetry bits/char"), ("poetry/accuracy", "poetry continuation acc"),
          ("train/tokens_per_sec", "train tokens/s")]
