"""The LightningDataModule that batches a data set of ``ddpm.data`` for training: the same batches on every resume,
at an epoch boundary or in the middle of an epoch, optionally the whole set on the device."""

from __future__ import annotations

from typing import Callable, Iterator

import logging

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ddpm.core.errors import ConfigError
from ddpm.data import ImageData, stack_dataset

log = logging.getLogger(__name__)


class EpochShuffle(Sampler):
    """Shuffles with a permutation drawn from (seed, epoch) alone, like DistributedSampler on one process; with
    ``flips``, each index comes with a horizontal-flip bit drawn from the same generator, as ``(index, flip)``.

    Lightning calls ``set_epoch`` before each epoch, including the epoch a resumed run restarts in, so a resumed run
    sees the same batches, flipped the same way, as one that never stopped; and neither the order nor the flips depend
    on how much of the global RNG other code (sampling callbacks, say) has used, or on the number of loader workers.
    """

    def __init__(self, num_samples: int, seed: int = 0, flips: bool = False):
        self.num_samples, self.seed, self.epoch, self.flips = num_samples, seed, 0, flips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if not self.flips:
            return iter(order)
        flip = (torch.rand(self.num_samples, generator=generator) < 0.5).tolist()
        return iter(list(zip(order, flip)))

    def __len__(self) -> int:
        return self.num_samples


class FlippedOnRequest(Dataset):
    """``dataset[(i, flip)]``: image ``i`` and its label, the image mirrored left to right when ``flip``
    (the keys EpochShuffle draws with ``flips``)."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __getitem__(self, key: tuple[int, bool]):
        index, flip = key
        image, label = self.dataset[index]
        return (image.flip(-1) if flip else image), label

    def __len__(self) -> int:
        return len(self.dataset)


class ResumableLoader(DataLoader):
    """A DataLoader that resumes in the middle of an epoch, through Lightning's ``Stateful`` protocol (``state_dict``
    and ``load_state_dict``, saved in every checkpoint under ``loops.fit_loop.state_dict.combined_loader``).

    Its state is how many of this epoch's batches the trainer has trained on (``batches_done``, read from the trainer
    when a checkpoint is written). Restored, its next epoch draws those batches again and discards them before the
    first one it hands over: the shuffle, a function of (seed, epoch), and any randomness drawn while loading are then
    what the uninterrupted run had, and the rest of the epoch is its batches. Drawing, not skipping indices, costs
    reading at most one epoch's images once per resume, and keeps a loader's own random streams in step.

    Its iterator is made at the first batch, not at ``iter()``: Lightning calls ``iter()`` before it sets the
    sampler's epoch, and worker processes start drawing indices as soon as an iterator exists."""

    def __init__(self, *args, batches_done: Callable[[], int] = lambda: 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.batches_done, self._skip = batches_done, 0

    def state_dict(self) -> dict:
        # A whole epoch done: none of the next. The batch size too: a run may resume with another one.
        return {"batches_done": int(self.batches_done()) % max(len(self), 1), "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        """The state from a checkpoint (an input: a value that is not a count is taken as 0). Resumed with another
        ``data.batch_size``, the images already seen this epoch are skipped, to the nearest whole new batch."""
        done, size = state.get("batches_done", 0), state.get("batch_size", self.batch_size)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (done, size)):
            done, size = 0, self.batch_size
        if size != self.batch_size and self.batch_size:
            log.warning("resuming with data.batch_size=%d where the checkpoint had %d: skipping the %d images of this "
                        "epoch it had seen, to the nearest batch", self.batch_size, size, done * size)
            done = done * size // self.batch_size
        self._skip = min(done, len(self))

    def __iter__(self) -> Iterator:
        skip, self._skip = self._skip, 0
        iterator = super().__iter__()
        for _ in range(skip):
            if next(iterator, None) is None:
                return
        yield from iterator


class SamplerKeys(Dataset):
    """``keys[k] == k``: the data set of the on-device loader, whose batches are the sampler's keys themselves."""

    def __init__(self, length: int):
        self.length = length

    def __getitem__(self, key):
        return key

    def __len__(self) -> int:
        return self.length


def collate_keys(keys: list) -> dict[str, torch.Tensor]:
    """A batch of sampler keys (indices, or (index, flip) pairs) as tensors: {"index": ..., "flip": ...}."""
    if keys and isinstance(keys[0], tuple):
        index, flip = zip(*keys)
        return {"index": torch.tensor(index), "flip": torch.tensor(flip)}
    return {"index": torch.tensor(keys)}


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
        flips = bool(getattr(data, "random_flip", False))
        seed = torch.initial_seed()  # the run's `seed`, as set by seed_everything
        sampler = EpochShuffle(len(data.train_set), seed, flips=flips)
        # drop_last keeps every step's batch the same size, so the loss curve is comparable across steps. The loader's
        # own generator seeds its workers, so starting an epoch draws nothing from the global RNG (whose stream, saved
        # in checkpoints, drives t, noise and label dropout).
        if data.on_device:  # batches of (index, flip) keys; on_after_batch_transfer gathers the images where the model is
            return ResumableLoader(SamplerKeys(len(data.train_set)), batch_size=data.batch_size, drop_last=True, sampler=sampler,
                                   generator=torch.Generator().manual_seed(seed), batches_done=self.batches_done,
                                   collate_fn=collate_keys)
        return ResumableLoader(
            FlippedOnRequest(data.train_set) if flips else data.train_set, batch_size=data.batch_size, sampler=sampler,
            drop_last=True, num_workers=data.num_workers, generator=torch.Generator().manual_seed(seed),
            persistent_workers=data.num_workers > 0, pin_memory=torch.cuda.is_available(), batches_done=self.batches_done,
        )

    def batches_done(self) -> int:
        """Batches of the current epoch the trainer has trained on (what a checkpoint written now has seen)."""
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed if self.trainer is not None else 0

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """With ``data.on_device``: the whole training set lives as one tensor on the model's device (copied once), and
        a batch is an index gather there: no worker processes, no host-to-device copy per step. The keys come from
        the same sampler as the ordinary loader's, so the batches, and their flips, are the same."""
        if not self.data.on_device or not isinstance(batch, dict):
            return batch
        if self._device_data is None or self._device_data[0].device != batch["index"].device:
            images, labels = stack_dataset(self.data.train_set)
            self._device_data = images.to(batch["index"].device), labels.to(batch["index"].device)
        images, labels = self._device_data[0][batch["index"]], self._device_data[1][batch["index"]]
        if "flip" in batch:
            images = torch.where(batch["flip"][:, None, None, None], images.flip(-1), images)
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
