"""DeepSeek-V3 (671B total / 37B activated) as a bookjax flat-routing model.

The shape of Hugging Face's `DeepseekV3Config()` defaults (deepseek-ai/DeepSeek-V3,
without the multi-token-prediction module): 61 layers of width 7168, the first 3
with a dense SwiGLU of width 18432, the other 58 with 1 shared + 256 routed experts
of width 2048, top-8 with sigmoid scores, 8 groups / 4 kept, top-k normalisation,
route scale 2.5, aux-loss-free selection bias. MLA with 128 heads, q_lora 1536,
kv_lora 512, nope 128, rope 64, v 128, interleaved RoPE as in the checkpoints, YaRN
factor 40 on 4096 (163840 positions). Vocabulary 129280, untied embeddings.

`count_params` gives exactly the parameter counts of HF's DeepseekV3ForCausalLM
built from the same config (671,026,404,352 total; 37,552,282,624 activated).
Load real weights with `experiments/convert_hf.py`; this config is for accounting
and for converting (never materialise it on a CPU).

Arguments (big_vision style):
  layers      override the layer count (e.g. layers=4 for a smoke test of the shape)
  yarn        1: YaRN as in the release (factor 40); 0: plain RoPE
"""
from bookjax import config_lib


def get_config(arg: str | None = None):
  a = config_lib.parse_arg(arg, layers=61, yarn=True)
  c = config_lib.default_config()
  m = c.model
  m.vocab_size = 129280
  m.d_model = 7168
  m.num_layers = a.layers
  m.num_dense_layers = min(3, a.layers)
  m.tie_embeddings = False
  m.compute_dtype = "bfloat16"
  m.param_dtype = "float32"
  m.init_std = 0.006           # the paper's init std (HF's config says 0.02)
  m.rms_eps = 1e-6

  at = m.attention
  at.kind = "mla"
  at.num_heads = 128
  at.q_lora_rank = 1536
  at.kv_lora_rank = 512
  at.qk_nope_head_dim = 128
  at.qk_rope_head_dim = 64
  at.v_head_dim = 128
  at.rope_theta = 10000.0
  at.rope_interleave = True
  at.dims = ""
  at.impl = "blockwise"
  at.block_size = 512
  if a.yarn:
    at.yarn.factor = 40.0
    at.yarn.original_max_len = 4096
    at.yarn.beta_fast = 32.0
    at.yarn.beta_slow = 1.0
    at.yarn.mscale = 1.0
    at.yarn.mscale_all_dim = 1.0

  m.ffn.kind = "forest"
  m.ffn.d_ff = 18432
  f = m.ffn.forest
  f.routing_depth = 1
  f.tiers = dict(light=dict(num_experts=256, d_ff=2048, depth=1, top_k=8),
                 deep=dict(num_experts=0, d_ff=2048, depth=2, top_k=0),
                 super=dict(num_experts=0, d_ff=2048, depth=1, top_k=0))
  f.nominal_tier_mix = dict(light=1.0, deep=0.0, super=0.0)
  f.top_k = 8
  f.score_fn = "sigmoid"
  f.num_groups = 8
  f.topk_groups = 4
  f.norm_topk = True
  f.route_scale = 2.5
  f.num_shared = 1
  f.shared_d_ff = 2048
  f.bias_update_rate = 1e-3
  f.balance_loss_weight = 1e-4   # the paper's sequence-wise alpha
  f.z_loss_weight = 0.0
  f.compute_loss_weight = 0.0    # a single tier: nothing to balance across tiers

  c.data.seq_len = 4096
  c.mesh = dict(data=-1, fsdp=32, expert=8, tensor=1)   # >= 256 devices
  return c
