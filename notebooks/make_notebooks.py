"""Writes the tour notebooks from the cell sources below (outputs stripped).

Edit the cells here and run `python notebooks/make_notebooks.py`; tests execute the
.ipynb files top to bottom (tests/test_notebooks.py).
"""
import os

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = """\
import os, sys
# Notebooks run from notebooks/ (Jupyter) or the repo root (tests): find experiments/.
ROOT = os.path.abspath(".." if os.path.basename(os.getcwd()) == "notebooks" else ".")
sys.path.insert(0, ROOT)
WORKROOT = os.environ.get("BOOKJAX_NOTEBOOK_WORKDIR", os.path.join(ROOT, "workdirs", "notebooks"))
os.makedirs(WORKROOT, exist_ok=True)"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# bookjax quickstart\n\nTrain a tiny BookLM on the embedded Chinese corpus, "
               "look at the loss curve, and sample text. The same `train_and_evaluate` runs "
               "behind `experiments/train.py`."),
        ("code", SETUP),
        ("code", """\
from bookjax.data import corpus
docs = corpus.load_documents()
print(corpus.format_stats(corpus.corpus_stats(docs)))"""),
        ("code", """\
from experiments.configs import tiny
from bookjax import train
config = tiny.get_config("runlocal,steps=40")
workdir = os.path.join(WORKROOT, "quickstart")
summary = train.train_and_evaluate(config, workdir)
summary["validation"]"""),
        ("code", """\
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bookjax import metrics_io
rows = [r for r in metrics_io.read_metrics(workdir) if "loss" in r]
plt.plot([r["step"] for r in rows], [r["loss"] for r in rows], marker="o")
plt.xlabel("step"); plt.ylabel("training loss (nats/token)"); plt.title("tiny model")
plt.show()"""),
        ("code", """\
from bookjax import evaluate
config, model, variables, tok, splits = evaluate.load_run(workdir)
scorer = evaluate.LMScorer(model, variables, tok, seq_len=config.data.seq_len)
for prompt in ["床前明月光\\n", "今天天气"]:
    print(repr(prompt), "->", repr(scorer.greedy([prompt], 12)[0]))"""),
    ],
    "02_expert_forest.ipynb": [
        ("md", "# Inside the Expert Forest\n\nTrain a tiny three-level forest (domain → tier → "
               "expert) and look at where tokens of each corpus domain go: tier usage by domain, "
               "the expert-load heat map, and the level-1 domain router against the corpus labels."),
        ("code", SETUP),
        ("code", """\
from experiments.configs import tiny
from bookjax import train, evaluate
config = tiny.get_config("runlocal,steps=40,ffn=forest,depth=3")
workdir = os.path.join(WORKROOT, "forest")
summary = train.train_and_evaluate(config, workdir)
config, model, variables, tok, splits = evaluate.load_run(workdir)
routing = evaluate.routing_analytics(model, variables, splits["validation"], tok,
                                     seq_len=config.data.seq_len,
                                     batch_size=config.data.batch_size, max_batches=8)
sorted(routing)"""),
        ("code", """\
import numpy as np
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from bookjax.data import corpus
layer = sorted(routing)[-1]
usage = np.array(routing[layer]["tier_usage_by_domain"])  # [corpus domain, tier]
tiers = [t for t in ("light", "deep", "super") if f"load_{t}" in routing[layer]]
fig, ax = plt.subplots(figsize=(5, 3))
bottom = np.zeros(len(corpus.DOMAINS))
for j, t in enumerate(tiers):
    ax.bar(corpus.DOMAINS, usage[:, j], bottom=bottom, label=t)
    bottom += usage[:, j]
ax.set_ylabel("share of tier visits"); ax.set_title(f"tier usage by domain ({layer})"); ax.legend()
plt.show()"""),
        ("code", """\
loads = np.concatenate([np.array(routing[layer][f"load_{t}"]) for t in tiers])
rows = [np.concatenate([np.array(routing[l][f"load_{t}"]) for t in tiers]) for l in sorted(routing)]
plt.imshow(np.array(rows) / np.array(rows).sum(1, keepdims=True), aspect="auto", cmap="viridis")
plt.colorbar(label="share of routed copies")
plt.xlabel("expert (light | deep | super)"); plt.ylabel("forest layer"); plt.title("expert load")
plt.show()
{l: {k: round(v, 3) for k, v in routing[l].items() if k.startswith("load_cv")} for l in routing}"""),
        ("code", """\
joint = np.array(routing[layer]["domain_joint"])  # [corpus domain, router domain]
conf = joint / joint.sum(1, keepdims=True)
plt.imshow(conf, cmap="Blues", vmin=0, vmax=1)
plt.yticks(range(len(corpus.DOMAINS)), corpus.DOMAINS); plt.xlabel("level-1 router domain")
plt.title(f"domain router vs corpus label, MI = {routing[layer]['domain_router_mi_bits']:.3f} bits")
plt.colorbar(); plt.show()"""),
    ],
    "03_ablation_tables.ipynb": [
        ("md", "# Ablation tables\n\nRuns (or reloads) a study with the same runner as "
               "`experiments/ablate.py`, then shows its table and plot. Set `STUDY_ARG` to "
               "`''` for the full study (see README for wall times)."),
        ("code", SETUP),
        ("code", """\
STUDY = os.path.join(ROOT, "experiments", "configs", "ablate_attention_dims.py")
STUDY_ARG = "quick"
from bookjax import ablation
outdir = os.path.join(WORKROOT, "ablate_attention_dims" + ("_quick" if STUDY_ARG else ""))
res = ablation.run_study(STUDY + (":" + STUDY_ARG if STUDY_ARG else ""), outdir)"""),
        ("code", """\
from IPython.display import Markdown, Image, display
display(Markdown(res["markdown"]))
display(Image(os.path.join(outdir, "plot.png")))"""),
        ("code", """\
import csv
with open(os.path.join(outdir, "table.csv")) as f:
    rows = list(csv.DictReader(f))
[(r["point"], r["bpc/overall:mean"]) for r in rows]"""),
    ],
}


def build(name, cells):
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  for kind, src in cells:
    nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md"
                    else nbformat.v4.new_code_cell(src))
  nbformat.write(nb, os.path.join(HERE, name))


if __name__ == "__main__":
  for n, c in NOTEBOOKS.items():
    build(n, c)
    print("wrote", n)
