"""Datasets → Avalanche streams of sample indices, with the tensors resident on the device."""

from cl_ema.data.storage import CropFlip, Normalization, TensorStore
from cl_ema.data.stream import (
    ContinualStream,
    build_stream,
    experience_indices,
    index_dataset,
    stream_from_stores,
)

__all__ = [
    "ContinualStream",
    "CropFlip",
    "Normalization",
    "TensorStore",
    "build_stream",
    "experience_indices",
    "index_dataset",
    "stream_from_stores",
]
