from lightning_irl.data.datamodule import DemonstrationDataModule, LengthGroupedSampler
from lightning_irl.data.records import DataError

__all__ = ["DataError", "DemonstrationDataModule", "LengthGroupedSampler"]
