"""Shared pytest setup: repo root on sys.path (for `experiments.*`) and a persistent
XLA compilation cache, so the many tiny models compiled by the suite (and by the
notebook kernels and multi-device subprocesses, which inherit the environment)
compile once per shape. Set before JAX is imported anywhere."""
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "bookjax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
