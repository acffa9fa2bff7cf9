"""Strict configs: schema defaults <- YAML (with _base_) <- key=value overrides; typos name the nearest key."""

from dataclasses import dataclass, field

import pytest

from dinoforge.config import ConfigError, load_config, save_config


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 0.04
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class RunConfig:
    name: str = "demo"
    epochs: int = 10
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: list[int] = field(default_factory=lambda: [224, 98])


def test_defaults_file_and_overrides_merge_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 20\noptim:\n  lr: 0.01\n")
    cfg = load_config(RunConfig, path, ["optim.weight_decay=0.1", "name=big"])
    assert isinstance(cfg, RunConfig) and isinstance(cfg.optim, OptimConfig)
    assert (cfg.name, cfg.epochs, cfg.optim.lr, cfg.optim.weight_decay) == ("big", 20, 0.01, 0.1)
    assert cfg.crops == [224, 98] and cfg.optim.betas == (0.9, 0.999)


def test_unknown_key_in_file_names_key_and_nearest(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  weight_decy: 0.1\n")
    expected = r"unknown config key 'optim\.weight_decy'.*did you mean 'optim\.weight_decay'"
    with pytest.raises(ConfigError, match=expected):
        load_config(RunConfig, path)


def test_unknown_override_names_key_and_nearest():
    with pytest.raises(ConfigError, match=r"command-line overrides: unknown config key 'epoch'.*'epochs'"):
        load_config(RunConfig, None, ["epoch=3"])


def test_bad_value_type_and_malformed_override():
    with pytest.raises(ConfigError, match=r"bad value for key 'epochs'"):
        load_config(RunConfig, None, ["epochs=many"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(RunConfig, None, ["epochs"])


def test_base_chain_and_missing_file(tmp_path):
    (tmp_path / "base.yaml").write_text("epochs: 5\noptim:\n  lr: 0.5\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\noptim:\n  lr: 0.25\n")
    cfg = load_config(RunConfig, tmp_path / "child.yaml")
    assert (cfg.epochs, cfg.optim.lr) == (5, 0.25)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(RunConfig, tmp_path / "nope.yaml")
    (tmp_path / "loop.yaml").write_text("_base_: loop.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(RunConfig, tmp_path / "loop.yaml")


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(RunConfig, None, ["optim.lr=0.125", "crops=[256,112]"])
    path = save_config(cfg, tmp_path / "run")
    assert path == tmp_path / "run" / "config.yaml"
    assert load_config(RunConfig, path) == cfg


@dataclass
class NeedsData:
    dataset: str = "???"
    optim: OptimConfig = field(default_factory=OptimConfig)


def test_missing_required_value_names_the_full_key():
    with pytest.raises(ConfigError, match=r"not set: dataset.*dataset=\.\.\."):
        load_config(NeedsData)
    assert load_config(NeedsData, None, ["dataset=/data"]).dataset == "/data"


@dataclass
class SourceEntry:
    path: str = ""
    kind: str = "auto"
    name: str = ""


@dataclass
class WithLists:
    name: str = "demo"
    sources: list[SourceEntry] = field(default_factory=list)
    extra: OptimConfig | None = None


def test_typo_inside_a_list_entry_names_its_full_path_and_the_entry_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("sources:\n  - {path: /a}\n  - {pth: /b}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'sources\[1\]\.pth'; did you mean 'sources\[1\]\.path'"):
        load_config(WithLists, path)
    with pytest.raises(ConfigError, match=r"'sources\[0\]\.zzz'; valid keys here: kind, name, path$"):
        load_config(WithLists, None, ["sources=[{zzz: 1}]"])
    with pytest.raises(ConfigError, match=r"'extra\.lrr'; did you mean 'extra\.lr'"):
        load_config(WithLists, None, ["extra={lrr: 1}"])
