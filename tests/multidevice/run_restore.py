"""Save on one mesh, restore onto others: the next steps match the uninterrupted run.

Usage: python tests/multidevice/run_restore.py WORKDIR
  phase `save`   (8 devices, mesh 2,1,4,1): an uninterrupted run of STEPS steps, and
                 a run stopped (checkpointed) after STOP steps;
  phase `resume` (2 devices, mesh 1,1,2,1; then 1 device, mesh 1,1,1,1): a copy of
                 the stopped run resumes to STEPS (params, optimizer state, router
                 bias and the data-iterator state come from the checkpoint).
Each phase runs in its own process (the device count is fixed per process).
Prints `RESULT {json}`: losses per step of every run.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top

STEPS, STOP = 4, 2
SAVE_MESH = (2, 1, 4, 1)
RESUME = (("2dev", 2, (1, 1, 2, 1)), ("1dev", 1, (1, 1, 1, 1)))


def config(mesh):
  c = common.test_config(mesh, common.TEST_ARG + f",steps={STEPS}")
  c.train.log_every = 1
  c.train.checkpoint_every = 100
  c.train.eval_every = 100
  return c


def losses(workdir):
  from bookjax import metrics_io  # pylint: disable=g-import-not-at-top
  return {r["step"]: r["loss"] for r in metrics_io.read_metrics(workdir) if "loss" in r}


def phase(args):
  common.init_devices(args.devices)
  import jax  # pylint: disable=g-import-not-at-top
  if args.cache:
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  from bookjax import train  # pylint: disable=g-import-not-at-top
  mesh = tuple(int(v) for v in args.mesh.split(","))
  if args.phase == "save":
    train.train_and_evaluate(config(mesh), os.path.join(args.workdir, "full"))
    train.train_and_evaluate(config(mesh), os.path.join(args.workdir, "stopped"), stop_at=STOP)
  else:
    train.train_and_evaluate(config(mesh), args.workdir)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("workdir")
  ap.add_argument("--phase", default=None, choices=("save", "resume"))
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--mesh", default=",".join(map(str, SAVE_MESH)))
  ap.add_argument("--cache", default=None)
  args = ap.parse_args()
  if args.phase:
    return phase(args)
  root = os.path.abspath(args.workdir)
  os.makedirs(root, exist_ok=True)
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(root, "jax_cache")
  run = lambda *a: subprocess.run([sys.executable, __file__, *a, "--cache", cache],
                                  capture_output=True, text=True, cwd=common.ROOT)
  result = {}
  r = run(os.path.join(root, "save"), "--phase", "save")
  result["save_rc"] = r.returncode
  if r.returncode:
    result["save_tail"] = (r.stdout + r.stderr)[-4000:]
    return common.emit(result)
  result["full"] = losses(os.path.join(root, "save", "full"))
  result["stopped"] = losses(os.path.join(root, "save", "stopped"))
  for name, devices, mesh in RESUME:
    wd = os.path.join(root, f"resume_{name}")
    shutil.rmtree(wd, ignore_errors=True)
    shutil.copytree(os.path.join(root, "save", "stopped"), wd)
    r = run(wd, "--phase", "resume", "--devices", str(devices),
            "--mesh", ",".join(map(str, mesh)))
    result[f"{name}_rc"] = r.returncode
    if r.returncode:
      result[f"{name}_tail"] = (r.stdout + r.stderr)[-4000:]
      continue
    result[name] = losses(wd)
  common.emit(result)


if __name__ == "__main__":
  main()
