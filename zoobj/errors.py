"""The errors a user can cause. Each message is one line: the problem and what to do.

The command line prints them without a traceback and exits with status 2; anything
else is an internal error (status 1).
"""


class ZoobjError(Exception):
    """Base class for errors caused by input: a name, a file, a setting, a reward."""


class ConfigError(ZoobjError, ValueError):
    """An unknown task, metric or model name, or a malformed task file or setting."""


class DataError(ZoobjError, ValueError):
    """A data file that cannot be read, lacks a field, or has an empty split."""


class RewardError(ZoobjError, ValueError):
    """A metric or reward function that raised or returned something unusable."""


class ModelError(ZoobjError, ValueError):
    """A model that cannot be found or loaded."""
