"""score_batches across ranks (threads standing in for processes): unequal shares, a rank
with no image at all, and every rank returning what one rank alone returns; the reader's
count of broken tars; the code-frequency plot at its edges."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import write_test_shards
from eval_helpers import StandInInception
from tokenize_helpers import tiny_tokenizer, tiny_two_grid_tokenizer

from tokenizer.evaluation.networks import TORCHSCRIPT, InceptionFeatures
from tokenizer.evaluation.reader import iter_keyed_batches
from tokenizer.evaluation.scoring import Collectives, Scores, score_batches
from tokenizer.evaluation.usage_plot import usage_plot


class _ThreadWorld:
    """reduce_sum and gather across threads: each rank puts its part, all wait, all read."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.parts: list[object] = [None] * world

    def _meet(self, rank: int, value: object) -> list[object]:
        self.parts[rank] = value
        self.barrier.wait()
        everyone = list(self.parts)
        self.barrier.wait()  # nobody overwrites a part before everyone has read
        return everyone

    def for_rank(self, rank: int) -> Collectives:
        return Collectives(
            reduce_sum=lambda t: sum(p.clone() for p in self._meet(rank, t)),
            gather=lambda obj: self._meet(rank, obj),
        )


def _make_extractor() -> InceptionFeatures:
    torch.manual_seed(0)
    module = StandInInception().eval()
    return InceptionFeatures(lambda x: module(x, return_features=True), TORCHSCRIPT, "-", "-")


# Built once: seeding torch's global generator inside the rank threads would race.
_EXTRACTOR = _make_extractor()


def _score(tok, paths, rank=0, world=1, collectives=None) -> Scores:
    batches = iter_keyed_batches(paths, 16, 3, rank, world)
    return score_batches(tok.model, batches, inception=_EXTRACTOR, collectives=collectives, worst=4)


@pytest.mark.parametrize(("num_shards", "world"), [(3, 2), (1, 3)])
def test_ranks_return_what_one_rank_returns(tmp_path, num_shards, world):
    # 3 shards on 2 ranks: shares of 2 and 1 shards. 1 shard of 4 samples on 3 ranks:
    # samples dealt one by one (2, 1, 1).
    shards = write_test_shards(tmp_path, num_shards=num_shards, per_shard=4).paths
    tok = tiny_tokenizer()
    alone = _score(tok, shards)
    threads_world = _ThreadWorld(world)
    results, errors = {}, []

    def rank_main(rank: int) -> None:
        try:
            results[rank] = _score(tok, shards, rank, world, threads_world.for_rank(rank))
        except BaseException as err:  # re-raised below
            errors.append(err)
            threads_world.barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for rank in range(world):
        got = results[rank]
        assert [s.key for s in got.images] == [s.key for s in alone.images]
        np.testing.assert_allclose(
            [s.psnr for s in got.images], [s.psnr for s in alone.images], rtol=1e-5
        )
        for grid, counts in alone.counts.items():
            torch.testing.assert_close(got.counts[grid], counts)
        assert [w.key for w in got.worst] == [w.key for w in alone.worst]
        assert got.rfid == pytest.approx(alone.rfid, rel=1e-5)


