import os
import sys

# Make tests/distributed.py importable by spawned worker processes as well.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton reads TRITON_INTERPRET when a kernel module is first imported, and any test may be the
# first to import one, so set it before all of them (kernel tests run in the interpreter on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")
