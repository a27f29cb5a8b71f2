"""ddpm's submitit launchers, where Hydra looks for launchers (the ``hydra_plugins`` namespace): hydra-submitit-launcher's
two, finishing a sweep when one of its jobs fails (``ddpm.launchers.FinishTheSweep``; conf/hydra/launcher/*.yaml)."""

from hydra_plugins.hydra_submitit_launcher import submitit_launcher

from ddpm.launchers import FinishTheSweep


class SlurmLauncher(FinishTheSweep, submitit_launcher.SlurmLauncher):
    """hydra/launcher=submitit_slurm."""


class LocalLauncher(FinishTheSweep, submitit_launcher.LocalLauncher):
    """hydra/launcher=submitit_local."""
