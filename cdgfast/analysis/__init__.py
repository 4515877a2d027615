"""cdgfast.analysis: geometry of the empirical Fisher (rank-1 paper, section 3.2) without a P x P matrix."""
from .geometry import FisherGeometry, fisher_geometry, gram_statistics, param_groups, scaled_prediction_mse

__all__ = ["FisherGeometry", "fisher_geometry", "gram_statistics", "param_groups", "scaled_prediction_mse",
           "run_fisher_analysis"]


def __getattr__(name):
    # The experiment driver pulls in data/models; import it only when asked for.
    if name == "run_fisher_analysis":
        from .experiment import run_fisher_analysis
        return run_fisher_analysis
    raise AttributeError(f"module 'cdgfast.analysis' has no attribute {name!r}")
