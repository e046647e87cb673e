"""Errors that stop a whole run, each with a message meant for the person who started it.

Per-video failures are never raised: they become rows of `OUTPUT/errors/` (see decode.py).
"""


class RayvidError(Exception):
    """The job cannot run; the message says why and what to do. The CLI exits 2."""


class ConfigError(RayvidError):
    pass


class InputError(RayvidError):
    pass


class ModelError(RayvidError):
    pass


class StorageError(RayvidError):
    pass


class StorageUnavailable(StorageError):
    """The object store cannot be reached (connection refused, timeouts) after bounded
    retries: not a property of one video, so it stops the run; committed work stays, and
    the same command finishes the rest once the store is back."""
