"""The tokenizer against a discriminator through the one loop (in-process, one rank):
the discriminator idles before its start step, both parts train after it, every term is
logged, and a stop + resume gives the uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from training_helpers import make_shards, metric_rows, write_config

from tokenizer.config import ConfigError, load_config
from tokenizer.training.checkpoint import (
    checkpoint_parts,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint_weights,
)
from tokenizer.training.export import export_release
from tokenizer.training.loop import train

pytestmark = pytest.mark.slow

GAN = (
    "loss.adversarial.weight=0.5",
    "loss.adversarial.start_step=2",
    "loss.adversarial.disc_ndf=8",
    "loss.adversarial.disc_layers=2",
    "loss.adversarial.lecam_weight=0.1",
    "loss.adversarial.lr=1e-3",
)
QUIET = ("logging.num_images=0", "data.eval_shards=null", "data.num_workers=0")


def _config(tmp_path, shards, run_dir, *extra):
    return load_config(write_config(tmp_path, shards, run_dir, "train.max_steps=6",
                                    "checkpoint.every=1", "checkpoint.keep_last=0", *GAN, *QUIET,
                                    *extra))  # fmt: skip


def test_discriminator_idles_then_trains_and_resumes_exactly(tmp_path):
    shards = make_shards(tmp_path / "shards")
    straight = tmp_path / "straight"
    train(_config(tmp_path, shards, straight))
    rows = metric_rows(straight)
    for step in (1, 2):  # before start_step: no discriminator forward, no generator term
        assert not any(k.startswith("disc/") for k in rows[step]), rows[step]
        assert "loss/generator" not in rows[step]
    for step in (3, 4, 5, 6):
        assert rows[step]["loss/adaptive_weight"] == pytest.approx(0.5)  # the fixed weight
        for key in ("disc/loss", "disc/gan", "disc/lecam", "disc/logits_real",
                    "disc/logits_fake", "loss/generator", "lr/discriminator"):  # fmt: skip
            assert key in rows[step], (step, key)
    # The LR logged at step s is the one step s + 1 uses: 0 until the start.
    assert rows[1]["lr/discriminator"] == 0.0 and rows[2]["lr/discriminator"] > 0
    # The discriminator's weights did not move until its start, then did.
    ckpts = {int(p.name[-8:]): p for p in list_checkpoints(straight)}
    assert checkpoint_parts(ckpts[6]) == ["tokenizer", "discriminator"]
    disc = {s: load_checkpoint_weights(ckpts[s], "discriminator") for s in (1, 2, 3)}
    name = next(k for k in disc[1] if k.endswith("weight") and disc[1][k].dim() == 4)
    assert torch.equal(disc[1][name], disc[2][name])
    assert not torch.equal(disc[2][name], disc[3][name])
    assert float(disc[3]["lecam.ema_real"]) != 0.0  # the LeCam averages are checkpointed

    resumed = tmp_path / "resumed"
    cfg = _config(tmp_path, shards, resumed)
    train(cfg, stop_after=4)
    train(cfg)
    again = metric_rows(resumed)
    for step in range(1, 7):
        for key, value in rows[step].items():
            if key in ("images_per_s", "eta_s", "step"):
                continue
            assert again[step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
    a = load_checkpoint_weights(latest_checkpoint(straight), "discriminator")
    b = load_checkpoint_weights(latest_checkpoint(resumed), "discriminator")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    release = export_release(resumed, tmp_path / "release")  # the tokenizer alone
    assert sorted(p.name for p in release.directory.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_adaptive_weight_needs_a_last_layer(tmp_path):
    shards = make_shards(tmp_path / "shards")
    cfg = _config(tmp_path, shards, tmp_path / "run", "loss.adversarial.adaptive=true")
    with pytest.raises(ConfigError, match="last_layer"):
        train(cfg)


VQGAN = ("model.arch=vqgan", "model.ch=8", "model.ch_mult=[1,2,2]", "model.attn_resolutions=[8]",
         "model.z_channels=8", "model.num_res_blocks=1", "quantizer.code_dim=8")  # fmt: skip


def test_adaptive_weight_on_a_vqgan_balances_the_gradients(tmp_path):
    shards = make_shards(tmp_path / "shards")
    cfg = _config(tmp_path, shards, tmp_path / "run", *VQGAN, "loss.adversarial.adaptive=true",
                  "model.grad_checkpointing=true")  # fmt: skip
    train(cfg)
    rows = metric_rows(tmp_path / "run")
    weights = [rows[s]["loss/adaptive_weight"] for s in (3, 4, 5, 6)]
    assert all(0.0 < w < 0.5 * 1e4 for w in weights) and len(set(weights)) > 1, weights
    assert all("disc/loss" in rows[s] for s in (3, 4, 5, 6))
