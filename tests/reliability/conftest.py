"""Hypothesis profiles for the reliability suite.

``ci`` (the default) is derandomised: the same examples on every run, so a failure is
reproducible and never flaky. ``nightly`` explores with many more examples; select it
with ``HYPOTHESIS_PROFILE=nightly`` (``explore``: a quicker random run while developing).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("nightly", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", max_examples=300, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
