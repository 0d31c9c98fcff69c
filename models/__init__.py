"""Flax models (Llama family) that run on the paged KV cache."""
