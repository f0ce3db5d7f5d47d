"""The exceptions diffgen raises. Each message says what was wrong, where, and what to do."""

from __future__ import annotations


class DiffgenError(Exception):
    """Base class of every error diffgen raises on purpose."""


class CheckpointError(DiffgenError, ValueError):
    """A checkpoint file, index or config is missing, broken or hostile.

    ``file`` and ``tensor`` name the place when known; they are also in the message.
    """

    def __init__(self, message: str, *, file: object = None, tensor: str | None = None):
        where = []
        if file is not None:
            where.append(f"file {file}")
        if tensor is not None:
            where.append(f"tensor {tensor!r}")
        super().__init__(f"{message} ({', '.join(where)})" if where else message)
        self.file = file
        self.tensor = tensor


class PluginError(DiffgenError):
    """A plugin failed to load or raised inside a hook while DIFFGEN_STRICT_PLUGINS=1."""


class QuantConfigError(DiffgenError, ValueError):
    """Detection was ambiguous, or the user's flags contradict the checkpoint."""


class NoLinearMethodError(DiffgenError):
    """No plugin can serve a layer (or the forced --quant-backend cannot); lists every offer."""


class LoadError(DiffgenError, ValueError):
    """Weights do not fit the model: missing, unexpected, wrong shape or dtype."""
