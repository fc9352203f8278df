import os
import sys

# Make tests/distributed.py importable by spawned worker processes as well.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
