"""autobatch: train with the batch size your recipe needs on the GPU you have."""
from autobatch.distributed import RankFailure
from autobatch.planning.planner import Plan
from autobatch.step import AutoBatch, wrap

__all__ = ["AutoBatch", "Plan", "RankFailure", "wrap"]
__version__ = "0.1.0"
