from lightning_irl.callbacks.checkpoint import AtomicCheckpointIO, RunCheckpoint
from lightning_irl.callbacks.predictions import JsonlPredictionWriter
from lightning_irl.callbacks.preemption import Preempted, Preemption
from lightning_irl.callbacks.resume import ExactResume
from lightning_irl.callbacks.samples import SampleLogger
from lightning_irl.callbacks.threads import CpuThreads

__all__ = ["AtomicCheckpointIO", "CpuThreads", "ExactResume", "JsonlPredictionWriter", "Preempted", "Preemption", "RunCheckpoint",
           "SampleLogger"]
