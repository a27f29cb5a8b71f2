"""The core's one error type: bad user input, reported as one line naming the field and its allowed values."""


class ConfigError(ValueError):
    """Bad user input (config values, data paths, checkpoints): the CLI prints the message alone and exits 2."""
