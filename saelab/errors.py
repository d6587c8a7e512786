"""Errors that name what was expected, so users can fix their input without reading saelab's source."""

import errno
import os
import re


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


# What to do about a failed read or write, by errno. Every folder saelab writes resumes after a failure, so
# "rerun the same command" is advice that works.
_OS_ADVICE = {
    errno.ENOSPC: "the disk is full: free space (or choose a folder on another disk), then rerun the same command; "
                  "it continues from the last shard or checkpoint written",
    errno.EDQUOT: "the disk quota is exhausted: free space, then rerun the same command; it continues where it stopped",
    errno.EROFS: "the file system is read-only: choose an output folder on a writable disk",
    errno.EACCES: "permission denied: choose a folder you may write to, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a folder you may write to, or fix its permissions",
    errno.ENOTDIR: "a part of that path is a file, not a folder: choose another path",
    errno.EISDIR: "that path is a folder, but a file is needed there: choose another path",
    errno.EEXIST: "something already exists at that path: move it away or choose another path",
    errno.ENOENT: "no such file or folder: check the path",
}


def describe_os_error(error: OSError) -> str:
    """'cannot use <file>: <reason>; <what to do>' for an OSError from reading or writing files."""
    where = f" {error.filename}" if error.filename else ""
    reason = error.strerror or str(error) or type(error).__name__
    advice = _OS_ADVICE.get(error.errno, "check the path and the disk, then rerun the same command")
    return f"cannot use{where}: {reason}; {advice}"


def as_os_error(error: BaseException, filename) -> OSError | None:
    """`error` as an OSError naming `filename` (unless it names a file already), for a failed write; also for
    libraries that give the OS error only in words (safetensors: '... No space left on device (os error 28)'), so
    describe_os_error can say what to do. None when `error` is no I/O error."""
    if isinstance(error, OSError):
        error.filename = error.filename or str(filename)
        return error
    found = re.search(r"os error (\d+)", str(error))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1))), str(filename)) if found else None
