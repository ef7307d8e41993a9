r"""Runs an ablation study and writes table.md / table.csv / plot.png.

  python experiments/ablate.py --config=experiments/configs/ablate_routing_depth.py \
      --outdir=workdirs/ablate_routing_depth
  # quick CI-sized version:
  python experiments/ablate.py --config=experiments/configs/ablate_routing_depth.py:quick ...
"""
from absl import app, flags, logging

_CONFIG = flags.DEFINE_string("config", None, "Study file (path[:arg]).")
_OUTDIR = flags.DEFINE_string("outdir", None, "Output directory of the study.")
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # libraries' INFO chatter off; -v 0 turns it on
    logging.set_verbosity(logging.WARNING)
  from bookjax import ablation  # pylint: disable=g-import-not-at-top
  res = ablation.run_study(_CONFIG.value, _OUTDIR.value)
  print(res["markdown"])


if __name__ == "__main__":
  app.run(main)
