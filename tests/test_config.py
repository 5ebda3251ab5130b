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


# --------------------------------------------------------------------------- YAML booleans


def test_mixed_precision_no_is_accepted_as_override_and_in_a_file(tmp_path):
    # YAML 1.1 reads a bare `no` as False; it is the value the README documents.
    assert load_config(overrides=["train.mixed_precision=no"]).train.mixed_precision == "no"
    path = tmp_path / "precision.yaml"
    path.write_text("train:\n  mixed_precision: no\n")
    assert load_config(path).train.mixed_precision == "no"
    # The resolved config writes it back quoted, so a saved run reloads the same.
    saved = tmp_path / "saved.yaml"
    saved.write_text(to_yaml(load_config(path)))
    assert load_config(saved).train.mixed_precision == "no"


def test_resume_no_means_no_resume(tmp_path):
    assert load_config(overrides=["resume=auto", "resume=no"]).resume is None
    path = tmp_path / "resume.yaml"
    path.write_text("resume: off\n")
    assert load_config(path).resume is None


def test_eval_shards_no_means_no_eval_shards():
    assert (
        load_config(overrides=["data.eval_shards=a.tar", "data.eval_shards=no"]).data.eval_shards
        is None
    )


@pytest.mark.parametrize(
    "override",
    [
        "train.mixed_precision=yes",
        "run.dir=on",
        "distributed.on_mismatch=off",
        "data.train_shards=no",
    ],
)
def test_a_boolean_where_a_string_is_expected_is_refused_naming_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"'{key}' takes a string.*boolean.*quote it"):
        load_config(overrides=[override])


def test_a_boolean_string_key_in_a_file_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  arch: yes\n")
    with pytest.raises(ConfigError, match=r"model\.arch' takes a string") as err:
        load_config(path)
    assert str(path) in str(err.value)


def test_fp16_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"train\.mixed_precision must be one of 'auto', 'no'"):
        load_config(overrides=["train.mixed_precision=fp16"])


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("logging.every=0", r"logging\.every must be >= 1, got 0"),
        ("logging.image_every=-1", r"logging\.image_every must be >= 0"),
        ("logging.num_images=-1", r"logging\.num_images must be >= 0"),
        ("logging.eval_every=-5", r"logging\.eval_every must be >= 0 \(0: evaluate only"),
        ("logging.eval_batches=-1", r"logging\.eval_batches must be >= 0"),
        ("checkpoint.every=-1", r"checkpoint\.every must be >= 0 \(0: only at the end\)"),
        ("checkpoint.keep_last=-1", r"checkpoint\.keep_last must be >= 0"),
        ("distributed.check_every=-1", r"distributed\.check_every must be >= 0"),
        ("train.max_steps=0", r"train\.max_steps must be >= 1"),
        ("train.warmup_steps=-1", r"train\.warmup_steps must be >= 0"),
        ("train.batch_size=0", r"train\.batch_size must be >= 1"),
        ("train.grad_accum_steps=0", r"train\.grad_accum_steps must be >= 1"),
        ("train.lr=0", r"train\.lr must be > 0"),
        ("train.lr=nan", r"train\.lr must be > 0, got nan"),
        ("train.min_lr_ratio=1.5", r"train\.min_lr_ratio must be in \[0, 1\]"),
        ("train.betas=[0.9]", r"train\.betas must be two values"),
        ("train.betas=[0.9,1.0]", r"train\.betas must be two values"),
        ("train.weight_decay=-0.1", r"train\.weight_decay must be >= 0"),
        ("train.grad_clip=-1", r"train\.grad_clip must be >= 0"),
        ("data.num_workers=-1", r"data\.num_workers must be >= 0"),
        ("data.shuffle_buffer=-1", r"data\.shuffle_buffer must be >= 0"),
        ("data.prefetch_factor=0", r"data\.prefetch_factor must be >= 1"),
        ("data.resolution=0", r"data\.resolution must be >= 1"),
        ("run.seed=-1", r"run\.seed must be >= 0"),
        ("model.channels=[]", r"model\.channels must be a non-empty list"),
        ("model.channels=[8,0]", r"model\.channels must be a non-empty list"),
        ("model.num_res_blocks=-1", r"model\.num_res_blocks must be >= 0"),
        ("model.res_channels=0", r"model\.res_channels must be >= 1"),
        ("quantizer.codebook_size=0", r"quantizer\.codebook_size must be >= 1"),
        ("quantizer.ema_decay=1.0", r"quantizer\.ema_decay must be in \(0, 1\)"),
        ("quantizer.ema_epsilon=0", r"quantizer\.ema_epsilon must be > 0"),
        ("quantizer.kmeans_iters=0", r"quantizer\.kmeans_iters must be >= 1"),
        ("quantizer.restart_unused_steps=-1", r"quantizer\.restart_unused_steps must be >= 0"),
        ("quantizer.search_chunk=-1", r"quantizer\.search_chunk must be >= 0"),
        ("quantizer.ivf_nprobe=0", r"quantizer\.ivf_nprobe must be >= 1"),
        ("quantizer.ivf_rebuild_every=-1", r"quantizer\.ivf_rebuild_every must be >= 0"),
        ("quantizer.init=zeros", r"quantizer\.init must be one of 'random', 'data', 'kmeans'"),
        ("distributed.on_mismatch=ignore", r"distributed\.on_mismatch must be one of"),
    ],
)
def test_out_of_range_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs/demo.yaml", overrides=[override])


def test_zero_means_off_where_documented():
    cfg = load_config(
        overrides=[
            "logging.eval_every=0",
            "logging.image_every=0",
            "checkpoint.every=0",
            "checkpoint.keep_last=0",
            "distributed.check_every=0",
            "data.num_workers=0",
            "data.shuffle_buffer=0",
            "train.warmup_steps=0",
        ]
    )
    assert (cfg.checkpoint.every, cfg.logging.eval_every, cfg.data.num_workers) == (0, 0, 0)


def test_shipped_configs_name_shards_where_make_shards_writes_them():
    # make_shards --input writes OUTPUT/000000.tar ...; --sample-images writes
    # OUTPUT/train/... and OUTPUT/eval/...: a shipped pattern names such a folder.
    paper = load_config(ROOT / "configs/vqvae_paper.yaml")
    assert paper.data.train_shards == "data/imagenet/train/*.tar"
    assert paper.data.eval_shards is None  # optional: set it to your held-out shards
    demo = load_config(ROOT / "configs/demo.yaml")
    assert demo.data.train_shards == "data/demo/train/{000000..000007}.tar"
    assert demo.data.eval_shards == "data/demo/eval/{000000..000001}.tar"


def test_train_task_is_one_the_loop_can_build():
    from tokenizer.config import TASKS
    from tokenizer.training.tasks import task_names

    assert list(TASKS) == task_names()
    with pytest.raises(ConfigError, match="train.task"):
        load_config(overrides=["train.task=gan"])
