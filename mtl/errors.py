"""Errors that a user can fix: the CLI prints them as one line and exits non-zero."""


class MtlError(Exception):
    """Base for errors caused by input (config, data, storage, checkpoints), not by bugs."""


class ConfigError(MtlError, ValueError):
    pass


class DataError(MtlError):
    pass


class StorageError(MtlError):
    pass


class NotFound(StorageError):
    """The storage answered, and the file is not there (not: the storage could not be reached)."""


class CheckpointError(MtlError):
    pass


class TrialFailed(MtlError):
    """The trial cannot go on (training diverged): it is recorded as failed, never as done."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def kind(value) -> str:
    """What a JSON/YAML value is, for a message: 'a list', 'an integer', ..."""
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", type(None): "empty"}
    return names.get(type(value), f"a {type(value).__name__}")
