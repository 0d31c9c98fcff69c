"""The core: the paged KV cache (`cache`), attention over it (`attention`), bucketed shapes
(`shapes`) and the interfaces a model implements (`interfaces`). JAX, no Flax, no engine."""
