"""The errors a command reports in one line (``ddpm.config.run_cli``: the message alone, exit status 2)."""


class ConfigError(ValueError):
    """Bad user input (config values, data paths, checkpoints): the CLI prints the message alone and exits 2."""


class NonFiniteLossError(RuntimeError):
    """The loss or the weights of a training run became NaN or infinite; raised before any such checkpoint is
    written (``ddpm.training.module``), and said in one line with what to change."""
