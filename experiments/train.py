r"""Trains a BookLM model: `python experiments/train.py --config=experiments/configs/tiny.py --workdir=/tmp/tiny`.

Re-running the same command resumes from the workdir's latest checkpoint.
Multi-process (one process per host; on loopback for local tests):
  python experiments/train.py ... --coordinator=127.0.0.1:12345 --num_processes=2 --process_id=0
or `--distributed` to let `jax.distributed.initialize` read JAX_COORDINATOR_ADDRESS and
detect the rest from a cluster environment (SLURM, Open MPI, ...). On CPU the processes
talk through gloo collectives. `scripts/launch_local.sh -n 2 -d 4 -- python
experiments/train.py ...` starts N processes with D emulated CPU devices each on
loopback. Only process 0 writes metrics; all processes write checkpoints (orbax).
"""
from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
_COORDINATOR = flags.DEFINE_string("coordinator", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() even without the flags "
                                 "above (coordinator and ids from the environment).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # libraries' INFO chatter off; -v 0 turns it on
    logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  if _COORDINATOR.value or _NUM_PROCESSES.value or _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU only; harmless else
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  from bookjax import train  # pylint: disable=g-import-not-at-top
  summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print("done:", summary, flush=True)


if __name__ == "__main__":
  app.run(main)
