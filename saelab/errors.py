"""Errors that name what was expected, so users can fix their input without reading saelab's source."""


class SaelabError(Exception):
    """Base class for saelab's own errors."""


class ModelError(SaelabError, ValueError):
    """A model name or folder that cannot be loaded."""


class HookError(SaelabError, KeyError):
    """A hook point the model does not have."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DataError(SaelabError, ValueError):
    """A text source that does not exist or cannot be read."""


class CacheError(SaelabError):
    """An activation cache that is corrupt, partial, or belongs to a different run."""



class TrainingError(SaelabError):
    """Training cannot go on: non-finite activations or loss, or the data ran out."""
