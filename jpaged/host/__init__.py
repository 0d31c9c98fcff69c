"""The host side: sequences, the block manager, the scheduler, requests, sampling
parameters and stop rules. Plain Python and numpy; importing it loads no JAX."""
