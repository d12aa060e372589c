from lightning_irl.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from lightning_irl.callbacks.predictions import JsonlPredictionWriter
from lightning_irl.callbacks.preemption import Preempted, Preemption
from lightning_irl.callbacks.resume import ExactResume
from lightning_irl.callbacks.samples import SampleLogger

__all__ = ["AtomicCheckpointIO", "ExactResume", "JsonlPredictionWriter", "Preempted", "Preemption", "RunCheckpoint",
           "SampleLogger"]
