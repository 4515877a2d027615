"""cdgfast.fisher: per-sample gradient projections and squared-gradient sums without per-sample
loops (forward-mode JVP and hook-based per-layer contractions), the rank-1 / diagonal empirical
Fisher estimators (SPEC sections 3 and 4), the rank-k estimators (power iteration, exact from the
per-sample Gram matrix), and the streaming accumulator on flat buffers."""
from cdgfast.params import FlatParameters, flatten_parameters_

from .accumulator import FisherAccumulator, online_update
from .estimators import Rank1Fisher, diag_fisher, per_sample_grad_dot, per_sample_sq_grad_sum, rank1_fisher
from .gram import PerSampleGram, per_sample_gram
from .hooks import hook_coverage
from .lowrank import LowRankFisher, lowrank_fisher_gram, lowrank_fisher_power

__all__ = ["Rank1Fisher", "per_sample_grad_dot", "per_sample_sq_grad_sum", "rank1_fisher", "diag_fisher",
           "hook_coverage", "FisherAccumulator", "PerSampleGram", "per_sample_gram", "LowRankFisher",
           "lowrank_fisher_power", "lowrank_fisher_gram", "online_update", "FlatParameters", "flatten_parameters_"]
