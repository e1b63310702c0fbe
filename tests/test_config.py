"""The flat-key configuration: round trips, TOML files, --set overrides and type errors."""

from __future__ import annotations

import re

import pytest

from fedqc.config import Config, _coerce, load_config
from fedqc.errors import FedqcError
from fedqc.files import cache_dir


def _custom() -> Config:
    cfg = Config()
    cfg.model.name = 'C:\\models\\my "tiny" model'
    cfg.model.max_length = 64
    cfg.quality.scorer = "ifd"
    cfg.quality.rule = "anchor-quantile:0.1"
    cfg.train.lr = 1e-5
    cfg.train.rounds = 7
    cfg.federation.timeout = 12.5
    cfg.data.contamination = "0.2"
    return cfg


def test_flat_round_trip():
    cfg = _custom()
    flat = cfg.to_flat()
    assert flat["train.local-steps"] == 5 and flat["model.max-length"] == 64
    assert all("_" not in key for key in flat)
    assert Config.from_flat(flat) == cfg
    assert Config.from_flat({}) == Config()


def test_replace_changes_only_given_keys():
    cfg = _custom()
    new = cfg.replace(**{"train.rounds": 2})
    assert new.train.rounds == 2 and cfg.train.rounds == 7
    assert new.to_flat() == {**cfg.to_flat(), "train.rounds": 2}


def test_toml_file_then_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nname = "tiny"\nmax-length = 96\n\n'
        '[quality]\nscorer = "ira"\n\n[train]\nlr = 0.01\nrounds = 4\n'
    )
    cfg = load_config(path, ["train.rounds=9", " quality.rule = fixed:3 ", "train.lr=1e-3"])
    assert cfg.model.name == "tiny" and cfg.model.max_length == 96
    assert cfg.quality.scorer == "ira" and cfg.quality.rule == "fixed:3"
    assert cfg.train.rounds == 9 and cfg.train.lr == 1e-3
    assert cfg.train.local_steps == Config().train.local_steps  # untouched default


def test_strings_are_coerced_to_field_types():
    cfg = load_config(
        None,
        [
            "train.rounds=3",
            "train.lr=0.5",
            "federation.timeout=10",
            "data.seed=-2",
            "model.name=42",
        ],
    )
    assert cfg.train.rounds == 3 and isinstance(cfg.train.rounds, int)
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.federation.timeout == 10.0 and isinstance(cfg.federation.timeout, float)
    assert cfg.data.seed == -2
    assert cfg.model.name == "42"
    # Flower's run config may give an integral float for an int field, and an int for a float
    cfg = Config.from_flat({"train.rounds": 2.0, "train.lr": 1})
    assert cfg.train.rounds == 2 and isinstance(cfg.train.rounds, int)
    assert isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "text,value",
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("false", False),
        ("FALSE", False),
        ("0", False),
    ],
)
def test_bool_coercion(text, value):
    assert _coerce(text, bool, "x.flag", "--set") is value


def test_bool_coercion_rejects_other_words():
    with pytest.raises(FedqcError, match="'x.flag' must be of type bool"):
        _coerce("yes", bool, "x.flag", "--set")


@pytest.mark.parametrize("key", ["train.nope", "nope.rounds", "rounds", "train.", "to_flat.x"])
def test_unknown_key_is_named(key):
    with pytest.raises(FedqcError, match=re.escape(f"--set: unknown config key '{key}'")) as info:
        load_config(None, [f"{key}=1"])
    assert "train.local-steps" in str(info.value)  # lists the known keys


@pytest.mark.parametrize(
    "item,key",
    [
        ("train.rounds=three", "train.rounds"),
        ("train.rounds=2.5", "train.rounds"),
        ("train.lr=fast", "train.lr"),
    ],
)
def test_bad_type_is_named(item, key):
    with pytest.raises(FedqcError, match=f"'{key}' must be of type"):
        load_config(None, [item])


def test_bad_type_in_file_names_the_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nrounds = 2.5\n")
    with pytest.raises(FedqcError, match=f"{path}: 'train.rounds' must be of type int"):
        load_config(path)


def test_override_without_equals():
    with pytest.raises(FedqcError, match="expected key=value"):
        load_config(None, ["train.rounds"])


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[train\nrounds = 1\n", "not valid TOML"),
        ('title = "x"\n', "must be a [section]"),
        ("[train]\nrounds_per_day = 1\n", "unknown config key 'train.rounds_per_day'"),
    ],
)
def test_bad_files(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(FedqcError, match=re.escape(fragment)):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(FedqcError, match="config file not found"):
        load_config(tmp_path / "none.toml")


def test_to_toml_reloads_to_the_same_config(tmp_path):
    cfg = _custom()
    path = tmp_path / "out.toml"
    path.write_text(cfg.to_toml(), encoding="utf-8")
    assert load_config(path) == cfg
    assert load_config(path, []).to_toml() == cfg.to_toml()


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch, tmp_path):
    # FEDQC_CACHE= (set but empty) must not put converted models in the working directory
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("FEDQC_CACHE", "")
    assert cache_dir() == tmp_path / ".cache" / "fedqc"
    monkeypatch.setenv("FEDQC_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


@pytest.mark.parametrize(
    "key,value",
    [
        ("train.strategy", "fedsgd"),
        ("train.strategy", "fedprox:-1"),
        ("train.strategy", "fedprox"),
        ("train.strategy", "krum:x"),
        ("train.strategy", "krum:1.5"),
        ("train.strategy", "fedtrimmedavg:0.7"),
        ("train.strategy", "fedtrimmedavg:0.5"),
        ("train.strategy", "fedavgm:1"),
        ("train.strategy", "fedadam:-0.1"),
        ("train.aggregation", "median"),
        ("train.aggregation", "merge:ties"),
        ("train.aggregation", "merge:ties:0"),
        ("train.aggregation", "merge:dare-ties:1.5"),
        ("train.aggregation", "merge:task-arithmetic:0.5"),
    ],
)
def test_bad_strategy_and_aggregation_values_are_named(key, value):
    with pytest.raises(FedqcError, match=f"--set: '{key}' must be one of .*got '{value}'"):
        load_config(None, [f"{key}={value}"])


@pytest.mark.parametrize(
    "item",
    [
        "train.strategy=fedprox:0.01",
        "train.strategy=fedprox:1e-3",
        "train.strategy=fedavgm:0.9",
        "train.strategy=fedadam",
        "train.strategy=fedyogi:0.01",
        "train.strategy=fedtrimmedavg:0.2",
        "train.strategy=krum:1",
        "train.aggregation=merge:ties:0.5",
        "train.aggregation=merge:dare-ties:1",
        "train.aggregation=merge:task-arithmetic",
    ],
)
def test_good_strategy_and_aggregation_values_are_kept(item):
    key, value = item.split("=")
    assert load_config(None, [item]).to_flat()[key] == value
