"""Exceptions that carry a one-line, user-facing message."""

from __future__ import annotations

import os

__all__ = ["FemurError", "InputError", "OutputExistsError", "ModelFileError", "Cancelled", "TrainingDiverged"]


class FemurError(Exception):
    """Base class: ``str(err)`` is a complete one-line message for the user."""


class InputError(FemurError, ValueError):
    """A file or folder the user gave cannot be used; the message names it.

    Parameters
    ----------
    path : str or os.PathLike or None
        The offending file or folder.
    problem : str
        What is wrong with it, in words.
    """

    def __init__(self, path: "str | os.PathLike | None", problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable with its own arguments (errors cross process boundaries)
        return type(self), (self.path, self.problem), self.__dict__


class OutputExistsError(FemurError, FileExistsError):
    """An output exists and overwriting was not asked for."""

    def __init__(self, path: "str | os.PathLike"):
        self.path = os.fspath(path)
        super().__init__(f"{self.path}: exists; pass overwrite=True (--overwrite) to replace it")

    def __reduce__(self):
        return type(self), (self.path,), self.__dict__


class ModelFileError(FemurError):
    """A model file is unsafe, corrupt, or does not match its architecture."""


class Cancelled(FemurError):
    """Work stopped because its cancel token was set."""


class TrainingDiverged(FemurError):
    """The training loss became NaN or infinite; the run stopped before a step on it."""
