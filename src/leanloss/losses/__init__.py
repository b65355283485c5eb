"""Dense losses: computed on materialized inputs from tensor primitives."""
