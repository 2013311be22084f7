"""The error of every model-file reader (model_files, pickle_scan), in a module of its own so that
both can raise it without importing each other."""

from __future__ import annotations


class ModelFileError(ValueError):
    """A model file that cannot be read: truncated, corrupt, unsafe or of an unknown kind."""
