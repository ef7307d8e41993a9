r"""Runs every evaluator on a trained workdir: `python experiments/evaluate.py --workdir=workdirs/tiny`.

Writes `<workdir>/eval.json` and prints it. `--ceval_dir` points the C-Eval harness
at real C-Eval CSV files (`<subject>_dev.csv`, `<subject>_val.csv`).
"""
import json

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Trained workdir.")
_QUICK = flags.DEFINE_bool("quick", False, "Small evaluation sets.")
_CEVAL_DIR = flags.DEFINE_string("ceval_dir", None, "Directory of C-Eval CSVs (optional).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the results here.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # libraries' INFO chatter off; -v 0 turns it on
    logging.set_verbosity(logging.WARNING)
  from bookjax import evaluate  # pylint: disable=g-import-not-at-top
  res = evaluate.evaluate_workdir(_WORKDIR.value, quick=_QUICK.value)
  if _CEVAL_DIR.value:
    res["ceval_files"] = evaluate.evaluate_ceval_dir(_WORKDIR.value, _CEVAL_DIR.value)
  text = json.dumps(res, indent=2, ensure_ascii=False)
  print(text)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w", encoding="utf-8") as f:
      f.write(text)


if __name__ == "__main__":
  app.run(main)
