"""DeepSeek-V3 interop: transformers checkpoints imported into bookjax give the same
logits and greedy continuations; export -> re-import is exact; refusals are clear.

Tests that need torch / transformers skip cleanly without the `hf` extra.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from bookjax import accounting, config_lib, hf_interop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=16,
            q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=16, qk_nope_head_dim=8, n_group=4,
            topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1,
            initializer_range=0.2, model_type="deepseek_v3",
            architectures=["DeepseekV3ForCausalLM"])

CASES = {
    # q_lora, 4 groups / 2 kept, 1 dense layer first, interleaved RoPE (HF default)
    "q_lora_groups4of2": dict(),
    # no q_lora (direct q_proj), no groups, rotate-half RoPE, 2 dense layers of 4,
    # tied embeddings
    "no_q_lora_flat_dense2_tied": dict(q_lora_rank=None, n_group=1, topk_group=1,
                                       rope_interleave=False, num_hidden_layers=4,
                                       first_k_dense_replace=2, tie_word_embeddings=True),
    # YaRN with mscale (softmax scale), 8 groups of 2 / 3 kept, top-3, every layer
    # MoE, 2 shared experts, no top-k normalisation
    "yarn_groups8of3_top3": dict(
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=4,
                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
        max_position_embeddings=32, n_routed_experts=16, n_group=8, topk_group=3,
        num_experts_per_tok=3, first_k_dense_replace=0, n_shared_experts=2,
        norm_topk_prob=False),
}


def hf_model(torch, transformers, **overrides):
  kw = {k: v for k, v in TINY.items() if k not in ("model_type", "architectures")}
  kw.update(overrides)
  cfg = transformers.DeepseekV3Config(**kw)
  torch.manual_seed(0)
  model = transformers.DeepseekV3ForCausalLM(cfg).eval()
  with torch.no_grad():   # a non-zero selection bias, so its path is exercised
    for name, buf in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
  return model


@pytest.fixture(scope="module")
def hf():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  return torch, transformers


@pytest.fixture(scope="module")
def saved(hf, tmp_path_factory):
  """name -> (torch model, checkpoint dir saved by transformers)."""
  torch, transformers = hf
  out = {}
  for name, overrides in CASES.items():
    model = hf_model(torch, transformers, **overrides)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path)
    out[name] = (model, path)
  return out


def tree_equal(a, b) -> bool:
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  return ta == tb and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


# ---------------------------------------------------------------------------------
# Same numbers as transformers
# ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CASES))
def test_logits_and_greedy_continuation_match_transformers(hf, saved, name):
  torch, _ = hf
  model, path = saved[name]
  imp = hf_interop.import_checkpoint(path)
  # (1, 22): the shape of the greedy buffer below, so both share one compile.
  tokens = np.random.RandomState(0).randint(0, TINY["vocab_size"], (1, 22))
  with torch.no_grad():
    ref = model(torch.tensor(tokens)).logits.numpy()
  ours = hf_interop.bookjax_logits(imp.config, imp.variables(), tokens)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)

  prompt = [int(t) for t in tokens[0, :6]]
  seq = list(prompt)
  with torch.no_grad():
    for _ in range(16):
      seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
  assert hf_interop.greedy_continuation(imp.config, imp.variables(), prompt, 16) == seq[6:]


def test_accounting_equals_the_materialised_transformers_model(hf, saved):
  """The DeepSeek-V3 shape: abstract counts = torch's count = the imported tree."""
  for name, (model, path) in saved.items():
    imp = hf_interop.import_checkpoint(path)
    r = accounting.account(imp.config, num_devices=1)
    tied = TINY | CASES[name]
    total = sum(p.numel() for p in model.parameters())
    if tied.get("tie_word_embeddings"):   # imported untied: one more [V, D] table
      total += tied["vocab_size"] * tied["hidden_size"]
    assert r.total_params == total == accounting.count_params(imp.params)
    routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    layers, first = tied["num_hidden_layers"], tied["first_k_dense_replace"]
    per_expert = routed // ((layers - first) * tied["n_routed_experts"])
    want = total - routed + (layers - first) * tied["num_experts_per_tok"] * per_expert
    assert r.activated["nominal"] == want


# ---------------------------------------------------------------------------------
# Layouts, round trips, fp8
# ---------------------------------------------------------------------------------

