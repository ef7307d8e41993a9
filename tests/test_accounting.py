"""Accounting: abstract counts agree with materialised models, the forest's own
formulas, Hugging Face's DeepSeek-V3, and the family targets."""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bookjax import accounting, config_lib
from bookjax.model import forest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model_cfg(depth: int = 3, attention: str = "mla", dims: str = "", shared: int = 1,
                   ffn: str = "forest"):
  c = config_lib.default_config().model
  c.vocab_size = 50
  c.d_model = 16
  c.num_layers = 3
  c.num_dense_layers = 1
  c.tie_embeddings = depth != 2
  c.attention.kind = attention
  c.attention.num_heads = 2
  c.attention.head_dim = 8
  c.attention.q_lora_rank = 12
  c.attention.kv_lora_rank = 8
  c.attention.qk_nope_head_dim = 4
  c.attention.qk_rope_head_dim = 4
  c.attention.v_head_dim = 6
  c.attention.dims = dims
  c.ffn.kind = ffn
  c.ffn.d_ff = 24
  f = c.ffn.forest
  f.routing_depth = depth
  f.tiers = dict(light=dict(num_experts=4, d_ff=8, depth=1, top_k=2),
                 deep=dict(num_experts=2, d_ff=6, depth=2, top_k=1),
                 super=dict(num_experts=2, d_ff=20, depth=1, top_k=1))
  f.top_k = 3
  f.num_groups = 2 if depth == 1 else 1
  f.topk_groups = 1
  f.num_shared = shared
  f.shared_d_ff = 10
  f.nominal_tier_mix = dict(light=0.5, deep=0.3, super=0.2)
  config_lib.validate_model(c)
  return c


def glyph_features(vocab: int):
  return accounting.fake_glyph_features(vocab, num_components=30)


def test_abstract_counts_match_a_materialised_model():
  """A tiny BookLM-shaped model (depth-3 forest, MLA-3D with all dimensions), really
  initialised, counted leaf by leaf. (The DeepSeek-V3 shape is checked against a
  materialised transformers model in test_hf_interop.py.)"""
  cfg = tiny_model_cfg(3, "mla", "semantic,glyph,cultural")
  cfg.num_layers = 2
  cfg.ffn.forest.dispatch = "ragged_dot"   # creates the same params; compiles faster
  glyph = glyph_features(cfg.vocab_size)
  report = accounting.account(cfg, glyph=glyph, num_devices=1)
  model = accounting.build_model(cfg, glyph)
  # An 'rbg' key: XLA:CPU compiles ~100 threefry initialisers slowly (3x this test).
  variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), accounting._dummy_batch())  # pylint: disable=protected-access
  real = {c: 0 for c in accounting.COMPONENTS}
  for path, leaf, _ in accounting.param_leaves(variables):
    assert isinstance(leaf, jax.Array)   # really allocated
    real[accounting.classify(path)] += int(leaf.size)
  assert real == report.by_component
  assert report.total_params == accounting.count_params(variables) == sum(real.values())
  assert real["other"] == 0
  assert all(real[k] > 0 for k in ("embeddings", "attention", "attention_3d", "dense_ffn",
                                     "tier_light", "tier_deep", "tier_super", "routers",
                                     "shared_experts"))
  # The selection bias is state ('router_bias'), not a parameter.
  assert "router_bias" in variables
  assert report.total_params == accounting.count_params(variables["params"])


def _described(variables):
  flat = jax.tree_util.tree_flatten_with_path(
      variables, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]
  return [(jax.tree_util.keystr(p), getattr(x, "names", None), getattr(x, "value", x))
          for p, x in flat]


@pytest.mark.parametrize("dense,layers,ffn", [(1, 4, "forest"), (0, 3, "forest"),
                                              (2, 2, "forest"), (1, 3, "dense")])
