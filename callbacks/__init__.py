"""Lightning callbacks for FALQON training."""

from falqon_lit.callbacks.proxy_update import RowwiseProxyUpdate
from falqon_lit.callbacks.quant_stats import QuantStats
from falqon_lit.callbacks.replica_check import ReplicaConsistencyCheck
from falqon_lit.callbacks.step_profiler import StepProfiler
from falqon_lit.callbacks.summary import FitSummary
from falqon_lit.callbacks.throughput import Throughput

__all__ = ["FitSummary", "QuantStats", "ReplicaConsistencyCheck", "RowwiseProxyUpdate", "StepProfiler", "Throughput"]
