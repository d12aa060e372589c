from lightning_irl.callbacks.checkpoint import RunCheckpoint
from lightning_irl.callbacks.predictions import JsonlPredictionWriter

__all__ = ["JsonlPredictionWriter", "RunCheckpoint"]
