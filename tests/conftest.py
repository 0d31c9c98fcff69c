import os
from pathlib import Path

# XLA's compilation is most of this suite's time on a CPU (with a warm compilation cache
# tests/test_engine.py runs in a tenth of the time): the tiny models run for milliseconds.
# So XLA skips most optimisation passes (the tests check values, not speed), and one
# persistent compilation cache in the checkout, shared by pytest-xdist's workers and the
# subprocesses tests start, turns each engine's repeat of a step program into a load. Both are
# set in the environment before jax is imported, so subprocesses inherit them. The cache is
# keyed by the program, the compile options and jax's version: it never serves a stale
# executable, and an unreadable entry is compiled again (jax warns).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parent.parent / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from hypothesis import HealthCheck, Phase, settings

# "ci" keeps the whole suite within CI's budget on 2 cores, and a failure fails fast: no
# shrinking (a broken scheduler rollback once made one stateful test shrink for 5+ minutes;
# the unshrunk example is printed all the same). "dev" searches harder and shrinks.
settings.register_profile("ci", max_examples=12, deadline=None, derandomize=True,
                          phases=(Phase.explicit, Phase.reuse, Phase.generate),
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=100, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """With JPAGED_TESTS_ONE_CASE=1 (CI's newest-jax leg), each parametrized test function
    keeps only its first case: every test still runs on that jax, while the full product of
    shapes and dtypes runs once, on the default leg."""
    if os.environ.get("JPAGED_TESTS_ONE_CASE") != "1":
        return
    seen, kept, dropped = set(), [], []
    for item in items:
        function = (item.nodeid.split("[", 1)[0])
        (dropped if function in seen else kept).append(item)
        seen.add(function)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
