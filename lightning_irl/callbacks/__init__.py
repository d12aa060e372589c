from lightning_irl.callbacks.checkpoint import RunCheckpoint
from lightning_irl.callbacks.predictions import JsonlPredictionWriter
from lightning_irl.callbacks.samples import SampleLogger

__all__ = ["JsonlPredictionWriter", "RunCheckpoint", "SampleLogger"]
