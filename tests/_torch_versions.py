"""What the installed torch can do, for the tests of features that need a newer torch than the
package (``pyproject.toml`` names the lowest torch it supports; docs/torch-versions.md the table)."""
from __future__ import annotations

import pytest
import torch

# torch < 2.7: FSDP2's all-gather records an event on the current stream, and torch 2.6's CPU
# stream has no ``record_event`` (AttributeError in ``fully_shard``'s forward on CPU; CUDA works).
needs_fsdp2_on_cpu = pytest.mark.skipif(
    torch.__version__ < (2, 7),
    reason=f"torch {torch.__version__} < 2.7: FSDP2 (fully_shard) cannot run on CPU "
           "('Stream' object has no attribute 'record_event'); it can from torch 2.7")

# torch < 2.8: fully_shard refuses a tensor-parallel parameter whose sharded dimension does not
# divide evenly (an LM head of V rows over tp ranks, then over dp ranks).
needs_uneven_fsdp2_tp = pytest.mark.skipif(
    torch.__version__ < (2, 8),
    reason=f"torch {torch.__version__} < 2.8: FSDP2 + tensor parallel cannot shard a dimension "
           "unevenly (NotImplementedError: FSDP+TP sharding does not support uneven sharding); "
           "it can from torch 2.8")
