"""A `saelab train` run described in a YAML or JSON file, read strictly: an unknown key is refused naming the valid
ones, and a key given twice is refused naming it (parsers would keep the last one silently)."""

from __future__ import annotations

from pathlib import Path

from saelab.options import SettingError, check_keys

RUN_KEYS = ["acts", "model", "hooks", "text", "out", "eval_tokens", "join", "train", "saes"]
"""Top-level keys of a YAML / JSON run file."""


def load_config_file(path: str | None) -> dict:
    """A run described in YAML or JSON (keys: RUN_KEYS); unknown keys are refused, naming the valid ones."""
    if path is None:
        return {}
    import json

    import yaml

    text = Path(path).read_text()
    try:
        data = (json.loads(text, object_pairs_hook=lambda pairs: _unique_keys(pairs, path)) if path.endswith(".json")
                else _load_yaml(text, path))
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SettingError(f"{path} is not valid {'JSON' if path.endswith('.json') else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise SettingError(f"{path} must hold a mapping with keys {', '.join(RUN_KEYS)}")
    check_keys(data, RUN_KEYS, path)
    return data


def _unique_keys(pairs: list[tuple], where: str) -> dict:
    """A JSON object from its (key, value) pairs, refusing a key given twice (see _duplicate_key)."""
    mapping: dict = {}
    for key, value in pairs:
        if key in mapping:
            raise _duplicate_key(key, where)
        mapping[key] = value
    return mapping


def _load_yaml(text: str, path: str):
    """yaml.safe_load, but a key given twice in one mapping is refused, naming it and its line."""
    from collections.abc import Hashable

    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<` merges are overrides by design
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, Hashable):
                    continue  # PyYAML's own error says so
                if key in seen:
                    raise _duplicate_key(key, f"{path}, line {key_node.start_mark.line + 1}")
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _duplicate_key(key, where: str) -> SettingError:
    """JSON and YAML parsers keep the last of two equal keys silently: the run would use a setting its author
    did not see, so it is refused instead."""
    return SettingError(f"{where}: the key {key!r} is given twice in one mapping; keep one of them")
