"""Ablation studies: run every point of a study file, evaluate, tabulate, plot.

A study file (experiments/configs/ablate_*.py) defines
  get_config(arg)  -> the base ConfigDict (and `config.study`, the study's name)
  sweep(add)       -> calls add(point=..., seed=..., **{"model.x.y": value, ...})
  metrics()        -> [(key, label), ...] of eval.json entries to tabulate;
                      keys are '/'-paths into eval.json, e.g. 'bpc/overall'.
Each (point, seed) trains in `outdir/<point>/seed<seed>`; finished points are
skipped, interrupted ones resume from their checkpoint.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Callable

import ml_collections
import numpy as np


@dataclasses.dataclass
class Point:
  point: str
  seed: int
  overrides: dict[str, Any]

  @property
  def run_name(self) -> str:
    return f"{self.point}/seed{self.seed}"


def load_study(path: str):
  """Imports a study file; `path` may carry an argument: 'file.py:quick'."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path}: study file not found")
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for fn in ("get_config", "sweep", "metrics"):
    if not hasattr(module, fn):
      raise ValueError(f"{path}: a study file must define {fn}()")
  return module, arg or None


def points_of(module) -> list[Point]:
  pts: list[Point] = []

  def add(point: str, seed: int = 0, **overrides):
    pts.append(Point(point, seed, overrides))

  module.sweep(add)
  names = [p.run_name for p in pts]
  if len(set(names)) != len(names):
    raise ValueError("study sweep(): duplicate (point, seed) pairs")
  return pts


def point_config(base: ml_collections.ConfigDict, p: Point) -> ml_collections.ConfigDict:
  """The base config with the point's dotted overrides and seed applied."""
  c = ml_collections.ConfigDict(base.to_dict())
  for key, value in p.overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for name in parents:
      if name not in node:
        raise ValueError(f"study override {key!r}: no field {name!r}")
      node = node[name]
    if leaf not in node:
      raise ValueError(f"study override {key!r}: no field {leaf!r}")
    node[leaf] = value
  c.seed = p.seed
  c.data.seed = p.seed
  return c


def lookup(tree: dict, key: str):
  node = tree
  for part in key.split("/"):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def enable_compilation_cache(path: str) -> None:
  """Persistent XLA cache: every seed of a point (same shapes) compiles once.

  Leaves a cache configured by the environment (JAX_COMPILATION_CACHE_DIR) alone."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def run_study(study_path: str, outdir: str, *, log: Callable[[str], None] = print,
              quick_eval: bool | None = None) -> dict:
  """Runs (or resumes) every point, then writes table.csv, table.md and a plot."""
  from bookjax import config_lib, evaluate, train  # pylint: disable=g-import-not-at-top
  module, arg = load_study(study_path)
  base = module.get_config(arg)
  pts = points_of(module)
  quick = bool(base.get("quick", False)) if quick_eval is None else quick_eval
  raw = base.to_dict()
  raw.pop("quick", None)
  raw.pop("study", None)
  study_cfg = ml_collections.ConfigDict(raw)
  for p in pts:  # validate everything before the first long run
    config_lib.validate(point_config(study_cfg, p))
  os.makedirs(outdir, exist_ok=True)
  enable_compilation_cache(os.path.join(outdir, "jax_cache"))
  t0 = time.time()
  for i, p in enumerate(pts):
    wd = os.path.join(outdir, p.point, f"seed{p.seed}")
    done = os.path.exists(os.path.join(wd, "eval.json"))
    elapsed = time.time() - t0
    eta = elapsed / max(i, 1) * (len(pts) - i) if i else float("nan")
    log(f"[{i + 1}/{len(pts)}] {p.run_name} {'(done, skipped)' if done else ''} "
        f"elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min")
    if done:
      continue
    t_point = time.time()
    summary = train.train_and_evaluate(point_config(study_cfg, p), wd)
    res = evaluate.evaluate_workdir(wd, quick=quick)
    # Wall time of this invocation (train + evaluation); a resumed point counts
    # only its last part.
    res["train"] = dict(tokens_per_sec=summary.get("tokens_per_sec"), step=summary["step"],
                        wall_min=(time.time() - t_point) / 60)
    with open(os.path.join(wd, "eval.json"), "w", encoding="utf-8") as f:
      json.dump(res, f, indent=2, ensure_ascii=False)
  log(f"study finished: {len(pts)} points, {(time.time() - t0) / 60:.1f} min in this run")
  return write_tables(outdir, pts, module.metrics(), title=base.get("study", "study"))


WALL_KEY = ("train/wall_min", "wall min / run")


def write_tables(outdir: str, pts: list[Point], metrics, title: str) -> dict:
  """Aggregates eval.json files: mean ± std over seeds per point.

  A wall-time column (minutes per run, train + evaluation) is added when the runs
  recorded it.
  """
  order = list(dict.fromkeys(p.point for p in pts))
  results = {}
  for p in pts:
    path = os.path.join(outdir, p.point, f"seed{p.seed}", "eval.json")
    with open(path, encoding="utf-8") as f:
      results[p.run_name] = json.load(f)
  metrics = list(metrics)
  if WALL_KEY[0] not in dict(metrics) and any(
      isinstance(lookup(r, WALL_KEY[0]), (int, float)) for r in results.values()):
    metrics.append(WALL_KEY)
  rows = []
  for name in order:
    vals: dict[str, list[float]] = {k: [] for k, _ in metrics}
    seeds = [p for p in pts if p.point == name]
    for p in seeds:
      res = results[p.run_name]
      for k, _ in metrics:
        v = lookup(res, k)
        if isinstance(v, (int, float)) and v is not None:
          vals[k].append(float(v))
    row = {"point": name, "seeds": len(seeds)}
    for k, _ in metrics:
      row[k + ":mean"] = float(np.mean(vals[k])) if vals[k] else float("nan")
      row[k + ":std"] = float(np.std(vals[k])) if vals[k] else float("nan")
    rows.append(row)
  with open(os.path.join(outdir, "table.csv"), "w", newline="", encoding="utf-8") as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  lines = [f"### {title}", "", "| point | seeds | " + " | ".join(l for _, l in metrics) + " |",
           "|---|---|" + "---|" * len(metrics)]
  for r in rows:
    cells = [f"{r[k + ':mean']:.4g} ± {r[k + ':std']:.2g}" for k, _ in metrics]
    lines.append(f"| {r['point']} | {r['seeds']} | " + " | ".join(cells) + " |")
  md = "\n".join(lines) + "\n"
  with open(os.path.join(outdir, "table.md"), "w", encoding="utf-8") as f:
    f.write(md)
  _plot(outdir, rows, metrics, title)
  return dict(rows=rows, markdown=md)


def _plot(outdir, rows, metrics, title) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  n = len(metrics)
  fig, axes = plt.subplots(1, n, figsize=(3.2 * n + 1, 3.2), squeeze=False)
  names = [r["point"] for r in rows]
  for ax, (k, label) in zip(axes[0], metrics):
    ax.bar(names, [r[k + ":mean"] for r in rows], yerr=[r[k + ":std"] for r in rows], capsize=3)
    ax.set_title(label, fontsize=9)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(os.path.join(outdir, "plot.png"), dpi=100)
  plt.close(fig)
