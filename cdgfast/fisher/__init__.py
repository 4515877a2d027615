"""cdgfast.fisher: per-sample gradient projections and squared-gradient sums without per-sample
loops (forward-mode JVP and hook-based per-layer contractions), the rank-1 / diagonal empirical
Fisher estimators (SPEC sections 3 and 4), and the streaming accumulator on flat buffers."""
from .estimators import Rank1Fisher, diag_fisher, per_sample_grad_dot, per_sample_sq_grad_sum, rank1_fisher
from .hooks import hook_coverage

__all__ = ["Rank1Fisher", "per_sample_grad_dot", "per_sample_sq_grad_sum", "rank1_fisher", "diag_fisher",
           "hook_coverage"]

try:  # the streaming accumulator lives in its own file (written separately); the estimators above do not need it
    from .accumulator import FisherAccumulator, online_update  # noqa: F401
except ImportError:  # pragma: no cover
    pass
else:
    __all__ += ["FisherAccumulator", "online_update"]
