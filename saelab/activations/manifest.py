"""The on-disk layout of an activation cache: a manifest.json beside numbered safetensors shards.

Shard i always holds contexts [i * shard_contexts, (i + 1) * shard_contexts) of the run's deterministic context
stream, so any missing or damaged shard can be recomputed on its own. Each shard file holds, for its contexts:
  acts.<hook>  [rows, d]   activations of every kept position (BOS / padding dropped as the run asked)
  tokens       [contexts, context_len] int32   all token ids, for showing the text behind an activation
  positions    [rows] int32   flat index into `tokens` of each row
Files are written to a temporary name, fsynced and renamed; the manifest is replaced the same way after each
shard, so a run killed at any moment (even kill -9) leaves only whole, listed shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saelab.errors import CacheError

MANIFEST = "manifest.json"
FORMAT = "saelab-activations"
VERSION = 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


@dataclass
class ShardRecord:
    index: int
    file: str
    contexts: int
    rows: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    """What a cache holds. `run` identifies the run: resuming with a different one is refused."""

    run: dict
    hooks: dict[str, dict]  # hook -> {"d": int, "shape": [...]}
    dtype: str
    context_len: int
    shard_contexts: int
    target_contexts: int
    shards: list[ShardRecord] = field(default_factory=list)
    exhausted_at: int | None = None  # the text ran out after this many contexts
    format: str = FORMAT
    version: int = VERSION
    saelab_version: str = ""

    @property
    def n_contexts(self) -> int:
        """Contexts the finished cache will hold: the target, or fewer if the text ran out."""
        return self.target_contexts if self.exhausted_at is None else min(self.target_contexts, self.exhausted_at)

    @property
    def n_shards(self) -> int:
        return -(-self.n_contexts // self.shard_contexts)

    def expected_contexts(self, index: int) -> int:
        return max(0, min(self.shard_contexts, self.n_contexts - index * self.shard_contexts))

    @property
    def tokens(self) -> int:
        """Activation rows (token positions) held so far."""
        return sum(s.rows for s in self.shards)

    @property
    def complete(self) -> bool:
        done = {s.index for s in self.shards if s.contexts == self.expected_contexts(s.index)}
        return done >= set(range(self.n_shards))

    def to_json(self) -> str:
        data = asdict(self)
        data["tokens"] = self.tokens
        data["complete"] = self.complete
        return json.dumps(data, indent=1)

    @classmethod
    def read(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST
        if not path.exists():
            raise CacheError(f"{folder} is not an activation cache (no {MANIFEST})")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise CacheError(f"{path} is corrupt ({error.msg}); re-run the cache command to rebuild it") from None
        if data.get("format") != FORMAT:
            raise CacheError(f"{path} is not a saelab activation manifest (format={data.get('format')!r})")
        if data.get("version", 0) > VERSION:
            raise CacheError(f"{path} has format version {data['version']}; this saelab reads up to {VERSION}")
        data.pop("tokens", None)
        data.pop("complete", None)
        data["shards"] = [ShardRecord(**s) for s in data["shards"]]
        return cls(**data)

    def write(self, folder: Path) -> None:
        write_atomic(Path(folder) / MANIFEST, self.to_json().encode())


def write_atomic(path: Path, payload: bytes) -> None:
    """Write via a temporary file, fsync, rename, fsync the folder: readers see the old file or the new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(folder: Path, record: ShardRecord, *, checksum: bool = True) -> None:
    """Raise CacheError naming the file if it is missing, truncated or corrupt."""
    path = Path(folder) / record.file
    repair = "re-run the same `saelab cache` command to recompute it"
    if not path.exists():
        raise CacheError(f"shard {path} is missing; {repair}")
    size = path.stat().st_size
    if size != record.bytes:
        raise CacheError(f"shard {path} is truncated or damaged: {size} bytes, the manifest says {record.bytes}; {repair}")
    if checksum and file_sha256(path) != record.sha256:
        raise CacheError(f"shard {path} is corrupt: its SHA-256 does not match the manifest; {repair}")
