"""Reading a config file: its TOML table, relative input paths taken from the file's folder, dotted overrides
applied, then validated (`condiff.config.validation`)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from condiff.config.schema import ConfigError
from condiff.config.validation import ExperimentConfig, config_from_dict, resolve_input_paths


def read_config_table(path: str | Path, overrides: dict | None = None) -> dict:
    """The TOML table of a config file with dotted `overrides` applied, not yet validated."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        table = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    try:
        resolve_input_paths(table, path.resolve().parent)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    for dotted, value in (overrides or {}).items():
        *parents, leaf = dotted.split(".")
        node = table
        for depth, key in enumerate(parents):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path}: {dotted}: {'.'.join(parents[:depth + 1])} is not a table")
        node[leaf] = value
    return table


def load_config(path: str | Path, overrides: dict | None = None) -> ExperimentConfig:
    """Read and validate a TOML experiment config (optionally with nested overrides applied). The files
    it names are checked where they are used (`condiff.lifecycle.build.check_inputs`)."""
    return config_from_dict(read_config_table(path, overrides), str(path))
