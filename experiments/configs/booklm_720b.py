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
from bookjax import config_lib, presets

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
  return presets.booklm(SIZE, vocab=a.vocab, layers=a.layers)
