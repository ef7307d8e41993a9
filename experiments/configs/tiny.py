"""Tiny BookLM for CPU runs and tests: trains on the embedded corpus in minutes.

Usage: `--config=experiments/configs/tiny.py:steps=300,ffn=forest,attention=mla`.
String arguments (big_vision style):
  steps       training steps (default 500; 20 with runlocal)
  ffn         'dense' | 'forest'
  attention   'mha' | 'mla'
  dims        MLA-3D dimensions, '+'-separated (e.g. semantic+glyph+cultural)
  depth       Expert Forest routing depth (1, 2, 3)
  seq_len, batch, d_model, layers, seed
  runlocal    an even smaller model and few steps (smoke tests)
"""
from bookjax import presets


def get_config(arg: str | None = None):
  return presets.tiny(arg)
