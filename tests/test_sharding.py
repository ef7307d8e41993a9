"""Sharding: rules table, golden parameter specs, validation, and (in subprocesses
with 8 emulated CPU devices) mesh equivalence, expert parallelism, multi-process
runs and restore onto other meshes. The subprocess scripts live in
tests/multidevice/ and print `RESULT {json}` as their last line.

Regenerate the golden table after an intended rule change with
`UPDATE_GOLDEN=1 pytest tests/test_sharding.py -k golden` and review the diff.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from bookjax import sharding, train
from bookjax.model import layers
from experiments.configs import tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden", "tiny_forest_mla_sharding.txt")
TINY_ARG = "runlocal,ffn=forest,attention=mla,dims=semantic+glyph+cultural"
TOL = 1e-5


# ---------------------------------------------------------------------------------
# In-process: rules, golden table, validation
# ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
  c = tiny.get_config(TINY_ARG)
  data = train.build_data(c)
  c = train.with_vocab(c, data.tokenizer.vocab_size)
  return c, train.build_model(c.model, data.glyph)


def _boxed(config, model):
  batch = train.dummy_batch(1, 8)
  return jax.eval_shape(lambda r: model.init(r, batch), jax.random.PRNGKey(0))


def _golden_text(config, model) -> str:
  rules = sharding.logical_rules(config.mesh_rules)
  lines = ["# tiny forest + MLA-3D (experiments/configs/tiny.py:" + TINY_ARG + "),",
           "# default rules (bookjax/sharding.py DEFAULT_RULES).",
           "# path | logical axes | PartitionSpec"]
  for path, names, spec in sharding.spec_table(_boxed(config, model), rules):
    lines.append(f"{path} | {', '.join(map(str, names))} | {spec}")
  return "\n".join(lines) + "\n"


def test_golden_sharding_table(tiny_model):
  text = _golden_text(*tiny_model)
  if os.environ.get("UPDATE_GOLDEN"):
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      f.write(text)
  with open(GOLDEN) as f:
    golden = f.read()
  assert text == golden, (
      "parameter shardings changed; if intended, rerun with UPDATE_GOLDEN=1 and review "
      "the diff of tests/golden/tiny_forest_mla_sharding.txt")


def test_every_logical_axis_has_a_rule(tiny_model, monkeypatch):
  """Parameters and constrained activations only use names in the rules table, so
  no axis is replicated silently for want of a rule."""
  config, model = tiny_model
  known = {name for name, _ in sharding.DEFAULT_RULES}
  seen = set()
  real = layers.constrain

  def spy(x, axes):
    seen.update(a for a in axes if a is not None)
    return real(x, axes)

  monkeypatch.setattr(layers, "constrain", spy)
  boxed = _boxed(config, model)
  for _, names, _ in sharding.spec_table(boxed, sharding.DEFAULT_RULES):
    seen.update(n for n in names if n is not None)
  assert {"batch", "length", "embed", "vocab", "heads", "kv_latent", "experts"} <= seen
  assert seen <= known, f"logical axes without a rule: {sorted(seen - known)}"


def test_rules_map_main_parameters():
  rules = sharding.logical_rules(())
  spec = lambda *names: nn.logical_to_mesh_axes(names, rules)
  P = jax.sharding.PartitionSpec
  assert spec("experts", "layers", "embed", "mlp") == P("expert", None, "fsdp", "tensor")
  # activations: batch takes fsdp first, so embed stays unsharded
  assert spec("batch", "length", "embed") == P(("data", "fsdp", "expert"), None, None)
  assert spec("vocab", "embed") == P("tensor", "fsdp")
  over = sharding.logical_rules([("kv_latent", "tensor"), ("batch", ["data", "fsdp"])])
  assert dict(over)["kv_latent"] == "tensor" and dict(over)["batch"] == ("data", "fsdp")


def test_linen_constraints_apply_under_set_mesh():
  """nn.with_logical_constraint is silently a no-op without a mesh; under
  jax.set_mesh + logical rules (how the trainer traces) it emits the constraint."""
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, expert=1, tensor=1), jax.devices()[:1])
  rules = sharding.logical_rules(())
  f = lambda x: layers.constrain(x * 2, ("batch", "length", "embed"))
  x = np.zeros((2, 3, 4), np.float32)
  with nn.logical_axis_rules(rules):
    assert "sharding_constraint" not in str(jax.make_jaxpr(f)(x))
    with jax.set_mesh(mesh):
      assert "sharding_constraint" in str(jax.make_jaxpr(f)(x))
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_shape_absorbs_remaining_devices():
  assert sharding.mesh_shape(dict(data=-1, fsdp=2, expert=2, tensor=1), 8) == (2, 2, 2, 1)
  assert sharding.mesh_shape(dict(data=1, fsdp=1, expert=-1, tensor=1), 8) == (1, 1, 8, 1)


def _cfg(mesh, tiers=(8, 8, 8), **kw):
  c = tiny.get_config(TINY_ARG)
  for t, n in zip(("light", "deep", "super"), tiers):
    c.model.ffn.forest.tiers[t].num_experts = n
  c.mesh = dict(zip(sharding.MESH_AXES, mesh))
  for k, v in kw.items():
    c[k] = v
  return c


@pytest.mark.parametrize("mesh,tiers,rules,match", [
    ((3, 1, 1, 1), (8, 8, 8), (), r"config\.mesh: .*do not divide the 8 available devices"),
    ((2, 2, 4, 1), (8, 8, 8), (), r"config\.mesh: .*\(product 16\) do not divide the 8"),
    ((1, 1, 2, 1), (8, 8, 8), (), r"config\.mesh: .*use 2 devices but 8 are available"),
    ((-1, 1, -1, 1), (8, 8, 8), (), r"config\.mesh: at most one axis may be -1"),
    ((1, 1, 8, 1), (8, 4, 2), (),
     r"config\.model\.ffn\.forest\.tiers\.deep\.num_experts: 4 experts cannot be split over "
     r"the 8 expert shards"),
    ((2, 1, 4, 1), (8, 8, 6), (), r"tiers\.super\.num_experts: 6 experts"),
    ((8, 1, 1, 1), (8, 8, 8), (("mlp", "model"),),
     r"config\.mesh_rules: logical axis 'mlp' maps to unknown mesh axis 'model'"),
    ((8, 1, 1, 1), (8, 8, 8), (("experts", ("expert", "modle")),), r"unknown mesh axis 'modle'"),
    ((1, 1, 4, 2), (8, 8, 8), (("experts", "tensor"),),
     r"config\.mesh_rules: 'experts' maps to mesh axes \('tensor',\).*tokens split"),
])
def test_validation_raises_clear_errors(mesh, tiers, rules, match):
  c = _cfg(mesh, tiers, mesh_rules=rules)
  with pytest.raises(ValueError, match=match):
    sharding.validate(c, num_devices=8)


def test_validation_batch_split():
  c = _cfg((1, 1, 8, 1))
  c.data.batch_size = 4
  with pytest.raises(ValueError, match=r"config\.data\.batch_size: 4 rows cannot be split"):
    sharding.validate(c, num_devices=8)
  assert sharding.validate(_cfg((2, 2, 2, 1)), num_devices=8) == (2, 2, 2, 1)


def test_trainer_validates_before_compiling(tmp_path):
  """train_and_evaluate raises the mesh error first (nothing built or compiled)."""
  c = _cfg((1, 1, 1, 1), tiers=(8, 4, 2))
  c.mesh.data = 3   # 1 device here
  with pytest.raises(ValueError, match=r"config\.mesh: .*do not divide the 1 available"):
    train.train_and_evaluate(c, str(tmp_path))
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------
# Subprocesses with emulated devices
# ---------------------------------------------------------------------------------

def _run(script, *args, timeout=1200):
  """Runs tests/multidevice/<script>; returns its RESULT json."""
  env = dict(os.environ)
  # Cheaper XLA:CPU codegen: compile time dominates these tests, numbers unchanged
  # in kind (every run in a test uses the same flags).
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # Reruns skip XLA compilation (keyed on the program, so a code change recompiles).
  env.setdefault("JAX_COMPILATION_CACHE_DIR",
                 os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache"))
  r = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "multidevice", script),
                      *map(str, args)], capture_output=True, text=True, cwd=ROOT, env=env,
                     timeout=timeout)
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  assert r.returncode == 0 and lines, (r.stdout[-3000:], r.stderr[-6000:])
  return json.loads(lines[-1][len("RESULT "):])


def _check_equivalence(result):
  for mesh, r in result["meshes"].items():
    assert r["loss_diff"] < TOL, (mesh, r)
    assert r["init_diff"] == 0.0, (mesh, r)   # sharded init draws the same numbers
    assert r["params_moved"] > 1e-4, (mesh, r)  # the compared step did update params
    for key in ("params_diff", "opt_diff", "router_bias_diff", "loss2_diff"):
      assert r[key] < TOL, (mesh, key, r[key])
    worst = {k: v for k, v in r["metrics_diff"].items() if v > TOL * max(1.0, abs(r["metrics"][k]))}
    assert not worst, (mesh, worst)
    rep = r["init_report"]
    assert not rep["bad"], (mesh, rep["bad"][:5])
    if mesh != "8,1,1,1":  # data-only mesh: parameters are replicated
      assert rep["sharded_leaves"] > 0, (mesh, rep)


@pytest.mark.multidevice
def test_mesh_equivalence_2x2x2():
  """One mesh using data, fsdp and expert axes at once (the fast default)."""
  _check_equivalence(_run("run_mesh_equivalence.py", "--meshes", "2,2,2,1"))


def _check_forest_layer(r):
  for mesh, d in r["dropless"].items():
    for k, v in d.items():
      assert v < TOL, (mesh, k, v)
  cap = r["capacity"]
  if "tight" in cap:
    assert 0 < cap["tight"]["dropped"] <= cap["tight"]["routed"], cap
    assert np.isfinite(cap["tight"]["y_norm"]) and cap["tight"]["y_norm"] > 0, cap
  if "loose" in cap:
    assert cap["loose"]["dropped"] == 0 and cap["loose"]["y_diff"] < TOL, cap


@pytest.mark.multidevice
def test_expert_parallel_forest_layer():
  """The forest layer alone: dropless EP on fsdp x expert x tensor == one device
  (outputs, gradients, losses, router statistics); tight capacity buffers drop
  copies and count them."""
  _check_forest_layer(_run("run_expert_parallel.py", "--meshes", "1,2,2,2",
                           "--capacity", "tight"))


@pytest.mark.slow
@pytest.mark.multidevice
def test_expert_parallel_forest_layer_all_meshes():
  r = _run("run_expert_parallel.py")
  assert len(r["dropless"]) == 4 and set(r["capacity"]) == {"tight", "loose"}
  _check_forest_layer(r)


@pytest.mark.slow
@pytest.mark.multidevice
def test_mesh_equivalence_all_meshes():
  """(8,1,1,1), (2,1,4,1), (1,2,4,1), (2,2,2,1), (1,1,8,1) vs one device."""
  r = _run("run_mesh_equivalence.py")
  assert set(r["meshes"]) == {"8,1,1,1", "2,1,4,1", "1,2,4,1", "2,2,2,1", "1,1,8,1"}
  _check_equivalence(r)


@pytest.mark.slow
@pytest.mark.multidevice
def test_two_processes_match_one(tmp_path):
  r = _run("run_multiprocess.py", tmp_path)
  assert r["single_rc"] == 0 and r["multi_rc"] == 0, r
  single = {int(k): v for k, v in r["single"].items()}
  multi = {int(k): v for k, v in r["multi"].items()}
  assert sorted(single) == sorted(multi) == [1, 2, 3], r
  for s in single:
    assert abs(single[s] - multi[s]) < TOL, (s, single[s], multi[s])
  assert r["multi_checkpoints"] == ["3"], r
  # only process 0 wrote metrics: one row per step
  assert r["multi_rows_per_step"] == 1, r


@pytest.mark.slow
@pytest.mark.multidevice
def test_restore_onto_other_meshes(tmp_path):
  r = _run("run_restore.py", tmp_path)
  for name in ("save", "2dev", "1dev"):
    assert r[f"{name}_rc"] == 0, r.get(f"{name}_tail", r)
  full = {int(k): v for k, v in r["full"].items()}
  for name in ("2dev", "1dev"):
    resumed = {int(k): v for k, v in r[name].items()}
    for s in (3, 4):
      assert abs(resumed[s] - full[s]) < TOL, (name, s, resumed[s], full[s])
