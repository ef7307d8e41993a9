"""Both ablation studies end to end in `quick` mode: table files with the right rows
and columns, a plot, and resumption that skips finished points."""
import csv
import os

import pytest

from bookjax import ablation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES = {
    "ablate_routing_depth": ["dense", "depth1", "depth2", "depth3"],
    "ablate_attention_dims": ["mha", "mla", "mla+semantic", "mla+glyph", "mla+cultural",
                              "mla+all"],
}


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_quick_study_writes_tables(tmp_path, study):
  path = os.path.join(ROOT, "experiments", "configs", f"{study}.py")
  module, _ = ablation.load_study(path + ":quick")
  res = ablation.run_study(path + ":quick", str(tmp_path))
  with open(tmp_path / "table.csv") as f:
    rows = list(csv.DictReader(f))
  assert [r["point"] for r in rows] == STUDIES[study]
  for key, _ in module.metrics():
    assert f"{key}:mean" in rows[0] and f"{key}:std" in rows[0]
  for r in rows:
    assert r["seeds"] == "2"
    assert 0.0 < float(r["bpc/overall:mean"]) < 20.0
    assert float(r["train/wall_min:mean"]) > 0.0      # recorded per run, added as a column
  md = (tmp_path / "table.md").read_text()
  assert all(f"| {p} |" in md for p in STUDIES[study])
  assert (tmp_path / "plot.png").stat().st_size > 1000
  # A second run finds every point finished and only re-tabulates.
  logs = []
  ablation.run_study(path + ":quick", str(tmp_path), log=logs.append)
  points = [line for line in logs if line.startswith("[")]
  assert len(points) == 2 * len(STUDIES[study]) and all("skipped" in l for l in points)
  assert logs[-1].startswith("study finished")


def test_bad_override_is_named():
  base = ablation.load_study(os.path.join(ROOT, "experiments", "configs",
                                          "ablate_routing_depth.py:quick"))[0].get_config("quick")
  with pytest.raises(ValueError, match="model.ffn.nope"):
    ablation.point_config(base, ablation.Point("x", 0, {"model.ffn.nope": 1}))


def test_tier_gate_study_points_validate():
  """The follow-up study loads, and each point is a valid unit-gate depth-2/3 forest
  on the routing-depth study's base config."""
  from bookjax import config_lib
  path = os.path.join(ROOT, "experiments", "configs", "ablate_tier_gate.py")
  module, arg = ablation.load_study(path)
  base = module.get_config(arg)
  pts = ablation.points_of(module)
  assert [p.run_name for p in pts] == ["depth2_unit/seed0", "depth3_unit/seed0",
                                       "depth2_unit/seed1", "depth3_unit/seed1"]
  for p in pts:
    c = ablation.point_config(base, p)
    config_lib.validate(c)
    assert c.model.ffn.forest.tier_gate == "unit" and c.train.steps == 600
