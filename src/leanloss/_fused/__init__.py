"""The machinery every fused linear-head loss shares (vocabulary-parallel ones included).

* :mod:`.engine`: the chunked engine (row blocks, the 16-bit weight-gradient plan) and the
  :class:`~.engine.Scorer` contract a loss implements;
* :mod:`.kernels`: row-wise block functions run compiled (inductor) or eagerly;
* :mod:`.rows`: dropping ignored rows before any matmul and scattering results back;
* :mod:`.ce_rows`: the cross-entropy row loss and its gradient coefficients.
"""
