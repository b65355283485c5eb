"""Test-suite setup: the shared oracle helpers import as ``_oracle``; every test starts in
leanloss's default check mode ('full') with a fixed torch seed, whatever a previous test did."""
from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# the native kernels' build cache: one per test process, not the user's
_native_cache = tempfile.mkdtemp(prefix="leanloss-test-native-")
atexit.register(shutil.rmtree, _native_cache, True)
os.environ.setdefault("LEANLOSS_CACHE_DIR", _native_cache)

import leanloss  # noqa: E402

# tiny tensors: intra-op threads only add scheduling overhead (and fight over shared cores)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _default_checks_and_seed():
    previous = leanloss.set_checks("full")
    torch.manual_seed(0)
    yield
    leanloss.set_checks(previous)
