import os

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
