r"""Study: which MLA-3D attention dimensions help? MHA, plain MLA, +semantic, +glyph,
+cultural, all three — dense FFN everywhere so only attention changes.

Run:  python experiments/ablate.py --config=experiments/configs/ablate_attention_dims.py \
        --outdir=workdirs/ablate_attention_dims
`:quick` shrinks the model, the steps and the evaluation (CI-sized).
"""
from bookjax import config_lib, presets

SEEDS = (0, 1)
POINTS = (
    ("mha", "mha", ""),
    ("mla", "mla", ""),
    ("mla+semantic", "mla", "semantic"),
    ("mla+glyph", "mla", "glyph"),
    ("mla+cultural", "mla", "cultural"),
    ("mla+all", "mla", "semantic,glyph,cultural"),
)


def get_config(arg=None):
  a = config_lib.parse_arg(arg, quick=False, steps=500)
  c = presets.tiny(f"runlocal,steps={min(a.steps, 12)}" if a.quick else f"steps={a.steps}")
  c.study = "attention dimensions (dense FFN)"
  c.quick = a.quick
  return c


def sweep(add):
  for seed in SEEDS:
    for name, kind, dims in POINTS:
      add(point=name, seed=seed, **{"model.attention.kind": kind, "model.attention.dims": dims})


def metrics():
  return [("bpc/overall", "test bits/char"), ("bpc/rare", "rare-char bits/char"),
          ("bpc/cantonese", "Cantonese bits/char"), ("poetry/accuracy", "poetry continuation acc"),
          ("train/tokens_per_sec", "train tokens/s")]