def test_fused_and_per_expert_layouts_import_identically(hf, saved, tmp_path):
  torch, _ = hf
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  model, path = saved["q_lora_groups4of2"]
  names = hf_interop.CheckpointReader(path).names
  assert "model.layers.1.mlp.experts.0.gate_proj.weight" in names   # transformers' saved layout
  fused = str(tmp_path / "fused")
  os.makedirs(fused)
  shutil.copy(os.path.join(path, "config.json"), fused)
  state = {k: v.contiguous() for k, v in model.state_dict().items()}
  assert "model.layers.1.mlp.experts.gate_up_proj" in state          # in-memory fused layout
  save_file(state, os.path.join(fused, "model.safetensors"), metadata={"format": "pt"})
  a = hf_interop.import_checkpoint(path)
  b = hf_interop.import_checkpoint(fused)
  assert tree_equal(a.variables(), b.variables())


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_export_reimport_round_trips_exactly(hf, saved, tmp_path, layout):
  torch, transformers = hf
  model, path = saved["yarn_groups8of3_top3"]
  imp = hf_interop.import_checkpoint(path)
  out = str(tmp_path / layout)
  files = hf_interop.export_checkpoint(imp.config, imp.params, imp.router_bias, out,
                                       expert_layout=layout, max_shard_bytes=40_000)
  assert "model.safetensors.index.json" in files   # sharded
  again = hf_interop.import_checkpoint(out)
  assert tree_equal(imp.variables(), again.variables())
  assert again.config.model.to_dict() == imp.config.model.to_dict()
  # transformers loads the export into exactly the original weights.
  reloaded = transformers.DeepseekV3ForCausalLM.from_pretrained(out).eval()
  original = transformers.DeepseekV3ForCausalLM.from_pretrained(path).eval()
  sa, sb = reloaded.state_dict(), original.state_dict()
  assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
  tokens = torch.tensor(np.random.RandomState(1).randint(0, 64, (1, 10)))
  with torch.no_grad():
    np.testing.assert_allclose(reloaded(tokens).logits.numpy(), model(tokens).logits.numpy(),
                               atol=1e-5, rtol=0)
  if layout == "per_expert":   # tensor for tensor, bit for bit, the original file
    src, dst = hf_interop.CheckpointReader(path), hf_interop.CheckpointReader(out)
    assert src.names == dst.names
    for n in src.names:
      np.testing.assert_array_equal(src.get(n, dtype=None), dst.get(n, dtype=None))


