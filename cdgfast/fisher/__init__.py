"""cdgfast.fisher: per-sample gradient projections and squared-gradient sums without per-sample
loops (forward-mode JVP and hook-based per-layer contractions), the rank-1 / diagonal empirical
Fisher estimators (SPEC sections 3 and 4), and the streaming accumulator on flat buffers."""
from cdgfast.params import FlatParameters, flatten_parameters_

from .accumulator import FisherAccumulator, online_update
from .estimators import Rank1Fisher, diag_fisher, per_sample_grad_dot, per_sample_sq_grad_sum, rank1_fisher
from .hooks import hook_coverage

__all__ = ["Rank1Fisher", "per_sample_grad_dot", "per_sample_sq_grad_sum", "rank1_fisher", "diag_fisher",
           "hook_coverage", "FisherAccumulator", "online_update", "FlatParameters", "flatten_parameters_"]