def test_one_block_per_kind_equals_tracing_every_block(dense, layers, ffn):
  cfg = tiny_model_cfg(3, ffn=ffn)
  cfg.num_layers, cfg.num_dense_layers = layers, dense
  fast = accounting.abstract_variables(cfg)
  full = accounting.abstract_variables(cfg, dedupe_blocks=False)
  assert _described(fast) == _described(full)


def test_one_block_per_kind_on_a_family_config():
  cfg = _family_config("booklm_7b", "layers=5").model
  assert _described(accounting.abstract_variables(cfg)) == \
      _described(accounting.abstract_variables(cfg, dedupe_blocks=False))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forest_parts_agree_with_the_forest_spec_formulas(depth):
  cfg = tiny_model_cfg(depth)
  report = accounting.account(cfg, num_devices=1)
  moe_layers = cfg.num_layers - cfg.num_dense_layers
  f = cfg.ffn.forest
  routed = sum(report.by_component[f"tier_{t}"] for t in accounting.TIERS)
  layer_total = forest.total_params(f, cfg)
  assert routed + report.by_component["routers"] + report.by_component["shared_experts"] \
      == moe_layers * layer_total
  spec_act = forest.activated_params_per_token(f, cfg)
  always_outside = report.total_params - moe_layers * layer_total
  for k in ("nominal", "min", "max"):
    assert report.activated[k] == pytest.approx(always_outside + moe_layers * spec_act[k])
  assert report.activated["min"] <= report.activated["nominal"] <= report.activated["max"]


def test_dense_model_is_fully_activated_and_flops_formula():
  cfg = tiny_model_cfg(ffn="dense", attention="mha")
  r = accounting.account(cfg, num_devices=1, flops_seq_len=8)
  assert r.activated["nominal"] == r.total_params
  assert r.activated_fraction["nominal"] == 1.0
  # tied: the table is the output matmul; only norm scales are not matmul weights.
  norms = r.by_component["norms"]
  assert r.flops_detail["matmul_params"] == r.total_params - norms
  a = cfg.attention
  attn = 6 * cfg.num_layers * (8 + 1) / 2 * (2 * a.num_heads * a.head_dim)
  assert r.training_flops_per_token == pytest.approx(6 * (r.total_params - norms) + attn)


def test_per_device_memory_shards_by_logical_axes():
  cfg = tiny_model_cfg(1)
  one = accounting.account(cfg, num_devices=1)
  assert one.per_device_bytes["params"] == 4 * one.total_params      # float32
  assert one.per_device_bytes["optimizer"] == 8 * one.total_params   # AdamW mu, nu
  eight = accounting.account(cfg, num_devices=8, mesh=dict(data=1, fsdp=2, expert=4, tensor=1))
  assert eight.mesh == dict(data=1, fsdp=2, expert=4, tensor=1)
  assert one.per_device_bytes["params"] / 8 <= eight.per_device_bytes["params"] \
      < one.per_device_bytes["params"]
  data_only = accounting.account(cfg, num_devices=8, mesh=dict(data=-1, fsdp=1, expert=1,
                                                                tensor=1))
  assert data_only.per_device_bytes == one.per_device_bytes   # replicated
  assert accounting.parse_mesh("fsdp=32,expert=8") == dict(data=-1, fsdp=32, expert=8, tensor=1)
  with pytest.raises(ValueError, match="unknown mesh axis"):
    accounting.parse_mesh("fsdb=2")


# ---------------------------------------------------------------------------------
# Family configs (abstract only; each takes seconds)
# ---------------------------------------------------------------------------------

def _family_config(name: str, arg: str | None = None):
  import importlib  # pylint: disable=g-import-not-at-top
  mod = importlib.import_module(f"experiments.configs.{name}")
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def reports():
  cache = {}

  def get(name):
    if name not in cache:
      c = _family_config(name)
      config_lib.validate_model(c.model)
      cache[name] = accounting.account(c, name=name)
    return cache[name]
  return get


