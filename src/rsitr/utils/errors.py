"""User-facing errors: the CLI prints their message (no traceback) and exits with status 2."""


class RsitrError(Exception):
    """Bad input or a refused operation; the message names the file/entry and what is wrong."""


class DataError(RsitrError):
    """A dataset annotation or image is invalid."""


class CheckpointError(RsitrError):
    """A checkpoint cannot be loaded (unknown format, mismatched architecture, ...)."""
