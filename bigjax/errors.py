"""The one exception family users see: the CLI prints its message on one line and exits 2."""


class BigjaxError(Exception):
    """A problem the user can act on (bad config, data, checkpoint or argument)."""


class ConfigError(BigjaxError):
    pass


class DataError(BigjaxError):
    pass


class CheckpointError(BigjaxError):
    pass


def first_line(e: BaseException, limit: int = 300) -> str:
    """An underlying error as one line of a bigjax message: its first line, or its type name."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:limit]
