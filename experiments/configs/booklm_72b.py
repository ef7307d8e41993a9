"""BookLM-72B: the BookLM-720B design (experiments/configs/booklm_720b.py), scaled.

Same family: three-level Expert Forest with 128 light / 32 deep / 8 super experts
per MoE layer plus one shared expert, nominal tier mix light 0.6 / deep 0.3 /
super 0.1, MLA-3D with all three dimensions, 128K context via YaRN (factor 32 on
4096), vocabulary 131072, untied embeddings. Sizes:
  40 blocks of width 4096 (first 2 dense, SwiGLU 11264); MLA 32 heads, q_lora 1024,
  kv_lora 512; light SwiGLU 512 (top-2), deep 2 x 512 (top-1), super 6144 (top-1),
  shared 512. 71.94B total, 5.29% activated under the nominal mix.

Arguments (big_vision style): vocab (0: the tokenizer's), layers.
"""
from bookjax import config_lib, presets

SIZE = dict(
    d_model=4096, num_layers=40, num_dense_layers=2, dense_d_ff=11264,
    heads=32, q_lora_rank=1024, kv_lora_rank=512,
    light=dict(num_experts=128, d_ff=512, depth=1, top_k=2),
    deep=dict(num_experts=32, d_ff=512, depth=2, top_k=1),
    super=dict(num_experts=8, d_ff=6144, depth=1, top_k=1),
    shared_d_ff=512, glyph_heads=8, cultural_heads=8,
)


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, vocab=131072, layers=SIZE["num_layers"])
  return presets.booklm(SIZE, vocab=a.vocab, layers=a.layers)
