"""Config: YAML + overrides merge onto typed defaults; typos and wrong types are refused."""

from pathlib import Path

import pytest

from tokenizer.config import Config, ConfigError, from_dict, load_config, to_dict, to_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_every_shipped_config_loads():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert isinstance(cfg, Config), path


def test_overrides_win_and_are_typed(tmp_path):
    cfg = load_config(
        ROOT / "configs/demo.yaml",
        overrides=[
            "train.max_steps=7",
            "quantizer.codebook_size=1024",
            "quantizer.ema=false",
            "data.train_shards=[a.tar,b.tar]",
            "resume=null",
            "model.channels=[8,16,32]",
        ],
    )
    assert cfg.train.max_steps == 7
    assert cfg.quantizer.codebook_size == 1024
    assert cfg.quantizer.ema is False
    assert cfg.data.train_shards == ["a.tar", "b.tar"]
    assert cfg.resume is None
    assert cfg.model.channels == [8, 16, 32]


def test_fixed_user_facing_keys_exist():
    cfg = load_config(
        overrides=[
            "run.dir=x",
            "run.seed=3",
            "train.max_steps=1",
            "train.batch_size=2",
            "data.train_shards=a",
            "data.eval_shards=b",
            "data.resolution=32",
            "quantizer.codebook_size=8",
            "quantizer.code_dim=4",
            "quantizer.ema=true",
            "quantizer.search=torch",
            "checkpoint.every=5",
            "resume=auto",
        ]
    )
    assert (cfg.run.dir, cfg.run.seed, cfg.resume) == ("x", 3, "auto")


def test_unknown_key_in_yaml_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 10\n")
    with pytest.raises(ConfigError, match=r"train\.max_stepz") as err:
        load_config(bad)
    assert str(bad) in str(err.value)


def test_unknown_override_key_is_refused():
    with pytest.raises(ConfigError, match=r"quantizer\.codebook_sise"):
        load_config(overrides=["quantizer.codebook_sise=10"])


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        load_config(overrides=["train.batch_size=lots"])
    with pytest.raises(ConfigError, match=r"quantizer\.ema"):
        load_config(overrides=["quantizer.ema=maybe"])


def test_malformed_override_and_missing_file():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["train.max_steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/config.yaml")


def test_semantic_checks():
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(overrides=["train.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config(overrides=["data.resolution=30", "model.channels=[8,8]"])


def test_yaml_and_dict_round_trip(tmp_path):
    cfg = load_config(ROOT / "configs/demo.yaml", overrides=["train.max_steps=3"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert load_config(saved) == cfg
    assert from_dict(to_dict(cfg)) == cfg
