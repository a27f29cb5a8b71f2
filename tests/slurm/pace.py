"""A callback for the SLURM tests' jobs (on their PYTHONPATH): each training step takes at least ``seconds``, so a job
lasts as long as the test needs (a time limit, a requeue at a random step) whatever the machine's speed."""

import time

import lightning as L


class Pace(L.Callback):
    def __init__(self, seconds: float = 0.05):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)
