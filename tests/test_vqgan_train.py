"""A VQGAN with gradient checkpointing through the one loop: launch/train.py trains it,
tools/export_tokenizer.py releases it, and the release encodes."""

import json

import pytest
import torch
from training_helpers import make_shards, run, write_config

from tokenizer import Tokenizer

pytestmark = pytest.mark.slow

VQGAN = (
    "model.arch=vqgan",
    "model.ch=8",
    "model.ch_mult=[1,2,2]",
    "model.num_res_blocks=1",
    "model.attn_resolutions=[8]",
    "model.z_channels=16",
    "model.grad_checkpointing=true",
)


def test_a_checkpointed_vqgan_trains_exports_and_encodes(tmp_path):
    shards = make_shards(tmp_path / "shards", n_train=48)
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, shards, run_dir, *VQGAN, "train.max_steps=4", "checkpoint.every=0")
    run("launch/train.py", "--config", str(cfg))
    release = tmp_path / "release"
    run("tools/export_tokenizer.py", "--run", str(run_dir), "--output", str(release))
    written = json.loads((release / "config.json").read_text())
    assert written["model"]["arch"] == "vqgan" and "grad_checkpointing" not in written["model"]
    tok = Tokenizer.from_pretrained(release)
    assert (tok.codebook_size, tok.downsample_factor) == (64, 4)
    codes = tok.encode(torch.rand(2, 3, 32, 32))
    assert codes.shape == (2, 8, 8)
    assert tok.decode(codes).shape == (2, 3, 32, 32)
