"""train.task prior end to end in one process: index shards of a tiny tokenizer -> a
PixelCNN or transformer prior trained by the one loop -> held-out bits per code beside
the uniform and unigram baselines -> exact resume -> tools/sample_prior.py decoding the
samples; a two-grid index trains a hierarchy of priors; another tokenizer's codes are
refused."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenize_helpers import save_tiny_release, write_sources
from training_helpers import accelerate, losses, make_shards, metric_rows, write_config
from two_grid_model import two_grid_tokenizer

from tokenizer.config import ConfigError, load_config, to_yaml
from tokenizer.tokenize.corpus import TokenizeOptions, tokenize_corpus
from tokenizer.training.export import export_release
from tokenizer.training.loop import train
from tokenizer.training.prior_run import load_prior_run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# The trained tokenizer: 32 px, f=4, K=64 -> 8x8 codes. Untrained ones at 16 px: the
# refused "other" tokenizers and two_grid_model (2x2 top, 4x4 bottom).
RES = 16
PIXELCNN = ("prior.arch=pixelcnn", "prior.dim=16", "prior.layers=4", "prior.kernel_size=3")
TRANSFORMER = ("prior.arch=transformer", "prior.dim=32", "prior.layers=2", "prior.heads=2",
               "train.max_steps=80", "train.lr=2e-3", "checkpoint.every=40")  # fmt: skip


def _tokenize(release: Path, inputs: list[str], out: Path) -> Path:
    options = TokenizeOptions(
        str(release), inputs, str(out), batch_size=16, num_workers=0, progress=False
    )
    tokenize_corpus(options)
    return out


def _trained_release(root: Path) -> Path:
    """A tiny VQ-VAE trained 40 steps on 32 px ramps and squares, released: codes with
    structure a prior can learn (an untrained one maps nearly everything to one code)."""
    shards = make_shards(root / "shards")
    cfg = load_config(write_config(root, shards, root / "tok", "logging.image_every=0",
                                   "data.num_workers=0", "quantizer.init=data"))  # fmt: skip
    train(cfg)
    return export_release(root / "tok", root / "release").directory


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("prior")
    release = _trained_release(root)
    train_src = write_sources(root / "train_src", num_shards=3, per_shard=40, seed=1)
    eval_src = write_sources(root / "eval_src", num_shards=1, per_shard=40, seed=2)
    return {
        "root": root,
        "release": release,
        "train": _tokenize(release, train_src.paths, root / "train_index"),
        "eval": _tokenize(release, eval_src.paths, root / "eval_index"),
    }


def _cfg(world: dict, run_dir: Path, *extra: str):
    return load_config(
        overrides=[
            "train.task=prior",
            f"run.dir={run_dir}",
            "run.seed=3",
            f"data.train_index={world['train']}",
            f"data.eval_index={world['eval']}",
            "data.num_workers=0",
            "data.shuffle_buffer=16",
            "train.batch_size=8",
            "train.max_steps=30",
            "train.lr=3e-3",
            "train.warmup_steps=2",
            "logging.every=1",
            "logging.image_every=0",
            "logging.tensorboard=false",
            "logging.eval_batches=0",
            "checkpoint.every=10",
            "distributed.check_every=0",
            "resume=auto",
            *extra,
        ]
    )


# The PixelCNN run stops at step 15, at the end of an epoch (120 samples, batch 8); the
# transformer's mid-epoch (step 40).
@pytest.mark.parametrize(
    "arch", [(*PIXELCNN, "checkpoint.every=15"), TRANSFORMER], ids=["pixelcnn", "transformer"]
)
def test_a_prior_trains_evaluates_against_baselines_and_resumes_exactly(world, tmp_path, arch):
    straight = train(_cfg(world, tmp_path / "straight", *arch))
    metrics = straight.eval
    assert metrics is not None
    assert metrics["uniform_bits"] == pytest.approx(math.log2(64))
    # The codes have structure: a trained prior beats the context-free unigram baseline.
    assert metrics["bits_per_code"] < metrics["unigram_bits"] < metrics["uniform_bits"]
    first, last = losses(tmp_path / "straight", "bits_per_code")[1], metrics["bits_per_code"]
    assert last < first

    cfg = _cfg(world, tmp_path / "resumed", *arch)
    train(cfg, stop_after=cfg.checkpoint.every)
    resumed = train(cfg)
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, cfg.train.max_steps + 1))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    assert resumed.eval["bits_per_code"] == pytest.approx(metrics["bits_per_code"], rel=1e-5)


def test_sample_prior_decodes_samples_of_the_right_shape(world, tmp_path):
    spec = importlib.util.spec_from_file_location(
        "sample_prior", ROOT / "tools" / "sample_prior.py"
    )
    sample_prior = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sample_prior)
    run_dir = tmp_path / "run"
    train(_cfg(world, run_dir, *PIXELCNN, "train.max_steps=5", "data.eval_index=null"))
    record = json.loads((run_dir / "prior.json").read_text())
    assert record["grids"] == [{"name": "tokens", "codebook_size": 64, "shape": [8, 8]}]
    out = tmp_path / "samples.png"

    def sample(codes: Path) -> np.ndarray:
        argv = ["--prior", str(run_dir), "--tokenizer", str(world["release"]), "--n", "5",
                "--out", str(out), "--codes", str(codes), "--top-k", "8", "--seed", "1"]  # fmt: skip
        assert sample_prior.main(argv) == 0
        return np.load(codes)["tokens"]

    sampled = sample(tmp_path / "codes.npz")
    assert out.is_file()
    assert sampled.shape == (5, 8, 8) and sampled.min() >= 0 and sampled.max() < 64
    # Reproducible: the same seed, the same codes.
    np.testing.assert_array_equal(sample(tmp_path / "again.npz"), sampled)
    # Another tokenizer's release is refused.
    other = save_tiny_release(tmp_path / "other", seed=7, codebook_size=32, resolution=RES)
    assert sample_prior.main(["--prior", str(run_dir), "--tokenizer", str(other)]) == 2
    assert load_prior_run(run_dir).model.training is False
    with pytest.raises(ValueError, match="not a tokenizer: nothing to release"):
        export_release(run_dir, tmp_path / "release")
    # A prior release samples what the run samples, in a fresh process.
    release = tmp_path / "prior_release"
    script = ROOT / "tools" / "export_prior.py"
    subprocess.run([sys.executable, str(script), "--run", str(run_dir), "--output",
                    str(release)], check=True, cwd=ROOT)  # fmt: skip
    fresh = tmp_path / "fresh.npz"
    subprocess.run([sys.executable, str(ROOT / "tools" / "sample_prior.py"), "--prior",
                    str(release), "--tokenizer", str(world["release"]), "--n", "5", "--out",
                    str(tmp_path / "fresh.png"), "--codes", str(fresh), "--top-k", "8",
                    "--seed", "1"], check=True, cwd=ROOT)  # fmt: skip
    np.testing.assert_array_equal(np.load(fresh)["tokens"], sampled)


def test_codes_of_another_tokenizer_are_refused(world, tmp_path):
    other = save_tiny_release(tmp_path / "other", seed=5, codebook_size=32, resolution=RES)
    src = write_sources(tmp_path / "src", num_shards=1, per_shard=8, seed=3)
    foreign = _tokenize(other, src.paths, tmp_path / "foreign")
    with pytest.raises(ConfigError, match="a prior learns one tokenizer's codes"):
        train(_cfg(world, tmp_path / "run", *PIXELCNN, f"data.eval_index={foreign}"))
    with pytest.raises(ConfigError, match="needs data.train_index"):
        train(_cfg(world, tmp_path / "run", *PIXELCNN, "data.train_index=null"))
    with pytest.raises(ConfigError, match="no index manifest"):
        train(_cfg(world, tmp_path / "run", *PIXELCNN, f"data.train_index={tmp_path}"))
    with pytest.raises(ConfigError, match="is not the tokenizer of data.train_index"):
        train(_cfg(world, tmp_path / "run", *PIXELCNN, f"prior.tokenizer={other}",
                   "logging.num_images=2", "logging.image_every=5"))  # fmt: skip


def test_a_two_grid_index_trains_a_hierarchy_of_priors(tmp_path):
    release = two_grid_tokenizer(codebook_size=16, resolution=RES).save_pretrained(tmp_path / "rel")
    src = write_sources(tmp_path / "src", num_shards=2, per_shard=24, seed=4)
    index = _tokenize(release, src.paths, tmp_path / "index")
    world = {"train": index, "eval": index}
    result = train(_cfg(world, tmp_path / "run", *PIXELCNN, "train.max_steps=6",
                        f"prior.tokenizer={release}", "logging.num_images=2",
                        "logging.image_every=6"))  # fmt: skip
    metrics = result.eval
    for grid, k in (("top", 16), ("bottom", 32)):
        assert metrics[f"uniform_bits/{grid}"] == pytest.approx(math.log2(k))
        assert metrics[f"bits_per_code/{grid}"] > 0
    rows = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any("bits_per_code/bottom" in row for row in rows)
    assert (tmp_path / "run" / "images" / "step_00000006.png").is_file()
    model = load_prior_run(tmp_path / "run").model
    assert model.conditions == {"top": None, "bottom": "top"}
    codes = model.sample(3, generator=torch.Generator().manual_seed(0))
    assert codes["top"].shape == (3, 2, 2) and codes["bottom"].shape == (3, 4, 4)
    assert int(codes["top"].max()) < 16 and int(codes["bottom"].max()) < 32


def test_two_ranks_train_a_prior_and_resume_exactly(world, tmp_path):
    def config(name: str) -> Path:
        cfg = _cfg(world, tmp_path / name, *PIXELCNN, "train.max_steps=12", "checkpoint.every=6")
        path = tmp_path / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        return path

    accelerate("ddp.yaml", "launch/train_prior.py", "--config", str(config("straight")))
    resumed = config("resumed")
    accelerate("ddp.yaml", "launch/train_prior.py", "--config", str(resumed), "--stop-after", "6")
    accelerate("ddp.yaml", "launch/train_prior.py", "--config", str(resumed))
    a, b = losses(tmp_path / "straight"), losses(tmp_path / "resumed")
    assert sorted(a) == list(range(1, 13))
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), step
    final = metric_rows(tmp_path / "straight")[12]
    assert final["eval/bits_per_code"] < final["eval/uniform_bits"] == 6.0


def test_a_class_conditional_prior_trains_on_the_cls_fields(world, tmp_path):
    labelled_src = write_sources(tmp_path / "src", num_shards=2, per_shard=24, seed=6, classes=3)
    labelled = _tokenize(world["release"], labelled_src.paths, tmp_path / "labelled")
    data = {"train": labelled, "eval": labelled}
    run_dir = tmp_path / "run"
    result = train(_cfg(data, run_dir, *PIXELCNN, "prior.num_classes=3", "train.max_steps=6",
                        f"prior.tokenizer={world['release']}", "logging.num_images=3",
                        "logging.image_every=6"))  # fmt: skip
    assert result.eval["bits_per_code"] > 0
    model = load_prior_run(run_dir).model
    codes = {"tokens": torch.zeros(3, 8, 8, dtype=torch.int64)}
    per_class = [model(codes, torch.full((3,), c)).loss.item() for c in range(3)]
    assert len(set(per_class)) == 3  # the class reaches the logits
    # sample_prior draws the classes asked for; a class the prior does not know is refused.
    script = [sys.executable, str(ROOT / "tools" / "sample_prior.py"), "--prior", str(run_dir),
              "--tokenizer", str(world["release"]), "--n", "2", "--out", str(tmp_path / "s.png")]  # fmt: skip
    subprocess.run([*script, "--label", "2"], check=True, cwd=ROOT)
    refused = subprocess.run([*script, "--label", "3"], cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "classes 0 to 2" in refused.stderr
    # Bad labels are refused naming the sample: the first one before training (world's
    # index has cls 7 on every third sample, none on the others), any other when read.
    with pytest.raises(ConfigError, match=r"'img0_000' has cls '7', not a class index in \[0, 3\)"):
        train(_cfg(world, tmp_path / "out_of_range", *PIXELCNN, "prior.num_classes=3"))
    with pytest.raises(ValueError, match=r"sample '\w+' has no cls field; a class-conditional"):
        train(_cfg(world, tmp_path / "unlabelled", *PIXELCNN, "prior.num_classes=8"))
