"""Every VQGAN recipe in configs/ runs: two training steps at 64 px on CPU with its widths
as they are (both models, the discriminator on from the first step), then a release
that encodes to the recipe's grid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import make_shards

from tokenizer.api import Tokenizer
from tokenizer.config import load_config
from tokenizer.training.export import export_release
from tokenizer.training.loop import train

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("vqgan_*.yaml"))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_shards(tmp_path_factory.mktemp("shards"), n_train=8, per_shard=8)


def test_there_are_recipes():
    assert {"vqgan_f16_256.yaml", "vqgan_f8_256.yaml", "vqgan_f16_512.yaml",
            "vqgan_f16_1024.yaml", "vqgan_f16_256_k262144.yaml"} <= set(RECIPES)  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_trains_two_steps_at_64_px(tmp_path, shards, recipe):
    cfg = load_config(ROOT / "configs" / recipe)
    factor = 2 ** (len(cfg.model.ch_mult) - 1)
    run_dir = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / recipe,
        overrides=[
            f"run.dir={run_dir}",
            f"data.train_shards={shards['train']}",
            "data.eval_shards=null",
            "data.resolution=32" if factor == 8 else "data.resolution=64",
            "data.num_workers=0",
            # The recipe's attention sits at its coarsest level; at 64 px that level is smaller.
            f"model.attn_resolutions=[{(32 if factor == 8 else 64) // factor}]",
            "train.batch_size=1",
            "train.max_steps=2",
            "train.mixed_precision=no",
            "loss.perceptual.weight=0",  # its VGG16 file is the user's to bring
            "loss.adversarial.start_step=0",
            "quantizer.init=data",
            "quantizer.search=torch",
            "logging.every=1",
            "logging.num_images=0",
            "logging.tensorboard=false",
            "checkpoint.every=0",
        ],
    )
    result = train(cfg)
    assert result.step == 2
    release = export_release(run_dir, tmp_path / "release")
    tok = Tokenizer.from_pretrained(release.directory)
    side = cfg.data.resolution
    codes = tok.encode(torch.rand(1, 3, side, side))
    assert codes.shape == (1, side // factor, side // factor)
    assert int(codes.max()) < cfg.quantizer.codebook_size
