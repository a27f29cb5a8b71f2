"""The LightningDataModule that batches a data set of ``ddpm.data`` for training: the same shuffle on every resume,
optionally the whole set on the device."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from ddpm.core.errors import ConfigError
from ddpm.data import ImageData, stack_dataset


class EpochShuffle(Sampler[int]):
    """Shuffles with a permutation drawn from (seed, epoch) alone, like DistributedSampler on one process.

    Lightning calls ``set_epoch`` before each epoch, including the epoch a resumed run restarts in, so a run
    resumed at an epoch boundary sees the same batches as one that never stopped; and the data order does not
    depend on how much of the global RNG other code (sampling callbacks, say) has used.
    """

    def __init__(self, num_samples: int, seed: int = 0):
        self.num_samples, self.seed, self.epoch = num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.num_samples, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_samples


class DataModule(L.LightningDataModule):
    """Training batches of ``data`` (an ``ImageData``, built by the ``data`` group); callbacks read the data set itself
    as ``trainer.datamodule.data``."""

    def __init__(self, data: ImageData):
        super().__init__()
        self.data = data
        self._device_data: tuple[torch.Tensor, torch.Tensor] | None = None

    def check(self) -> None:
        self.data.check()

    def prepare_data(self) -> None:
        self.data.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Load the splits (once); before fitting, refuse a batch size that would train nothing."""
        self.data.setup()
        if stage == "fit":
            self.check_batches()

    def train_dataloader(self) -> DataLoader:
        data = self.data
        # drop_last keeps every step's batch the same size, so the loss curve is comparable across steps.
        seed = torch.initial_seed()  # the run's `seed`, as set by seed_everything
        # The loader's own generator seeds its workers, so starting an epoch draws nothing from the global RNG
        # (whose stream, saved in checkpoints, drives t, noise and label dropout).
        if data.on_device:  # batches of indices; on_after_batch_transfer gathers the images where the model is
            return DataLoader(range(len(data.train_set)), batch_size=data.batch_size, drop_last=True,
                              sampler=EpochShuffle(len(data.train_set), seed), generator=torch.Generator().manual_seed(seed))
        return DataLoader(
            data.train_set, batch_size=data.batch_size, sampler=EpochShuffle(len(data.train_set), seed), drop_last=True,
            num_workers=data.num_workers, generator=torch.Generator().manual_seed(seed),
            persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available(),
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With ``data.on_device``: the whole training set lives as one tensor on the model's device (copied once), and
        a batch is an index gather there: no worker processes, no host-to-device copy per step. The indices come
        from the same shuffle as the ordinary loader, so the batches are the same."""
        if not self.data.on_device or not torch.is_tensor(batch):
            return batch
        if self._device_data is None or self._device_data[0].device != batch.device:
            images, labels = stack_dataset(self.data.train_set_unaugmented())
            self._device_data = images.to(batch.device), labels.to(batch.device)
        images, labels = self._device_data[0][batch], self._device_data[1][batch]
        if getattr(self.data, "random_flip", False):
            flip = torch.rand(len(batch), device=batch.device) < 0.5
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        return images, labels

    def check_batches(self, world: int | None = None) -> None:
        """drop_last keeps only full batches: a training set (per process) smaller than one batch yields no step at
        all, and the run would end "successfully" having trained nothing. ``world``: the number of processes
        (default: the trainer's)."""
        world = world or (self.trainer.world_size if self.trainer is not None else 1)
        data = self.data
        per_process = -(-len(data.train_set) // world)
        if per_process < data.batch_size:
            each = f", {per_process} per process on {world}" if world > 1 else ""
            raise ConfigError(f"data.batch_size={data.batch_size}: larger than the training set ({len(data.train_set)} "
                              f"images{each}), so no full batch is ever drawn and nothing would train; "
                              f"use data.batch_size <= {per_process}")
