"""SAEBench's output layout, so its plotting and leaderboard tools read saelab's evals as their own.

One JSON per eval per SAE, `<sae folder>/evals/<eval_type_id>.json`:
    eval_type_id, eval_config, eval_id, datetime_epoch_millis,
    eval_result_metrics      {category: {metric: number}}   flat per category, SAEBench's own names
    eval_result_details      [ {...} ]                       per item (letter, dataset, feature)
    eval_result_unstructured {"saelab": {...}}               what SAEBench has no field for: the intervals
    sae_bench_commit_hash, sae_lens_id, sae_lens_release_id, sae_lens_version, sae_cfg_dict

Intervals go to eval_result_unstructured["saelab"]["intervals"] as {"category.metric": Interval fields}, so the
structured metrics stay exactly what SAEBench's schema expects.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

from saelab.evals.intervals import Interval
from saelab.version import __version__

FOLDER = "evals"
"""Where beside an SAE (its folder) the eval files go: `push` publishes them with the SAE."""
SAEBENCH_COMMIT = "n/a (saelab)"
"""sae_bench_commit_hash: these numbers were not made by SAEBench's code; this says so where its tools look."""


def _plain(value: Any) -> Any:
    """JSON-ready: dataclasses and tuples opened, non-finite floats as null (JSON has no NaN)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)  # a path, a dtype


def sae_identity(sae) -> dict[str, Any]:
    """The SAE's identity fields: SAELens ids when it came from a SAELens release, its SAELens-style cfg."""
    from saelab.hub.saelens import saelens_cfg

    cfg = sae.cfg
    try:
        cfg_dict = saelens_cfg(cfg)
    except Exception:  # an architecture SAELens has no name for: its saelab cfg says what it is
        cfg_dict = {key: value for key, value in cfg.to_dict().items()} if hasattr(cfg, "to_dict") else {}
    return {"sae_bench_commit_hash": SAEBENCH_COMMIT, "sae_lens_id": getattr(cfg, "saelens_id", None),
            "sae_lens_release_id": getattr(cfg, "saelens_release", None), "sae_lens_version": None,
            "sae_cfg_dict": _plain(cfg_dict)}


def saebench_output(eval_type_id: str, config: Any, metrics: dict[str, dict[str, Any]], sae, *,
                    details: list[dict[str, Any]] | None = None,
                    intervals: dict[str, Interval] | None = None, extra: dict[str, Any] | None = None) -> dict:
    """One eval's record in SAEBench's layout. `config` is the eval's config (a dataclass or dict); `intervals` maps
    "category.metric" to its Interval; `extra` is anything else saelab keeps (seconds, tokens, notes)."""
    for name in intervals or {}:
        category, _, metric = name.partition(".")
        if metric not in metrics.get(category, {}):
            raise KeyError(f"interval for {name!r}, which is not among the metrics")
    unstructured = {"saelab_version": __version__, **(extra or {}), "intervals": intervals or {}}
    record = {"eval_type_id": eval_type_id, "eval_config": config, "eval_id": str(uuid.uuid4()),
              "datetime_epoch_millis": int(time.time() * 1000), "eval_result_metrics": metrics,
              "eval_result_details": details or [], "eval_result_unstructured": {"saelab": unstructured},
              **sae_identity(sae)}
    return _plain(record)


def write_output(record: dict, folder: str | Path) -> Path:
    """Write `record` to <folder>/evals/<eval_type_id>.json (folder: the SAE's); returns the path."""
    from saelab.files import write_atomic

    path = Path(folder) / FOLDER / f"{record['eval_type_id']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(record, indent=1, allow_nan=False) + "\n").encode())
    return path


def read_intervals(record: dict) -> dict[str, Interval]:
    """The intervals a record carries, as Intervals again."""
    raw = record.get("eval_result_unstructured", {}).get("saelab", {}).get("intervals", {})
    def build(fields: dict) -> Interval:  # null was a NaN where a number is required; elsewhere it was None
        return Interval(**{k: math.nan if v is None and k in ("estimate", "low", "high") else v
                           for k, v in fields.items()})

    return {name: build(fields) for name, fields in raw.items()}


def read_outputs(folder: str | Path) -> dict[str, dict]:
    """Every eval record beside an SAE: {eval_type_id: record}."""
    found = sorted((Path(folder) / FOLDER).glob("*.json"))
    return {path.stem: json.loads(path.read_text()) for path in found}
