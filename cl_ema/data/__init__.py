"""Datasets → Avalanche streams of sample indices, with the tensors resident on the device."""

from cl_ema.data import sources
from cl_ema.data.storage import CropFlip, Normalization, TensorStore
from cl_ema.data.stream import (
    DataSpec,
    TaskStream,
    build_stream,
    experience_indices,
    index_dataset,
    stream_from_stores,
)

__all__ = [
    "CropFlip",
    "DataSpec",
    "Normalization",
    "TaskStream",
    "TensorStore",
    "build_stream",
    "experience_indices",
    "index_dataset",
    "sources",
    "stream_from_stores",
]
