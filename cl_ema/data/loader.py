"""Avalanche's mini-batches of sample indices, without fetching the samples one by one.

Avalanche's loaders (``TaskBalancedDataLoader``, the ``ReplayDataLoader`` of its replay plugin, a
plain ``DataLoader``) choose each mini-batch with a batch sampler over the concatenation of their
datasets, then fetch and collate the chosen items one at a time in Python: about 19 µs per
sample, 2.4 ms per batch of 128 on the host, serial with the kernel launches of a GPU step.
cl_ema's items are only ``(sample index, label, task label)``, so ``IndexBatches`` reads every
item once per experience into device tensors and turns each batch that Avalanche's sampler draws
into one gather: same batches, same random draws of the sampler, no per-sample work.

Every batch is global: with several processes each one draws the same batch and takes its share
later (``cl_ema.template``), so Avalanche's distributed samplers are never used.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from avalanche.benchmarks.utils.data_loader import MultiDatasetDataLoader, MultiDatasetSampler
from torch import Tensor
from torch.utils.data import DataLoader

from cl_ema.data.stream import dataset_columns


class IndexBatch(list):
    """``[index, label, task]`` of one mini-batch; its last ``replayed`` samples come from a replay memory."""

    def __init__(self, columns: Sequence[Tensor], replayed: int = 0) -> None:
        super().__init__(columns)
        self.replayed = replayed


class DeviceBatches:
    """Iterable of ``IndexBatch``es on the training device: what the template trains on."""

    def __len__(self) -> int:
        raise NotImplementedError

    def __iter__(self) -> Iterator[IndexBatch]:
        raise NotImplementedError

    def without_draws(self) -> Iterable[IndexBatch]:
        """The same samples, drawing nothing from a replay memory's generator (to re-estimate statistics)."""
        return self


class IndexBatches(DeviceBatches):
    """The batches an Avalanche train loader would yield, as ``IndexBatch``es on ``device``.

    Positions past the experience's own ``current_size`` samples are replay memory (Avalanche's
    replay loader puts its memory datasets after the current data, and each batch's memory
    samples after the current ones).
    """

    def __init__(
        self, loader: DataLoader | MultiDatasetDataLoader, device: torch.device, current_size: int | None = None
    ) -> None:
        self.loader = loader
        self.device = device
        datasets: Sequence = loader.datasets if isinstance(loader, MultiDatasetDataLoader) else [loader.dataset]
        columns = zip(*(dataset_columns(dataset) for dataset in datasets))
        # positions of the concatenated datasets → items, as the sampler's indices count them
        self.columns = [torch.cat(column).to(device) for column in columns]
        self.current_size = len(self.columns[0]) if current_size is None else current_size
        self._length = len(self._batch_sampler())  # type: ignore[arg-type]  # building a sampler draws nothing

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[IndexBatch]:
        for positions in self._batch_sampler():
            at = torch.as_tensor(positions, dtype=torch.long)
            replayed = int((at >= self.current_size).sum())
            at = at.to(self.device)
            yield IndexBatch([column[at] for column in self.columns], replayed)

    def _batch_sampler(self) -> Iterable[list[int]]:
        loader = self.loader
        if not isinstance(loader, MultiDatasetDataLoader):
            assert loader.batch_sampler is not None
            return loader.batch_sampler
        # a fresh sampler per epoch, as MultiDatasetDataLoader._get_loader builds it, minus that
        # method's FFCV probe, which walks every sample each epoch (75 ms per CIFAR-100 task)
        samplers = loader._create_samplers(loader.datasets, loader.batch_sizes, False, loader.loader_kwargs)
        return MultiDatasetSampler(
            loader.datasets,
            samplers,
            termination_dataset_idx=loader.termination_dataset,
            oversample_small_datasets=loader.oversample_small_datasets,
            never_ending=loader.never_ending,
        )
