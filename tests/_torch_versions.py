"""What the installed torch can do, for the tests of features that need a newer torch than the
package (``pyproject.toml`` names the lowest torch it supports; docs/torch-versions.md the table)."""
from __future__ import annotations

import pytest
import torch

# torch < 2.7: FSDP2's all-gather records an event on the current stream, and torch 2.6's CPU
# stream has no ``record_event`` (AttributeError in ``fully_shard``'s forward on CPU; CUDA works).
FSDP2_ON_CPU = torch.__version__ >= (2, 7)
needs_fsdp2_on_cpu = pytest.mark.skipif(
    not FSDP2_ON_CPU, reason=f"torch {torch.__version__} < 2.7: FSDP2 (fully_shard) cannot run on CPU "
                             "('Stream' object has no attribute 'record_event'); it can from torch 2.7")
