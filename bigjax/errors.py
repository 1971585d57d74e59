"""The one exception family users see: the CLI prints its message on one line and exits 2."""


class BigjaxError(Exception):
    """A problem the user can act on (bad config, data, checkpoint or argument)."""


class ConfigError(BigjaxError):
    pass


class DataError(BigjaxError):
    pass


class CheckpointError(BigjaxError):
    pass
