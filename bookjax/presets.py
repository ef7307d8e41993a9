"""Config builders shared by the files in experiments/configs/.

Config files are loaded by path (`--config=experiments/configs/tiny.py:arg`), so the
builders they share live here, importable from anywhere: `tiny(arg)` for CPU runs
and tests, `booklm(size, vocab, layers)` for the BookLM family.
"""
from bookjax import config_lib


def tiny(arg: str | None = None):
  """The tiny CPU config (experiments/configs/tiny.py documents its arguments)."""
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


def booklm(s: dict, vocab: int, layers: int):
  """The BookLM family config (see experiments/configs/booklm_720b.py) for the size
  table `s` (d_model, num_layers, heads, tier sizes, ...)."""
  c = config_lib.default_config()
  m = c.model
  m.vocab_size = vocab
  m.d_model = s["d_model"]
  m.num_layers = layers
  m.num_dense_layers = min(s["num_dense_layers"], layers)
  m.tie_embeddings = False
  m.compute_dtype = "bfloat16"
  m.param_dtype = "float32"
  m.init_std = 0.006

  at = m.attention
  at.kind = "mla"
  at.impl = "blockwise"
  at.block_size = 512
  at.num_heads = s["heads"]
  at.q_lora_rank = s["q_lora_rank"]
  at.kv_lora_rank = s["kv_lora_rank"]
  at.qk_nope_head_dim = 128
  at.qk_rope_head_dim = 64
  at.v_head_dim = 128
  at.rope_theta = 10000.0
  at.dims = "semantic,glyph,cultural"
  at.semantic.num_buckets = 16
  at.semantic.num_heads = 0              # every head
  at.semantic.max_distance = 64
  at.glyph.num_heads = s["glyph_heads"]
  at.glyph.head_dim = 64
  at.glyph.embed_dim = 256
  at.cultural.num_registers = 8
  at.cultural.num_heads = s["cultural_heads"]
  at.yarn.factor = 32.0                  # 4096 * 32 = 131072 positions
  at.yarn.original_max_len = 4096
  at.yarn.beta_fast = 32.0
  at.yarn.beta_slow = 1.0
  at.yarn.mscale = 1.0
  at.yarn.mscale_all_dim = 1.0

  m.ffn.kind = "forest"
  m.ffn.d_ff = s["dense_d_ff"]
  f = m.ffn.forest
  f.routing_depth = 3
  f.num_domains = 3                      # basic / professional / innovative
  f.tiers = dict(light=dict(s["light"]), deep=dict(s["deep"]), super=dict(s["super"]))
  f.tier_top_k = 1
  f.nominal_tier_mix = dict(light=0.6, deep=0.3, super=0.1)
  f.num_shared = 1
  f.shared_d_ff = s["shared_d_ff"]
  f.score_fn = "sigmoid"
  f.norm_topk = True
  f.route_scale = 1.0

  c.data.seq_len = 4096
  c.mesh = dict(data=-1, fsdp=32, expert=8, tensor=1)   # >= 256 devices
  return c
