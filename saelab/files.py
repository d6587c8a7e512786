"""Writing files so that nothing is lost: atomic replace with fsync, one writer per folder, and deleting only what
saelab wrote.

Every folder saelab writes (an activation cache, a training run) goes through these three pieces, so a crash, a
power cut, a second process or a mistyped path can at worst cost the work since the last durable write.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import ntpath
import os
import posixpath
from pathlib import Path, PureWindowsPath

from saelab.errors import SaelabError

LOCK_FILE = ".saelab.lock"


class FolderBusyError(SaelabError):
    """Another process is writing the same folder."""


def fsync_dir(folder: Path) -> None:
    """Make renames and new names inside `folder` survive a power loss."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in chunks (what `sha256sum` prints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file written by another library (safetensors) to the disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary file, fsync, rename, fsync the folder: readers see the old file or the new one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)  # a full disk must not leave a half-written temporary behind
        if isinstance(error, OSError) and not error.filename:
            error.filename = str(path)  # fsync and write errors carry no file name: say which file it was
        raise
    fsync_dir(path.parent)


class FolderLock:
    """An exclusive lock on a folder for as long as a run writes it (`with FolderLock(out): ...`).

    flock on `<folder>/.saelab.lock`: the kernel drops it when the process dies, even by kill -9, so a crashed run
    never leaves a stale lock, and a second process is refused at once instead of interleaving writes.
    """

    def __init__(self, folder: str | Path, what: str = "folder"):
        self.folder, self.what = Path(folder), what
        self._handle: int | None = None

    def __enter__(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = os.pread(handle, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(handle)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise FolderBusyError(
                    f"another saelab process (pid {holder}) is writing the {self.what} {self.folder}; wait for it to "
                    "finish (or stop it), or choose another folder") from None
            raise
        os.ftruncate(handle, 0)
        os.pwrite(handle, str(os.getpid()).encode(), 0)
        self._handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            fcntl.flock(self._handle, fcntl.LOCK_UN)
            os.close(self._handle)
            self._handle = None


def remove_owned(folder: Path, owned: set[str] | list[str], what: str) -> None:
    """Delete the files `owned` (names inside `folder`, all written by saelab); the lock file stays (it may be held).

    Refuses, deleting nothing, when the folder holds anything else: a mistyped path must never cost a user's files.
    """
    folder = Path(folder)
    owned = set(owned) | {LOCK_FILE}
    present = {p.name for p in folder.iterdir()}
    foreign = sorted(present - owned)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise SaelabError(f"{folder} holds files saelab did not write as part of this {what} ({shown}); nothing was "
                          "deleted. Remove them yourself or choose another folder")
    for name in present - {LOCK_FILE}:
        path = folder / name
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            raise SaelabError(f"{path} is a folder, not a file saelab wrote; nothing more was deleted")


def name_problem(name) -> str | None:
    """Why `name` cannot be one file or folder name inside a folder, or None when it can.

    The one rule for every name saelab reads from a file or a setting and then uses in a path (hook names in a cache
    manifest or a cfg.json, SAE names, Hub subfolders): a hostile `../../x` must not place a write outside its folder.
    """
    if not isinstance(name, str) or not name:
        return "is empty"
    if name in (".", ".."):
        return "refers to a folder itself or its parent"
    if "/" in name or "\\" in name:
        return "holds a path separator ('/' or '\\')"
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        return "holds a control character"
    return None


def relative_path_problem(relative: str) -> str | None:
    """Why a '/'-separated path made of such names (a run's '<hook>/<arch>-<width>', a Hub subfolder) cannot lead
    inside a folder, or None when it can: every part must pass `name_problem`."""
    return next((f"has a part {part!r} that {why}" for part in relative.split("/") if (why := name_problem(part))),
                None)


def inside(folder: str | Path, relative: str, what: str) -> Path:
    """`folder / relative` after checking `relative` with `relative_path_problem` and that no link leads the result
    out of `folder`: how every write joins names read from files or settings."""
    if problem := relative_path_problem(relative):
        raise SaelabError(f"{what} {relative!r} cannot be a path inside {folder}: it {problem}")
    path = Path(folder).joinpath(*relative.split("/"))
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise SaelabError(f"{path} leads outside {folder} through a link; remove the link or choose another folder")
    return path


def check_schema_version(record: dict, supported: int, what: str) -> None:
    """Refuse a saved JSON record (metrics, probe or matching results) written by a newer saelab than this one."""
    from saelab.version import __version__

    version = record.get("schema_version")
    if not isinstance(version, int) or version > supported:
        raise ValueError(f"{what} schema_version {version!r} is not one this saelab ({__version__}) reads (it reads "
                         f"up to {supported}); upgrade saelab")


def safetensors_bytes(tensors: dict, metadata: dict[str, str] | None = None) -> bytes:
    """safetensors.torch.save with the header's keys sorted, so the same tensors always give the same bytes.

    safetensors writes `metadata` from a hash map whose order changes from call to call: two runs of one cache command
    gave identical tensors but different files, and caches could not be compared by SHA-256.
    """
    from safetensors.torch import save

    payload = save(tensors, metadata=metadata)
    length = int.from_bytes(payload[:8], "little")
    header = json.dumps(json.loads(payload[8:8 + length]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the tensor data starts 8-byte aligned, as safetensors writes it
    return len(header).to_bytes(8, "little") + header + payload[8 + length:]


def without_local_paths(value):
    """`value` (a string, or parsed JSON) with every absolute local path in it reduced to its last name
    ('/home/ana/texts/diary.txt' -> 'diary.txt', also '~/...' and 'C:\\Users\\...').

    For what saelab publishes: it must not say where a user keeps files, nor their user name. Local records keep
    the full paths; a text's SHA-256 beside its name still identifies it.
    """
    if isinstance(value, dict):
        return {key: without_local_paths(item) for key, item in value.items()}
    if isinstance(value, list):
        return [without_local_paths(item) for item in value]
    if isinstance(value, str) and (posixpath.isabs(value) or ntpath.isabs(value) or value.startswith("~")):
        return PureWindowsPath(value).name  # splits at '/' and '\'
    return value
