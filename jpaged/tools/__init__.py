"""Tools built on the library, not part of its core: the paged-vs-dense throughput run
(`bench`), the randomized soak (`soak`) and the picture of the pool (`pool_plot`)."""
