"""Suite-wide test settings.

Hypothesis runs without per-example deadlines and without the too-slow health
check: the suite shares two cores with QEMU guests under TCG, and an example's
wall time says nothing about the code under test there (speed is measured with
the benchmarks, never in tests).
"""

from hypothesis import HealthCheck, settings

settings.register_profile("vhsm", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vhsm")
