"""autobatch: train with the batch size your recipe needs on the GPU you have."""
import warnings

with warnings.catch_warnings():
    # torch warns at import when NumPy is absent; autobatch does not use NumPy. Scoped to this import.
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)
    import torch  # noqa: F401

from autobatch.distributed import RankFailure
from autobatch.modes import Auto, Exact, Micro, TwoPass
from autobatch.oom import PlanDoesNotFit
from autobatch.plan import Plan
from autobatch.step import AutoBatch, wrap

__all__ = ["Auto", "AutoBatch", "Exact", "Micro", "Plan", "PlanDoesNotFit", "RankFailure", "TwoPass", "wrap"]
__version__ = "0.2.0"