def test_fp8_block_quantised_weights_are_dequantised(hf, saved, tmp_path):
  torch, _ = hf
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  _, path = saved["q_lora_groups4of2"]
  q_dir, ref_dir = str(tmp_path / "fp8"), str(tmp_path / "dequantised")
  cfg = hf_interop.read_hf_config(path)
  os.makedirs(q_dir)
  os.makedirs(ref_dir)
  json.dump(cfg, open(os.path.join(ref_dir, "config.json"), "w"))
  cfg["quantization_config"] = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                    weight_block_size=[8, 8])
  json.dump(cfg, open(os.path.join(q_dir, "config.json"), "w"))
  quant, deq = {}, {}
  with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
    for k in f.keys():
      w = f.get_tensor(k)
      if w.ndim == 2 and k.endswith("proj.weight"):
        o, i = w.shape
        bo, bi = -(-o // 8), -(-i // 8)
        pad = torch.zeros(bo * 8, bi * 8)
        pad[:o, :i] = w
        scale = pad.view(bo, 8, bi, 8).abs().amax(dim=(1, 3)) / 448.0
        full = scale.repeat_interleave(8, 0).repeat_interleave(8, 1)[:o, :i]
        q = (w / full).to(torch.float8_e4m3fn)
        quant[k], quant[k + "_scale_inv"] = q, scale
        deq[k] = q.float() * full
      else:
        quant[k] = deq[k] = w
  save_file(quant, os.path.join(q_dir, "model.safetensors"), metadata={"format": "pt"})
  save_file(deq, os.path.join(ref_dir, "model.safetensors"), metadata={"format": "pt"})
  a = hf_interop.import_checkpoint(q_dir)
  b = hf_interop.import_checkpoint(ref_dir)
  assert any("fp8" in n for n in a.notes)
  assert tree_equal(a.variables(), b.variables())


# ---------------------------------------------------------------------------------
# Without torch: config mapping, refusals, bookjax-born round trips
# ---------------------------------------------------------------------------------

def test_config_mapping():
  c = hf_interop.config_from_hf(dict(TINY, rope_scaling=dict(
      type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
      mscale=1.0, mscale_all_dim=1.0), max_position_embeddings=163840))
  m = c.model
  f = m.ffn.forest
  assert (m.d_model, m.num_layers, m.num_dense_layers, m.ffn.d_ff) == (32, 3, 1, 48)
  assert (f.routing_depth, f.top_k, f.num_groups, f.topk_groups) == (1, 2, 4, 2)
  assert (f.score_fn, f.norm_topk, f.route_scale) == ("sigmoid", True, 2.5)
  assert (f.num_shared, f.shared_d_ff, f.tiers.light.num_experts, f.tiers.light.d_ff) \
      == (1, 16, 8, 16)
  a = m.attention
  assert (a.kind, a.q_lora_rank, a.kv_lora_rank, a.qk_nope_head_dim, a.qk_rope_head_dim,
          a.v_head_dim, a.rope_interleave) == ("mla", 24, 16, 8, 8, 16, True)
  assert (a.yarn.factor, a.yarn.original_max_len, a.yarn.mscale_all_dim) == (40.0, 4096, 1.0)
  assert not m.tie_embeddings
  hf_cfg = hf_interop.config_to_hf(m)
  back = hf_interop.config_from_hf(hf_cfg)
  assert back.model.to_dict() == m.to_dict()
  # the repo's DeepSeek-V3 config is the HF default config
  from experiments.configs import deepseek_v3  # pylint: disable=g-import-not-at-top
  ours = hf_interop.config_to_hf(deepseek_v3.get_config().model)
  for k, v in hf_interop.HF_DEFAULTS.items():
    if k not in ("max_position_embeddings", "num_key_value_heads", "initializer_range"):
      assert ours[k] == v, k
  assert ours["rope_scaling"]["factor"] == 40.0 and ours["max_position_embeddings"] == 163840


@pytest.mark.parametrize("field,value,match", [
    ("hidden_act", "gelu", "silu"),
    ("attention_bias", True, "biases"),
    ("num_key_value_heads", 2, "num_attention_heads"),
    ("scoring_func", "softmax", "sigmoid"),
    ("topk_method", "greedy", "noaux_tc"),
    ("n_group", 3, "divide"),
    ("rope_scaling", dict(type="linear", factor=2.0), "yarn"),
    ("rms_norm_eps", 1e-5, "latent norms"),
    ("model_type", "deepseek_v2", "deepseek_v3"),
    ("quantization_config", dict(quant_method="gptq"), "fp8"),
    ("moe_layer_freq", 2, "MoE"),
])
def test_refuses_what_bookjax_cannot_represent(field, value, match):
  with pytest.raises(hf_interop.UnsupportedCheckpointError, match=match) as e:
    hf_interop.config_from_hf(dict(TINY, **{field: value}))
  assert field in str(e.value)


def test_refuses_k1_with_norm_topk():
  with pytest.raises(hf_interop.UnsupportedCheckpointError, match="norm_topk_prob"):
    hf_interop.config_from_hf(dict(TINY, num_experts_per_tok=1, n_group=1, topk_group=1))
  c = hf_interop.config_from_hf(dict(TINY, num_experts_per_tok=1, n_group=1, topk_group=1,
                                     norm_topk_prob=False))
  assert c.model.ffn.forest.top_k == 1


def random_bookjax_model(seed: int = 0):
  """A DeepSeek-V3-shaped bookjax model with random params (and bias), no torch."""
  config = hf_interop.config_from_hf(TINY)
  shapes = hf_interop.expected_shapes(config.model)
  rng = np.random.RandomState(seed)
  trees = {"params": {}, "router_bias": {}}
  for (coll, path), shape in shapes.items():
    hf_interop._set(trees[coll], path, rng.normal(size=shape).astype(np.float32))  # pylint: disable=protected-access
  return config, trees["params"], trees["router_bias"]


def test_bookjax_born_model_round_trips_and_refusals_on_export(tmp_path):
  config, params, bias = random_bookjax_model()
  out = str(tmp_path / "hf")
  hf_interop.export_checkpoint(config, params, bias, out, expert_layout="fused")
  imp = hf_interop.import_checkpoint(out)
  assert tree_equal(imp.params, params) and tree_equal(imp.router_bias, bias)
  # bfloat16 export keeps the router in float32 (as HF does)
  out16 = str(tmp_path / "hf16")
  hf_interop.export_checkpoint(config, params, bias, out16, dtype="bfloat16")
  r = hf_interop.CheckpointReader(out16)
  assert r._meta("model.layers.1.mlp.gate.weight")["dtype"] == "F32"  # pylint: disable=protected-access
  assert r._meta("model.layers.1.mlp.experts.3.up_proj.weight")["dtype"] == "BF16"  # pylint: disable=protected-access
  # BookLM shapes have no DeepSeek-V3 counterpart
  bad = config_lib.default_config()
  bad.model.attention.kind = "mla"
  bad.model.ffn.kind = "forest"
  with pytest.raises(hf_interop.UnsupportedCheckpointError, match="routing_depth"):
    hf_interop.config_to_hf(bad)
  bad.model.attention.dims = "glyph"
  with pytest.raises(hf_interop.UnsupportedCheckpointError, match="dims"):
    hf_interop.config_to_hf(bad)


def test_mtp_layers_skipped_unknown_tensors_refused(tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config, params, bias = random_bookjax_model()
  out = str(tmp_path / "hf")
  hf_interop.export_checkpoint(config, params, bias, out)
  save_file({"model.layers.3.eh_proj.weight": np.zeros((4, 4), np.float32)},
            os.path.join(out, "mtp.safetensors"), metadata={"format": "pt"})
  imp = hf_interop.import_checkpoint(out)
  assert any("multi-token" in n for n in imp.notes)
  save_file({"model.layers.0.self_attn.o_proj.bias": np.zeros((32,), np.float32)},
            os.path.join(out, "extra.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf_interop.UnsupportedCheckpointError, match="o_proj.bias"):
    hf_interop.import_checkpoint(out)
  assert hf_interop.import_checkpoint(out, strict=False).notes


def test_lazy_loading_hands_over_one_tensor_at_a_time(tmp_path):
  config, params, bias = random_bookjax_model()
  out = str(tmp_path / "hf")
  hf_interop.export_checkpoint(config, params, bias, out)
  seen = []
  imp = hf_interop.import_checkpoint(out, on_tensor=lambda c, p, x: seen.append(p) or x.shape)
  assert len(seen) == len(jax.tree.leaves(params)) + len(jax.tree.leaves(bias))
  assert jax.tree.leaves(imp.params)[0] == jax.tree.leaves(jax.tree.map(np.shape, params))[0]


def test_save_load_bookjax_and_export_from_it(tmp_path):
  config, params, bias = random_bookjax_model()
  d = str(tmp_path / "bj")
  hf_interop.save_bookjax(d, config, params, bias)
  c2, p2, b2 = hf_interop.load_bookjax(d)
  assert tree_equal(jax.tree.map(np.asarray, p2), params)
  assert tree_equal(jax.tree.map(np.asarray, b2), bias)
  out = str(tmp_path / "hf")
  hf_interop.export_checkpoint(c2, p2, b2, out)
  assert tree_equal(hf_interop.import_checkpoint(out).params, params)


def test_export_from_a_training_workdir(tmp_path):
  """convert_hf --mode=export reads a trainer workdir (config.json + orbax checkpoints)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from bookjax import train  # pylint: disable=g-import-not-at-top
  config, params, bias = random_bookjax_model()
  workdir = str(tmp_path / "wd")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  p = jax.tree.map(jnp.asarray, params)
  tx = train.make_optimizer(config.train)
  state = train.TrainState(step=jnp.array(3, jnp.int32), params=p, opt_state=tx.init(p),
                           router_bias=jax.tree.map(jnp.asarray, bias))
  train.save_checkpoint(train.make_checkpoint_manager(workdir, config.train), state, {"pos": 0})
  out = str(tmp_path / "hf")
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "convert_hf.py"), "--mode=export",
         f"--bookjax_dir={workdir}", f"--out={out}", "--expert_layout=fused"]
  res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-3000:]
  imp = hf_interop.import_checkpoint(out)
  assert tree_equal(imp.params, params) and tree_equal(imp.router_bias, bias)
