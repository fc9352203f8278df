import os
import sys

# Make tests/distributed.py importable by spawned worker processes as well.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Triton reads TRITON_INTERPRET when a kernel module is first imported, and any test may be the
# first to import one, so set it before all of them (kernel tests run in the interpreter on CPU).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402 - after the environment above, which the imports below must see
from builders import image_folder, tiny_run  # noqa: E402
from distributed import run_distributed  # noqa: E402


@pytest.fixture
def tiny_config():
    """builders.tiny_run: a small pretraining run's TrainConfig (field overrides as keywords)."""
    return tiny_run


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A folder of ten random 72 x 80 PNGs, shared by a module's tests (read-only)."""
    return image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture
def two_processes():
    """run_distributed on two gloo processes: two_processes(fn, *args) -> [rank 0's result, rank 1's]."""
    return lambda fn, *args, **kw: run_distributed(fn, 2, *args, **kw)
