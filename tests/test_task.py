"""The task seam: a task with two parts (the tokenizer and a small critic trained beside
it, the shape of a tokenizer + discriminator task) trains through the one loop, is
checkpointed part by part, resumes exactly, and exports the tokenizer alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from training_helpers import make_shards, metric_rows, write_config

import tokenizer.training.tasks as tasks
from tokenizer.config import load_config
from tokenizer.training.checkpoint import (
    checkpoint_parts,
    latest_checkpoint,
    load_checkpoint_weights,
)
from tokenizer.training.export import export_release
from tokenizer.training.loop import train
from tokenizer.training.task import Part, StepOutput, backward, optimizer_step
from tokenizer.training.tasks.tokenizer import TokenizerTask

pytestmark = pytest.mark.slow


class CriticTask(TokenizerTask):
    """The tokenizer task plus a critic that learns to tell images from reconstructions,
    with its own optimiser and a schedule of its own (constant)."""

    critic_in_engine = True

    def __init__(self, cfg, accelerator) -> None:
        super().__init__(cfg, accelerator)
        critic = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.Flatten(), nn.LazyLinear(1))
        critic(torch.zeros(1, 3, cfg.data.resolution, cfg.data.resolution))  # sizes the lazy layer
        optimizer = torch.optim.Adam(critic.parameters(), lr=1e-3)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        self.critic = Part("critic", critic, optimizer, schedule, engine=self.critic_in_engine)

    def parts(self) -> list[Part]:
        return [self.tokenizer, self.critic]

    def train_step(self, batch, step: int) -> StepOutput:
        out = super().train_step(batch, step)
        images = batch.images.to(self.accelerator.device)  # (B, 3, R, R)
        with torch.no_grad():
            fake = self.tokenizer.module(images).reconstruction  # (B, 3, R, R)
        logits = self.critic.module(torch.cat([images, fake]))  # (2B, 1)
        target = torch.cat([torch.ones(len(images), 1), torch.zeros(len(images), 1)])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target)
        backward(self.accelerator, self.critic, loss)
        optimizer_step(self.accelerator, self.critic, 0.0)
        out.scalars["loss/critic"] = loss.detach()
        return out


class LocalCriticTask(CriticTask):
    critic_in_engine = False  # kept out of the engine, as a discriminator under DeepSpeed


@pytest.fixture(params=[CriticTask, LocalCriticTask], ids=["engine", "local"])
def critic_task(monkeypatch, request):
    monkeypatch.setitem(tasks._BUILDERS, "tokenizer", request.param)


def _config(tmp_path: Path, shards, run_dir: Path):
    path = write_config(
        tmp_path,
        shards,
        run_dir,
        "train.max_steps=6",
        "checkpoint.every=3",
        "logging.num_images=0",
        "data.eval_shards=null",
        "data.num_workers=0",
    )
    return load_config(path)


def test_two_part_task_checkpoints_by_part_and_resumes_exactly(tmp_path, critic_task):
    shards = make_shards(tmp_path / "shards")
    straight = train(_config(tmp_path, shards, tmp_path / "straight"))
    cfg = _config(tmp_path, shards, tmp_path / "resumed")
    assert train(cfg, stop_after=3).step == 3
    resumed = train(cfg)
    assert resumed.step == 6

    a, b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in range(1, 7):
        for key in ("loss", "loss/critic", "lr/tokenizer", "lr/critic"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
    assert a[6]["loss/critic"] < a[1]["loss/critic"]  # the critic learned something

    ckpt = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint_parts(ckpt) == ["tokenizer", "critic"]
    for name, part in (("tokenizer", resumed.model), ("critic", None)):
        weights = load_checkpoint_weights(ckpt, name)
        straight_weights = load_checkpoint_weights(latest_checkpoint(tmp_path / "straight"), name)
        assert weights.keys() == straight_weights.keys()
        for key in weights:
            torch.testing.assert_close(weights[key], straight_weights[key], rtol=1e-6, atol=1e-7)
        if part is not None:
            assert weights.keys() == part.state_dict().keys()
    assert straight.model.state_dict().keys() == resumed.model.state_dict().keys()

    # The release holds the tokenizer alone.
    release = export_release(tmp_path / "resumed", tmp_path / "release")
    assert sorted(p.name for p in release.directory.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]


def test_resuming_another_tasks_checkpoint_is_refused(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards")
    cfg = _config(tmp_path, shards, tmp_path / "run")
    monkeypatch.setitem(tasks._BUILDERS, "tokenizer", CriticTask)
    train(cfg, stop_after=3)
    monkeypatch.setitem(tasks._BUILDERS, "tokenizer", TokenizerTask)
    with pytest.raises(ValueError, match=r"holds parts \['tokenizer', 'critic'\].*\['tokenizer'\]"):
        train(cfg)


def test_a_two_grid_model_trains_syncs_logs_and_resumes_per_grid(tmp_path):
    import two_grid_model

    shards = make_shards(tmp_path / "shards")
    grid_model = (f"model.arch={two_grid_model.ARCH}", "model.channels=[8,8,8]")

    def config(run_dir):
        return load_config(
            write_config(
                tmp_path,
                shards,
                run_dir,
                *grid_model,
                "train.max_steps=6",
                "checkpoint.every=3",
                "logging.num_images=2",
                "logging.image_every=3",
                "data.num_workers=0",
                "distributed.check_every=2",
            )  # fmt: skip
        )

    straight = train(config(tmp_path / "straight"))
    cfg = config(tmp_path / "resumed")
    train(cfg, stop_after=3)
    resumed = train(cfg)
    a, b = metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed")
    for grid in ("top", "bottom"):
        for name in ("usage", "perplexity", "window_usage", "restarts"):
            assert f"codebook/{grid}/{name}" in a[6], (grid, name)
    assert "codebook/usage" not in a[6]
    for step in range(1, 7):
        for key in ("loss", "loss/commitment", "codebook/top/usage", "codebook/bottom/perplexity"):
            assert b[step][key] == pytest.approx(a[step][key], rel=1e-6, abs=1e-7), (step, key)
    for name, q in resumed.model.quantizers().items():
        other = straight.model.quantizers()[name]
        for key, value in q.state_dict().items():
            torch.testing.assert_close(value, other.state_dict()[key], msg=f"{name}.{key}")
    assert straight.eval is not None and {"usage/top", "usage/bottom"} <= straight.eval.keys()
    assert (tmp_path / "straight" / "images" / "step_00000006.png").is_file()


def test_weight_ema_is_checkpointed_resumed_and_released(tmp_path):
    from safetensors.torch import load_file

    shards = make_shards(tmp_path / "shards")

    def config(run_dir):
        return load_config(
            write_config(
                tmp_path,
                shards,
                run_dir,
                "train.max_steps=6",
                "checkpoint.every=3",
                "logging.num_images=0",
                "data.eval_shards=null",
                "data.num_workers=0",
                "train.ema_decay=0.8",
            )  # fmt: skip
        )

    train(config(tmp_path / "straight"))
    cfg = config(tmp_path / "resumed")
    train(cfg, stop_after=3)
    train(cfg)
    emas = [
        load_file(str(latest_checkpoint(tmp_path / run) / "tokenizer_ema.safetensors"))
        for run in ("straight", "resumed")
    ]
    assert emas[0].keys() == emas[1].keys()
    for key in emas[0]:
        torch.testing.assert_close(emas[0][key], emas[1][key], rtol=1e-6, atol=1e-7)
    raw = load_checkpoint_weights(latest_checkpoint(tmp_path / "resumed"))
    name = "encoder.layers.0.weight" if "encoder.layers.0.weight" in raw else sorted(raw)[0]
    assert not torch.equal(raw[name], emas[1][name])  # the average lags the weights

    release = export_release(tmp_path / "resumed", tmp_path / "ema_release")
    assert release.weights == "ema"
    released = load_file(str(release.directory / "model.safetensors"))
    torch.testing.assert_close(released[name], emas[1][name])
    raw_release = export_release(tmp_path / "resumed", tmp_path / "raw_release", raw=True)
    assert raw_release.weights == "raw"
    torch.testing.assert_close(load_file(str(raw_release.directory / "model.safetensors"))[name],
                               raw[name])  # fmt: skip


def _nan_at(monkeypatch, bad_calls: set[int], seen: list):
    """vqvae_loss whose total is NaN at the given calls (1-based); records the model's
    first weight at every call."""
    import tokenizer.training.tasks.tokenizer as tokenizer_task

    real = tokenizer_task.vqvae_loss

    def loss(images, out, kind):
        terms = real(images, out, kind)
        seen.append(len(seen) + 1)
        if len(seen) in bad_calls:
            terms.total = terms.total * float("nan")
        return terms

    monkeypatch.setattr(tokenizer_task, "vqvae_loss", loss)


def test_a_non_finite_loss_skips_its_step_and_too_many_stop_the_run(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards")
    weights: list[torch.Tensor] = []

    class Recording(TokenizerTask):
        def train_step(self, batch, step):
            weights.append(next(self.model.parameters()).detach().clone())
            return super().train_step(batch, step)

    monkeypatch.setitem(tasks._BUILDERS, "tokenizer", Recording)
    seen: list[int] = []
    _nan_at(monkeypatch, {3}, seen)
    extra = ("logging.num_images=0", "data.eval_shards=null", "data.num_workers=0")
    cfg = load_config(write_config(tmp_path, shards, tmp_path / "run", "train.max_steps=5", *extra))
    result = train(cfg)
    assert result.step == 5
    rows = metric_rows(tmp_path / "run")
    assert "loss" not in rows[3]  # the skipped step is left out of its log window
    assert rows[2]["train/skipped_steps"] == 0 and rows[5]["train/skipped_steps"] == 1
    assert all(torch.isfinite(torch.tensor(rows[s]["loss"])) for s in (1, 2, 4, 5))
    torch.testing.assert_close(weights[3], weights[2])  # step 3 changed no weight
    assert not torch.equal(weights[2], weights[1]) and not torch.equal(weights[4], weights[3])
    assert all(torch.isfinite(t).all() for t in result.model.quantizer.state_dict().values())


def test_more_non_finite_steps_than_allowed_stop_the_run(tmp_path, monkeypatch):
    shards = make_shards(tmp_path / "shards")
    _nan_at(monkeypatch, {2, 3}, [])
    extra = ("logging.num_images=0", "data.eval_shards=null", "data.num_workers=0")
    cfg = load_config(write_config(tmp_path, shards, tmp_path / "stops", "train.max_steps=5",
                                   "train.max_bad_steps=1", "checkpoint.every=1", *extra))  # fmt: skip
    with pytest.raises(RuntimeError, match=r"step 3: 2 optimiser steps skipped.*max_bad_steps=1"):
        train(cfg)
    assert latest_checkpoint(tmp_path / "stops").name == "step_00000002"


def test_the_perceptual_term_trains_and_stays_out_of_the_release(tmp_path):
    from safetensors.torch import load_file, save_file
    from test_perceptual import _random_heads, _random_trunk
    from training_helpers import run

    shards = make_shards(tmp_path / "shards")
    extra = ("train.max_steps=3", "logging.num_images=0", "data.eval_shards=null",
             "data.num_workers=0", "loss.perceptual.weight=1.0")  # fmt: skip
    torch.save(_random_heads(2), tmp_path / "heads.pth")
    # No backbone file: refused before training, naming the key.
    missing = write_config(tmp_path, shards, tmp_path / "missing", *extra,
                           f"loss.perceptual.backbone={tmp_path / 'vgg16.pth'}",
                           f"loss.perceptual.heads={tmp_path / 'heads.pth'}")  # fmt: skip
    proc = run("launch/train.py", "--config", str(missing), check=False)
    assert proc.returncode == 2 and "loss.perceptual.backbone" in proc.stderr, proc.stderr
    assert not (tmp_path / "missing" / "checkpoints").exists()

    save_file(_random_trunk(1), str(tmp_path / "vgg16.safetensors"))
    cfg = load_config(write_config(tmp_path, shards, tmp_path / "run", *extra,
                                   f"loss.perceptual.backbone={tmp_path / 'vgg16.safetensors'}",
                                   f"loss.perceptual.heads={tmp_path / 'heads.pth'}",
                                   f"data.eval_shards={shards['eval']}"))  # fmt: skip
    result = train(cfg)
    assert result.eval["lpips"] > 0  # the held-out evaluation reports the loss's LPIPS
    rows = metric_rows(tmp_path / "run")
    assert all(rows[s]["loss/perceptual"] > 0 for s in (1, 2, 3))
    # The total carries the perceptual term (weight 1) beside reconstruction and VQ terms.
    assert rows[1]["loss"] > rows[1]["loss/reconstruction"] + rows[1]["loss/perceptual"] - 1e-6
    release = export_release(tmp_path / "run", tmp_path / "release")
    released = load_file(str(release.directory / "model.safetensors"))
    assert released.keys() == result.model.state_dict().keys()
    assert not any("features" in k or k.startswith("lin") for k in released)
