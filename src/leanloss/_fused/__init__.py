"""The machinery every fused linear-head loss shares (vocabulary-parallel ones included).

* :mod:`.engine`: the chunked engine (row blocks, the 16-bit weight-gradient plan) and the
  :class:`~.engine.Scorer` contract a loss implements;
* :mod:`.kernels`: row-wise block functions run compiled (inductor) or eagerly;
* :mod:`.rows`: dropping ignored rows before any matmul and scattering results back;
* :mod:`.reduce_hook`: where a scorer's per-row partials are reduced over the vocabulary
  (the identity on one device; a vocab shard all-reduces them);
* :mod:`.ce_rows`, :mod:`.logp_rows`: the row math of each loss, stated once for one device
  and vocab-parallel alike.
"""
