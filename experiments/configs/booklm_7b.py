"""BookLM-7B: the BookLM-720B design (experiments/configs/booklm_720b.py), scaled.

Same family: three-level Expert Forest with 128 light / 32 deep / 8 super experts
per MoE layer plus one shared expert, nominal tier mix light 0.6 / deep 0.3 /
super 0.1, MLA-3D with all three dimensions, 128K context via YaRN (factor 32 on
4096), vocabulary 131072, untied embeddings. Sizes:
  20 blocks of width 2048 (first 1 dense, SwiGLU 5632); MLA 16 heads, q_lora 768,
  kv_lora 256; light SwiGLU 192 (top-2), deep 2 x 192 (top-1), super 2048 (top-1),
  shared 192. 7.03B total, 12.5% activated under the nominal mix.

Arguments (big_vision style): vocab (0: the tokenizer's), layers.
"""
from bookjax import config_lib, presets

SIZE = dict(
    d_model=2048, num_layers=20, num_dense_layers=1, dense_d_ff=5632,
    heads=16, q_lora_rank=768, kv_lora_rank=256,
    light=dict(num_experts=128, d_ff=192, depth=1, top_k=2),
    deep=dict(num_experts=32, d_ff=192, depth=2, top_k=1),
    super=dict(num_experts=8, d_ff=2048, depth=1, top_k=1),
    shared_d_ff=192, glyph_heads=4, cultural_heads=4,
)


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, vocab=131072, layers=SIZE["num_layers"])
  return presets.booklm(SIZE, vocab=a.vocab, layers=a.layers)
