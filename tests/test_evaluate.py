"""Held-out evaluation reads only what it scores: max_batches bounds decoding, on one rank
and on ranks in lockstep (threads standing in for processes)."""

import copy
import threading

import pytest
import torch
from conftest import write_test_shards
from two_grid_model import BOTTOM, TOP, two_grid_tokenizer

import tokenizer.evaluation.evaluate as evaluate_module
from tokenizer import build_model, load_config
from tokenizer.evaluation.evaluate import evaluate_shards

OVERRIDES = [
    "model.channels=[8,16]",
    "model.res_channels=8",
    "quantizer.codebook_size=32",
    "quantizer.code_dim=4",
    "data.resolution=16",
]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return build_model(load_config(overrides=OVERRIDES))


@pytest.fixture
def decoded(monkeypatch) -> dict[int, int]:
    """rank -> images decoded for it: every batch drawn from the eval reader is counted."""
    counts: dict[int, int] = {}
    reader = evaluate_module.iter_eval_batches

    def counting(shards, resolution, batch_size, rank=0, world_size=1):
        counts.setdefault(rank, 0)
        for batch in reader(shards, resolution, batch_size, rank, world_size):
            counts[rank] += batch.images.shape[0]
            yield batch

    monkeypatch.setattr(evaluate_module, "iter_eval_batches", counting)
    return counts


def test_max_batches_stops_reading(tmp_path, model, decoded):
    shards = write_test_shards(tmp_path / "eval", num_shards=5, per_shard=40).paths
    result = evaluate_shards(model, shards, 16, batch_size=8, max_batches=1)
    assert result.num_images == 8
    assert decoded == {0: 8}  # not 200: the other 24 batches are never decoded
    decoded.clear()
    assert evaluate_shards(model, shards, 16, batch_size=8).num_images == 200
    assert decoded == {0: 200}


def test_negative_max_batches_is_refused(tmp_path, model):
    shards = write_test_shards(tmp_path / "eval", num_shards=1, per_shard=2).paths
    with pytest.raises(ValueError, match="max_batches=-1"):
        evaluate_shards(model, shards, 16, batch_size=8, max_batches=-1)


class _ThreadSum:
    """reduce_sum across threads: each rank adds its tensor, all wait, all read the sum."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts: list[torch.Tensor | None] = [None] * world

    def for_rank(self, rank: int):
        def reduce_sum(t: torch.Tensor) -> torch.Tensor:
            self.parts[rank] = t.clone()
            self.barrier.wait()
            total = sum(self.parts)
            self.barrier.wait()  # nobody overwrites a part before everyone has summed
            return total

        return reduce_sum


@pytest.mark.parametrize(("max_batches", "expected"), [(1, {0: 8, 1: 8}), (2, {0: 16, 1: 10})])
def test_max_batches_in_lockstep_ends_on_every_rank(
    tmp_path, model, decoded, max_batches, expected
):
    # 3 shards of 10: rank 0 reads two (20 images: batches 8, 8, 4), rank 1 one (8, 2).
    shards = write_test_shards(tmp_path / "eval", num_shards=3, per_shard=10).paths
    world = _ThreadSum(2)
    results, errors = {}, []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = evaluate_shards(
                copy.deepcopy(model), shards, 16, batch_size=8, rank=rank, world_size=2,
                reduce_sum=world.for_rank(rank), max_batches=max_batches,
            )  # fmt: skip
        except BaseException as err:  # re-raised below
            errors.append(err)
            world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a rank is still waiting in lockstep"
    assert decoded == expected
    total = sum(expected.values())
    assert results[0].num_images == results[1].num_images == total


def test_usage_and_perplexity_are_reported_per_grid(tmp_path, model):
    shards = write_test_shards(tmp_path, num_shards=1, per_shard=5)
    single = evaluate_shards(model, shards.paths, 16, batch_size=2)
    # One grid: the key names tools/eval_tokenizer.py and the training log have always had.
    assert list(single.metrics()) == ["psnr", "ssim", "usage", "perplexity", "num_images"]
    assert single.metrics()["usage"] == single.usage == single.grids["tokens"].usage

    tok = two_grid_tokenizer()
    result = evaluate_shards(tok.model, shards.paths, 16, batch_size=2)
    assert result.num_images == 5 and set(result.grids) == {TOP, BOTTOM}
    assert {n: g.codebook_size for n, g in result.grids.items()} == {TOP: 16, BOTTOM: 32}
    # Usage over the whole set: the distinct codes encode_grids gives these images.
    images = torch.cat([b for b in _eval_images(shards.paths)])  # (5, 3, 16, 16) in [-1, 1]
    codes = tok.model.encode_codes(images)
    for grid, k in ((TOP, 16), (BOTTOM, 32)):
        assert result.grids[grid].usage == pytest.approx(codes[grid].unique().numel() / k)
    metrics = result.metrics()
    assert set(metrics) == {
        "psnr", "ssim", "num_images", "usage/top", "usage/bottom", "perplexity/top",
        "perplexity/bottom",
    }  # fmt: skip
    assert metrics["perplexity/bottom"] == result.grids[BOTTOM].perplexity
    with pytest.raises(ValueError, match=r"use result\.grids\[name\]"):
        result.usage  # noqa: B018
    assert "top: usage" in result.describe() and "bottom: usage" in result.describe()


def _eval_images(paths):
    return (b.images for b in evaluate_module.iter_eval_batches(paths, 16, 2))


def test_lpips_is_the_mean_over_every_image_when_given(tmp_path, model):
    shards = write_test_shards(tmp_path / "eval", num_shards=1, per_shard=10).paths
    seen: list[torch.Tensor] = []

    def distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per_image = (x - y).abs().flatten(1).mean(1)  # (B,): a stand-in with LPIPS' contract
        seen.append(per_image)
        return per_image

    result = evaluate_shards(model, shards, 16, batch_size=4, lpips=distance)
    assert [len(d) for d in seen] == [4, 4, 2]
    assert result.lpips == pytest.approx(torch.cat(seen).mean().item())
    assert result.metrics()["lpips"] == result.lpips and "lpips" in result.describe()
    assert "lpips" not in evaluate_shards(model, shards, 16, batch_size=4).metrics()
