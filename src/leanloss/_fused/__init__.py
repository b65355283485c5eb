"""The machinery every fused linear-head loss shares, vocab-parallel ones included: the chunked
engine, the row kernels, the reduce hook and each loss's row math (``docs/internals.md``)."""
