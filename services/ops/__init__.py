"""The operators' tool: show and steer the fleet in a Kubernetes cluster (``python -m services.ops``).

It talks to the API server with the official ``kubernetes`` client and reads consumer-group lag
from Redis with ``services.core``; nothing in the fleet imports it.
"""

from services.ops.chaos import ChaosPlan, ChaosReport, run_chaos
from services.ops.cluster import Autoscaler, Budget, Fleet, OpsError, Service
from services.ops.lag import GroupLag, read_lag

__all__ = [
    "Autoscaler",
    "Budget",
    "ChaosPlan",
    "ChaosReport",
    "Fleet",
    "GroupLag",
    "OpsError",
    "Service",
    "read_lag",
    "run_chaos",
]
