"""Smoke runs of the benchmark binaries at --quick size (slow: `pytest -m slow`).

Benchmarks report speed and are not timed here; these runs check that every row
the binaries promise is produced and written as JSON.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module: str, tmp_path, *flags):
  out = tmp_path / f"{module.rsplit('.', 1)[-1]}.json"
  subprocess.run([sys.executable, "-m", module, "--quick", f"--json_out={out}", *flags],
                 cwd=ROOT, check=True, capture_output=True, text=True, timeout=1200)
  return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_moe_quick_rows(tmp_path):
  rows = _run("experiments.bench_moe", tmp_path)
  layer = [r for r in rows if "method" in r]
  assert {r["method"] for r in layer} == {"ideal", "sorted", "capacity", "ragged_dot", "dense"}
  assert all(r["min_s"] > 0 and r["vs_ideal"] > 0 for r in layer)
  train = [r for r in rows if r.get("table") == "train_compare"]
  assert [r["model"] for r in train] == ["dense", "depth1", "depth2", "depth3"]
  assert train[0]["vs_dense"] == 1.0 and all(r["tokens_per_sec"] > 0 for r in train)


@pytest.mark.slow
def test_bench_attention_quick_rows(tmp_path):
  rows = _run("experiments.bench_attention", tmp_path)
  assert {r["table"] for r in rows} == {"cache", "decode", "fwd_bwd", "targets"}