def test_a_rank_without_images_joins_the_sums(tmp_path):
    shards = write_test_shards(tmp_path, num_shards=1, per_shard=3).paths
    tok = tiny_tokenizer()
    world = _ThreadWorld(2)
    results = {}

    def rank_main(rank: int, paths: list[str]) -> None:
        # Rank 1 is given nothing to read: no statistics of its own, only zeros to add.
        batches = iter_keyed_batches(paths, 16, 3) if paths else iter(())
        results[rank] = score_batches(
            tok.model, batches, inception=_EXTRACTOR, collectives=world.for_rank(rank)
        )

    threads = [threading.Thread(target=rank_main, args=a) for a in ((0, shards), (1, []))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    alone = _score(tok, shards)
    assert results[1].rfid == pytest.approx(alone.rfid, rel=1e-9)
    assert len(results[1].images) == 3


def test_broken_tars_and_bad_images_are_counted_with_their_keys(tmp_path):
    shards = write_test_shards(tmp_path, num_shards=2, per_shard=4).paths
    data = open(shards[1], "rb").read()
    with open(shards[1], "wb") as f:
        f.write(data[: len(data) // 2 + 100])  # truncated in the middle of a sample
    batches = list(iter_keyed_batches(shards, 16, 3))
    read = [k for b in batches for k in b.keys]
    assert read[:4] == ["s0_000", "s0_001", "s0_002", "s0_003"] and len(read) < 8
    assert sum(b.tar_errors for b in batches) == 1


def test_usage_plot_draws_empty_single_and_huge_codebooks():
    for counts in (np.zeros(8), np.array([5, 0, 0, 0]), np.ones(4)):
        assert usage_plot(counts, "grid").size == (640, 360)
    rng = np.random.default_rng(0)
    big = rng.zipf(1.5, 262_144).astype(np.int64)
    image = usage_plot(big, "grid codes")
    assert image.size == (640, 360) and image.getcolors(1 << 16) is not None


def _two_grid_model() -> torch.nn.Module:
    return tiny_two_grid_tokenizer(resolution=16).model.eval()


def test_random_codes_psnr_per_grid_equals_decoding_random_codes(tmp_path):
    from tokenizer.evaluation.metrics import psnr_per_image
    from tokenizer.evaluation.scoring import random_grid_codes

    shards = write_test_shards(tmp_path, num_shards=1, per_shard=5).paths
    model = _two_grid_model()
    scores = score_batches(model, iter_keyed_batches(shards, 16, 2))
    assert all(set(s.random_codes_psnr) == {"top", "bottom"} for s in scores.images)
    # The same values when the images meet other batch neighbours: seeds follow keys.
    whole = score_batches(model, iter_keyed_batches(shards, 16, 5))
    for a, b in zip(scores.images, whole.images, strict=True):
        assert a.random_codes_psnr == pytest.approx(b.random_codes_psnr, abs=1e-4)

    batch = next(iter(iter_keyed_batches(shards, 16, 5)))
    with torch.no_grad():
        codes = model.encode_codes(batch.images)
        for grid, k in (("top", 32), ("bottom", 32)):
            random = torch.stack(
                [
                    random_grid_codes(key, grid, tuple(codes[grid].shape[1:]), k)
                    for key in batch.keys
                ]
            )
            assert not torch.equal(random, codes[grid])
            recon = model.decode_codes({**codes, grid: random}).clamp(-1, 1)
            psnr = psnr_per_image(batch.images, recon).tolist()
            expected = dict(zip(batch.keys, psnr, strict=True))
            got = {s.key: s.random_codes_psnr[grid] for s in whole.images}
            assert got == pytest.approx(expected, abs=1e-4)


def test_a_grid_the_decoder_ignores_loses_nothing_when_random(tmp_path):
    shards = write_test_shards(tmp_path, num_shards=1, per_shard=4).paths
    model = _two_grid_model()
    with torch.no_grad():
        # The top codes reach the decoder only through its upsampler: silence it.
        model.upsamplers["bottom"].weight.zero_()
        model.upsamplers["bottom"].bias.zero_()
    scores = score_batches(model, iter_keyed_batches(shards, 16, 4))
    for s in scores.images:
        assert s.random_codes_psnr["top"] == pytest.approx(s.psnr, abs=1e-4)
        assert s.random_codes_psnr["bottom"] < s.psnr


def test_a_single_grid_tokenizer_has_no_random_codes_psnr(tmp_path):
    shards = write_test_shards(tmp_path, num_shards=1, per_shard=2).paths
    scores = score_batches(tiny_tokenizer().model, iter_keyed_batches(shards, 16, 2))
    assert all(s.random_codes_psnr == {} for s in scores.images)
