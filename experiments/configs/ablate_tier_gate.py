r"""Study: does the tier factor in the gate hold deeper routing back?

Follow-up of ablate_routing_depth.py, whose depth-2/3 forests write only 0.25-0.8 of a
unit gate into the residual stream: with tier_gate='prob' a visited tier's experts
are scaled by p_tier. Here the same depth-2/3 forests use tier_gate='unit'
(p_tier / stop_gradient(p_tier): value 1, gradient of p_tier). Same model, steps,
tokens and seeds as the routing-depth study, so its rows compare directly.
Run:  python experiments/ablate.py --config=experiments/configs/ablate_tier_gate.py \
        --outdir=workdirs/ablate_tier_gate
"""
import os

from bookjax import ablation

# Loaded by path, as the runner loads study files (`experiments` need not be importable).
base_study, _ = ablation.load_study(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "ablate_routing_depth.py"))

SEEDS = base_study.SEEDS


def get_config(arg=None):
  c = base_study.get_config(arg)
  c.study = "tier gate at routing depth 2 / 3 (unit vs p_tier)"
  c.model.ffn.kind = "forest"
  c.model.ffn.forest.tier_gate = "unit"
  return c


def sweep(add):
  for seed in SEEDS:
    for depth in (2, 3):
      add(point=f"depth{depth}_unit", seed=seed, **{"model.ffn.forest.routing_depth": depth})


def metrics():
  return base_study.metrics()
