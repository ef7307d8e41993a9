"""BookLM-720B: the full model of the BookLM description (count it, never build it).

Architecture (the BookLM family; 7B / 72B are the same design, scaled):
  * 62 pre-RMSNorm blocks of width 7168; the first 3 use a dense SwiGLU (18432),
    the other 59 an Expert Forest with three-level routing (domain -> tier ->
    expert, 3 domains) over three tiers per MoE layer:
      light  128 experts, SwiGLU 2048 wide,               top-2 per visit
      deep    32 experts, 2 SwiGLU sub-layers 2560 wide,  top-1 per visit
      super    8 experts, SwiGLU 16384 wide,              top-1 per visit
    plus 1 always-on shared expert (2048). A token visits one tier.
  * Nominal tier mix (expected share of tokens per tier): light 0.6, deep 0.3,
    super 0.1. Under it: 719.1B total, 19.4B activated per token (2.70%).
  * MLA-3D attention: 64 heads, q_lora 1536, kv_lora 512, nope 128, rope 64, v 128,
    with all three dimensions: semantic (sentence-distance bias, every head),
    glyph (8 heads), cultural (8 registers, 8 heads).
  * 128K context: YaRN factor 32 on an original 4096 (131072 positions).
  * Vocabulary 131072 (CJK characters + byte fallback), untied embeddings.

Figures: `python experiments/count_params.py --config=experiments/configs/booklm_720b.py`.

Arguments (big_vision style):
  vocab     vocabulary size (0: take the tokenizer's at train time); default 131072
  layers    override the number of blocks (smoke tests of the shape)
"""
from bookjax import config_lib

SIZE = dict(
    d_model=7168, num_layers=62, num_dense_layers=3, dense_d_ff=18432,
    heads=64, q_lora_rank=1536, kv_lora_rank=512,
    light=dict(num_experts=128, d_ff=2048, depth=1, top_k=2),
    deep=dict(num_experts=32, d_ff=2560, depth=2, top_k=1),
    super=dict(num_experts=8, d_ff=16384, depth=1, top_k=1),
    shared_d_ff=2048, glyph_heads=8, cultural_heads=8,
)


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, vocab=131072, layers=SIZE["num_layers"])
  return build(SIZE, vocab=a.vocab, layers=a.layers)


def build(s: dict, vocab: int, layers: int):
  """The BookLM family config for the size table `s`."""
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
