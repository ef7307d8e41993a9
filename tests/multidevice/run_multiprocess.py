"""Two processes x 4 CPU devices on loopback vs one process x 8 devices: the same
3 train steps of the tiny forest + MLA-3D model through experiments/train.py.

Usage: python tests/multidevice/run_multiprocess.py WORKDIR
The 2-process run goes through scripts/launch_local.sh (jax.distributed.initialize,
gloo collectives). Prints `RESULT {json}` with both runs' losses per step, which
processes wrote metrics, and the checkpoint steps on disk.
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top

STEPS = 3
MESH = dict(data=2, fsdp=1, expert=4, tensor=1)


def train_cmd(workdir: str) -> list[str]:
  flags = [f"--config=experiments/configs/tiny.py:{common.TEST_ARG},steps={STEPS}",
           f"--workdir={workdir}", "--config.train.log_every=1",
           "--config.train.checkpoint_every=100"]
  flags += [f"--config.mesh.{k}={v}" for k, v in MESH.items()]
  flags += [f"--config.model.ffn.forest.tiers.{t}.num_experts={common.TIER_EXPERTS}"
            for t in ("light", "deep", "super")]
  return [sys.executable, "experiments/train.py"] + flags


def losses(workdir: str) -> dict[int, float]:
  from bookjax import metrics_io  # pylint: disable=g-import-not-at-top
  return {r["step"]: r["loss"] for r in metrics_io.read_metrics(workdir) if "loss" in r}


def main():
  out_dir = os.path.abspath(sys.argv[1])
  os.makedirs(out_dir, exist_ok=True)
  env = dict(os.environ, JAX_PLATFORMS="cpu", LAUNCH_QUIET="1")
  single, multi = os.path.join(out_dir, "one_process"), os.path.join(out_dir, "two_processes")
  logs = os.path.join(out_dir, "logs")
  r1 = subprocess.run(train_cmd(single), cwd=common.ROOT, capture_output=True, text=True,
                      env=dict(env, JAX_NUM_CPU_DEVICES="8"))
  r2 = subprocess.run(["bash", "scripts/launch_local.sh", "-n", "2", "-d", "4", "-l", logs, "--"]
                      + train_cmd(multi), cwd=common.ROOT, capture_output=True, text=True,
                      env=env)
  result = dict(single_rc=r1.returncode, multi_rc=r2.returncode,
                single_tail=(r1.stdout + r1.stderr)[-3000:],
                multi_tail=(r2.stdout + r2.stderr)[-1000:])
  for i in range(2):
    log = os.path.join(logs, f"process_{i}.log")
    if os.path.exists(log):
      result[f"process_{i}_tail"] = open(log).read()[-3000:]
  if r1.returncode == 0 and r2.returncode == 0:
    result["single"] = losses(single)
    result["multi"] = losses(multi)
    ckpt = os.path.join(multi, "checkpoints")
    result["multi_checkpoints"] = sorted(os.listdir(ckpt)) if os.path.isdir(ckpt) else []
    result["multi_files"] = sorted(os.listdir(multi))
    from bookjax import metrics_io  # pylint: disable=g-import-not-at-top
    steps = [r["step"] for r in metrics_io.read_metrics(multi) if "loss" in r]
    result["multi_rows_per_step"] = max(steps.count(s) for s in set(steps))
  common.emit(result)


if __name__ == "__main__":
  main()