def test_booklm_720b_targets(reports):
  r = reports("booklm_720b")
  assert abs(r.total_params / 720e9 - 1) <= 0.01, r.total_params
  assert abs(r.activated_fraction["nominal"] - 0.027) <= 0.001, r.activated_fraction
  assert r.total_params == 719_059_185_664
  # three-level forest with 128 / 32 / 8 experts per MoE layer
  c = _family_config("booklm_720b").model
  assert c.ffn.forest.routing_depth == 3
  assert {t: i["num_experts"] for t, i in r.routed_per_layer.items() if t != "per_token"} \
      == dict(light=128, deep=32, super=8)
  assert sorted(c.attention.dims.split(",")) == ["cultural", "glyph", "semantic"]
  assert c.attention.yarn.original_max_len * c.attention.yarn.factor == 131072
  assert r.by_component["attention_3d"] > 0
  assert r.kv_cache_seq_len == 131072 and r.kv_cache_bytes_per_sequence > 0


@pytest.mark.parametrize("name,target", [("booklm_72b", 72e9), ("booklm_7b", 7e9)])
def test_smaller_family_members(reports, name, target):
  r = reports(name)
  assert abs(r.total_params / target - 1) <= 0.03, r.total_params
  big = _family_config("booklm_720b").model
  c = _family_config(name).model
  # the same architecture family
  assert c.ffn.forest.routing_depth == big.ffn.forest.routing_depth == 3
  assert {t: c.ffn.forest.tiers[t].num_experts for t in accounting.TIERS} \
      == dict(light=128, deep=32, super=8)
  assert c.attention.dims == big.attention.dims
  assert dict(c.ffn.forest.nominal_tier_mix) == dict(big.ffn.forest.nominal_tier_mix)
  assert c.attention.yarn.to_dict() == big.attention.yarn.to_dict()


def test_deepseek_v3_counts_match_the_published_shape(reports):
  r = reports("deepseek_v3")
  # Hugging Face's DeepseekV3ForCausalLM (no MTP module): 671B total, 37B activated.
  assert r.total_params == 671_026_404_352
  assert r.activated["nominal"] == r.activated["min"] == r.activated["max"] == 37_552_282_624
  assert r.moe_layers == 58
  # MLA cache: 512 latent + 64 RoPE key per layer, bf16, plus the int32 segment id.
  assert r.kv_cache_bytes_per_token == 61 * 576 * 2 + 4


def test_deepseek_v3_counts_equal_transformers_meta_model(reports):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  cfg = transformers.DeepseekV3Config()
  with torch.device("meta"):
    model = transformers.DeepseekV3ForCausalLM(cfg)
  total = sum(p.numel() for p in model.parameters())
  routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
  moe_layers = cfg.num_hidden_layers - cfg.first_k_dense_replace
  per_expert = routed // (moe_layers * cfg.n_routed_experts)
  activated = total - routed + moe_layers * cfg.num_experts_per_tok * per_expert
  r = reports("deepseek_v3")
  assert r.total_params == total
  assert r.activated["nominal"] == activated


def test_count_params_cli_writes_json(tmp_path):
  out = tmp_path / "ds3.json"
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "count_params.py"),
         f"--config={os.path.join(ROOT, 'experiments/configs/deepseek_v3.py')}:layers=4",
         "--num_devices=64", "--mesh=fsdp=8,expert=8", f"--json_out={out}"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  assert "total parameters" in res.stdout and "activated fraction" in res.stdout
  data = json.loads(out.read_text())
  cfg = _family_config("deepseek_v3", "layers=4")
  want = accounting.account(cfg, num_devices=64, mesh=accounting.parse_mesh("fsdp=8,expert=8"))
  assert data["total_params"] == want.total_params
  assert data["activated"]["nominal"] == want.activated["nominal"]
  assert data["mesh"] == dict(data=1, fsdp=8, expert=8, tensor=1)
  for key in ("by_component", "activated_fraction", "training_flops_per_token",
              "kv_cache_bytes_per_token", "kv_cache_bytes_per_sequence", "per_device_bytes"):
    assert key in data
