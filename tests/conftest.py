"""Shared pytest setup: repo root on sys.path (for `experiments.*`), quiet logs."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
