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
from bookjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, steps=-1, ffn="dense", attention="mha", dims="", depth=3,
                           seq_len=128, batch=16, d_model=128, layers=4, seed=0,
                           runlocal=False)
  c = config_lib.default_config()
  c.seed = a.seed
  c.data.seed = a.seed
  c.data.seq_len = a.seq_len
  c.data.batch_size = a.batch
  c.model.d_model = a.d_model
  c.model.num_layers = a.layers
  c.model.ffn.kind = a.ffn
  c.model.ffn.forest.routing_depth = a.depth
  c.model.attention.kind = a.attention
  c.model.attention.dims = a.dims.replace("+", ",")
  steps = a.steps if a.steps > 0 else (20 if a.runlocal else 500)
  c.train.steps = steps
  c.train.warmup_steps = min(50, steps // 10)
  c.train.eval_every = max(1, min(200, steps))
  c.train.checkpoint_every = max(1, min(100, steps))
  if a.runlocal:
    c.data.seq_len = 64
    c.data.batch_size = 8
    c.data.max_docs_per_domain = 300
    c.model.d_model = 32
    c.model.num_layers = 2
    c.model.ffn.d_ff = 64
    c.train.lr = 1e-2
    c.train.warmup_steps = 2
    c.train.log_every = 5
    c.train.eval_every = c.train.steps
    c.train.eval_batches = 2
    c.train.checkpoint_every = 10
  return c
