"""Strict configs: dataclass schemas <- YAML files <- `key=value` overrides, through OmegaConf.

Every stage (curate, pretrain, evaluation, slurm) describes its options as dataclasses beside the code they
configure and loads them here. A key that the schema does not know is an error naming the key and the
nearest valid one; the resolved config is written into the run directory.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import is_dataclass
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from dinoforge.atomic import atomic_write_text

T = TypeVar("T")

BASE_KEY = "_base_"  # a YAML file may start from another one: `_base_: vits14.yaml` (path relative to the file)


class ConfigError(ValueError):
    """A config file or override does not fit its schema; the message says which key and what to do."""


def load_config(schema: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from its defaults, the YAML file at `path` and `key=value` overrides."""
    if not is_dataclass(schema):
        raise TypeError(f"config schema must be a dataclass type, got {schema!r}")
    cfg = OmegaConf.structured(schema)
    OmegaConf.set_struct(cfg, True)
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        layers += [(str(p), OmegaConf.create(d)) for p, d in _read_yaml_chain(Path(path))]
    if overrides:
        layers.append(("command-line overrides", _parse_overrides(overrides)))
    for origin, layer in layers:
        cfg = _merge_strict(cfg, layer, origin)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"required config value(s) not set: {', '.join(missing)}; set them in the YAML file or on "
                          f"the command line ({example})")
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as err:  # e.g. a required field (MISSING) left unset
        raise ConfigError(f"incomplete config: {_describe(err)}") from None


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config to `run_dir/name` (created if needed) and return the path.

    Written aside and renamed: the processes of a job (array tasks, ranks) may all save it at the same moment.
    """
    return atomic_write_text(Path(run_dir) / name, to_yaml(cfg))


def to_yaml(cfg: Any) -> str:
    """The YAML text of a config dataclass (or DictConfig)."""
    node = cfg if isinstance(cfg, DictConfig) else OmegaConf.structured(cfg)
    return OmegaConf.to_yaml(node, resolve=True)


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[Path, dict]]:
    """The YAML at `path` preceded by its `_base_` files, oldest first."""
    path = path.expanduser().resolve()
    if path in seen:
        raise ConfigError(f"{path}: `{BASE_KEY}` chain loops back to itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of keys, got {type(data).__name__}")
    base = data.pop(BASE_KEY, None)
    chain = _read_yaml_chain(path.parent / base, (*seen, path)) if base else []
    return [*chain, (path, data)]


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)")
    return OmegaConf.from_dotlist(list(overrides))


def _merge_strict(cfg: DictConfig, layer: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, layer)  # type: ignore[return-value]
    except (ConfigKeyError, ConfigAttributeError) as err:
        # OmegaConf reports a key inside a list item without its path ('pth', not 'sources[0].pth'): find it ourselves.
        found = _unknown_key(OmegaConf.get_type(cfg), OmegaConf.to_container(layer))
        if found is None:
            raise ConfigError(f"{origin}: unknown config key {_full_key(err)!r}") from None
        key, valid = found
        raise ConfigError(f"{origin}: unknown config key {key!r}{_suggest(key, valid)}") from None
    except ValidationError as err:
        raise ConfigError(f"{origin}: bad value for key {_full_key(err)!r}: {_describe(err)}") from None


def _full_key(err: OmegaConfBaseException) -> str:
    return str(getattr(err, "full_key", None) or getattr(err, "key", None) or "?")


def _unknown_key(schema: Any, value: Any, path: str = "") -> tuple[str, list[str]] | None:
    """(full path such as 'sources[0].pth', the valid keys there) of the first key of `value` that the dataclass
    type `schema` does not have, looking through nested dataclasses, lists of them and optional ones."""
    if is_dataclass(schema) and isinstance(value, dict):
        fields = get_type_hints(schema)
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if key not in fields:
                return where, sorted(fields)
            if found := _unknown_key(fields[key], item, where):
                return found
    elif get_origin(schema) is list and isinstance(value, list):
        (item_type,) = get_args(schema)
        for i, item in enumerate(value):
            if found := _unknown_key(item_type, item, f"{path}[{i}]"):
                return found
    else:  # `X | None`: the dataclass alternative
        for option in get_args(schema):
            if is_dataclass(option):
                return _unknown_key(option, value, path)
    return None


def _suggest(key: str, valid: list[str]) -> str:
    """'; did you mean ...?' with the nearest valid key at the level where `key` went wrong."""
    parent, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.5)
    if close:
        return f"; did you mean {(f'{parent}.' if parent else '') + close[0]!r}?"
    return f"; valid keys here: {', '.join(valid)}"


def _describe(err: OmegaConfBaseException) -> str:
    return str(err).split("\n")[0]
