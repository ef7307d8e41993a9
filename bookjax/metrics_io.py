"""Metric output: one JSON line per logged step, TensorBoard events, progress lines.

TensorBoard events are written with tensorboardX, which needs no TensorFlow.
"""
from __future__ import annotations

import json
import os
import time
from typing import Mapping


class MetricsWriter:
  """Appends `{"step": n, ...}` lines to `workdir/metrics.jsonl` and TB scalars."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row) + "\n")
    self._jsonl.flush()
    for k, v in metrics.items():
      self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  """All rows of `workdir/metrics.jsonl` (empty list if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


class Throughput:
  """Tokens/s and ETA from wall time, excluding the first (compiling) step."""

  def __init__(self, tokens_per_step: int, total_steps: int, start_step: int):
    self.tokens_per_step = tokens_per_step
    self.total_steps = total_steps
    self._t0 = None
    self._s0 = start_step
    self._last = start_step

  def tick(self, step: int) -> None:
    if self._t0 is None:  # first step includes compilation: start the clock after it
      self._t0, self._s0 = time.perf_counter(), step
    self._last = step

  def rates(self) -> dict[str, float]:
    if self._t0 is None or self._last <= self._s0:
      return {}
    dt = time.perf_counter() - self._t0
    steps = self._last - self._s0
    sps = steps / max(dt, 1e-9)
    return dict(tokens_per_sec=sps * self.tokens_per_step, steps_per_sec=sps,
                eta_sec=(self.total_steps - self._last) / max(sps, 1e-9))


def progress_line(step: int, total: int, m: Mapping[str, float]) -> str:
  parts = [f"step {step}/{total}", f"loss {m.get('loss', float('nan')):.4f}",
           f"bpc {m.get('bits_per_char', float('nan')):.3f}"]
  if "tokens_per_sec" in m:
    parts.append(f"{m['tokens_per_sec']:.0f} tok/s")
    parts.append(f"ETA {m['eta_sec'] / 60:.1f} min")
  return " | ".join(parts)
