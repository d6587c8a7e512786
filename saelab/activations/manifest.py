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

import json
import re
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

from saelab.errors import CacheError
from saelab.options import SettingError, check_value, from_mapping
from saelab.files import file_sha256, name_problem, write_atomic

MANIFEST = "manifest.json"
REBUILD = ("rebuild the cache: rerun the `saelab cache` command that made it with --overwrite (overwrite=True), which "
           "deletes only its manifest and shards, or cache into another folder")
"""What to do about a manifest that cannot be read: rerunning without --overwrite would read it again."""
FORMAT = "saelab-activations"
VERSION = 1


SHARD_PATTERN = re.compile(r"shard_\d{5,}\.safetensors")


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def written_by_saelab(name: str) -> bool:
    """Whether a file name in a cache folder is one a cache run writes (what --overwrite may delete)."""
    name = name.removesuffix(".tmp")  # what write_atomic leaves behind if killed mid-write
    return name == MANIFEST or SHARD_PATTERN.fullmatch(name) is not None


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
            raise CacheError(f"{path} is corrupt ({error.msg}); {REBUILD}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: Path | str = "manifest") -> "Manifest":
        """A manifest from its parsed JSON (as read from `path`, or sent by another rank)."""
        if not isinstance(data, dict):
            raise CacheError(f"{path} must hold a JSON object, not a {type(data).__name__}; {REBUILD}")
        data = dict(data)
        if data.get("format") != FORMAT:
            raise CacheError(f"{path} is not a saelab activation manifest (format={data.get('format')!r})")
        if isinstance(data.get("version"), int) and data["version"] > VERSION:  # other types: refused below
            raise CacheError(f"{path} has format version {data['version']}; this saelab reads up to {VERSION}")
        data.pop("tokens", None)
        data.pop("complete", None)
        try:  # every field of its type, before anything reads one: a damaged manifest is a CacheError, not a traceback
            shards = [from_mapping(ShardRecord, s, f"shards[{i}]")
                      for i, s in enumerate(check_value(data.get("shards"), list[dict], "shards"))]
            manifest = from_mapping(cls, {**data, "shards": shards}, "manifest")
        except (SettingError, TypeError) as error:
            raise CacheError(f"{path} is damaged ({error}); {REBUILD}") from None
        _check_names(data, path)
        return manifest

    def write(self, folder: Path) -> None:
        write_atomic(Path(folder) / MANIFEST, self.to_json().encode())


def _check_names(data: dict, path: Path | str) -> None:
    """Refuse a manifest whose names would become paths outside the cache or the run reading it: hook names (a
    training run's SAE folders are named after them) must pass `name_problem`, shard files must be saelab's names."""
    hooks = [*data.get("hooks", {}), *data.get("run", {}).get("hooks", [])]
    for hook in hooks:
        if problem := name_problem(hook):
            raise CacheError(f"{path} names a hook {hook!r}, which {problem}: saelab writes model hook names only, so "
                             "the manifest was altered; rebuild the cache with `saelab cache` into a new folder")
    for shard in data.get("shards", []):
        index, file = shard.get("index"), shard.get("file")
        if not isinstance(index, int) or file != shard_name(index):
            raise CacheError(f"{path} lists shard {index!r} as the file {file!r}, not a name saelab writes "
                             f"(shard_NNNNN.safetensors for its index); rebuild the cache with `saelab cache` into a "
                             "new folder")


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


def cache_command(folder: str | Path, manifest: Manifest) -> str | None:
    """The `saelab cache` command that finishes or repairs this cache (its recorded settings as flags), so repair
    advice is a command to copy; None when the run used settings the command line cannot express."""
    run, text = manifest.run, manifest.run.get("text", {})
    python_only = {"split": "train", "config": None, "shuffle_window": 1024, "start": 0, "pack": True}
    if any(text.get(key, value) != value for key, value in python_only.items()) or "source" not in text:
        return None
    words = ["saelab", "cache", "--model", run["model"], "--hooks", ";".join(run["hooks"]), "--out", str(folder),
             "--tokens", str(manifest.target_contexts * manifest.context_len), "--text", text["source"],
             "--context-len", str(manifest.context_len), "--batch-size", str(run["batch_size"]),
             "--shard-tokens", str(manifest.shard_contexts * manifest.context_len), "--dtype", manifest.dtype]
    if text.get("field", "text") != "text":
        words += ["--field", text["field"]]
    if not text.get("prepend_bos", True):
        words.append("--no-bos")
    if text.get("seed") is not None:
        words += ["--seed", str(text["seed"])]
    if not run.get("drop_bos", True):
        words.append("--keep-bos")
    return shlex.join(words)
