"""Shared settings of the property-based parser tests.

Every parser gets at least 500 examples in ``make test``; set ``SHARDWISE_FUZZ_EXAMPLES``
for longer runs (e.g. 20000 overnight).
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

EXAMPLES = int(os.environ.get("SHARDWISE_FUZZ_EXAMPLES", "500"))
FUZZ = settings(max_examples=EXAMPLES, deadline=2000, derandomize="SHARDWISE_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large])
