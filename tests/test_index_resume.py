"""IndexShards across epochs and ranks: an exact mid-epoch resume (the remaining samples,
in the uninterrupted order), equal per-rank counts with an uneven shard split (drop or
wrap), and refusals of a state that is not this rank's."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
import torch
from tokenize_helpers import write_sources
from two_grid_model import BOTTOM, TOP, two_grid_tokenizer

from tokenizer.data.index.balance import slot_counts
from tokenizer.data.index.reader import IndexShards, collate_tokens
from tokenizer.tokenize.corpus import TokenizeOptions, tokenize_corpus


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    # Shards of 8, 6 (two bad samples) and 8: two ranks split them unevenly.
    root = tmp_path_factory.mktemp("resume")
    release = two_grid_tokenizer().save_pretrained(root / "release")
    sources = write_sources(root / "src", num_shards=3, per_shard=8)
    out = root / "index"
    tokenize_corpus(
        TokenizeOptions(str(release), sources.paths, str(out), num_workers=0, progress=False)
    )
    return out


def loader(data: IndexShards, workers: int = 0, batch_size: int = 3):
    return torch.utils.data.DataLoader(
        data, batch_size=batch_size, num_workers=workers, collate_fn=collate_tokens
    )


def keys(batches) -> list[list[str]]:
    return [b.keys for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resume_mid_epoch_yields_exactly_the_remaining_batches(index, workers):
    def fresh() -> IndexShards:
        # "drop" evens the two workers' shares: then the order resumes exactly too.
        return IndexShards(index, shuffle=True, seed=3, shuffle_buffer=5, remainder="drop")

    data = fresh()
    data.set_epoch(1)
    whole = keys(loader(data, workers))
    assert len(whole) >= 4

    data = fresh()
    data.set_epoch(1)
    consumed = []
    for batch in loader(data, workers):
        data.update(batch)
        consumed.append(batch.keys)
        if len(consumed) == 3:
            break
    state = json.loads(json.dumps(data.state_dict()))  # JSON-safe, as a checkpoint keeps it

    resumed = fresh()
    resumed.load_state_dict(state)
    rest = list(loader(resumed, workers))
    assert consumed + keys(rest) == whole
    assert {tuple(b.grids) for b in rest} == {(TOP, BOTTOM)}
    # The next epoch is the uninterrupted run's next epoch.
    resumed.set_epoch(2)
    data = fresh()
    data.set_epoch(2)
    assert keys(loader(resumed, workers)) == keys(loader(data, workers))


def test_with_unequal_worker_shares_a_resume_yields_exactly_the_remaining_samples(index):
    data = IndexShards(index, shuffle=True, seed=1, shuffle_buffer=4)  # "keep": one rank
    everything = [k for b in keys(loader(data, 2)) for k in b]
    consumed = []
    for batch in loader(data, 2):
        data.update(batch)
        consumed += batch.keys
        if len(consumed) >= 7:
            break
    resumed = IndexShards(index, shuffle=True, seed=1, shuffle_buffer=4)
    resumed.load_state_dict(data.state_dict())
    rest = [k for b in keys(loader(resumed, 2)) for k in b]
    assert Counter(consumed + rest) == Counter(everything)


def per_rank(index: Path, remainder: str, workers: int = 0) -> list[list[list[str]]]:
    return [
        keys(loader(IndexShards(index, rank=r, world_size=2, remainder=remainder), workers))
        for r in range(2)
    ]


def test_two_ranks_get_equal_counts_with_an_uneven_shard_split(index):
    sizes = [8, 6, 8]
    assert slot_counts(sizes, [0, 1, 2], 2) == [16, 6]  # the split is uneven
    everything = [s.key for s in IndexShards(index)]

    dropped = per_rank(index, "drop")
    assert [len(b) for b in dropped] == [2, 2]  # 6 samples each, in batches of 3
    flat = [k for rank in dropped for b in rank for k in b]
    assert len(flat) == 12 and len(set(flat)) == 12 and set(flat) <= set(everything)

    wrapped = per_rank(index, "wrap")
    assert [sum(map(len, b)) for b in wrapped] == [16, 16]
    flat = [k for rank in wrapped for b in rank for k in b]
    assert set(flat) == set(everything)  # nothing left out: rank 1 reads its 6 again, twice
    assert sorted(Counter(flat).values())[-6:] == [2, 2, 3, 3, 3, 3]

    # Two DataLoader workers per rank: four readers, still equal batches per rank.
    for remainder in ("drop", "wrap"):
        counts = [len(r) for r in per_rank(index, remainder, workers=2)]
        assert counts[0] == counts[1], (remainder, counts)
    assert [len(r) for r in per_rank(index, "keep")] == [6, 2]  # what would hang DDP


def test_a_state_of_another_rank_is_refused_and_another_layout_restarts_the_epoch(index, caplog):
    rank0 = IndexShards(index, rank=0, world_size=2)
    batch = next(iter(loader(rank0)))
    rank0.update(batch)
    with pytest.raises(ValueError, match="state of rank 0 loaded on rank 1"):
        IndexShards(index, rank=1, world_size=2).load_state_dict(rank0.state_dict())
    other_seed = IndexShards(index, rank=0, world_size=2, seed=9)
    with caplog.at_level(logging.WARNING):
        other_seed.load_state_dict(rank0.state_dict())
    assert "restarts from its start" in caplog.text
    restarted = keys(loader(other_seed))
    assert restarted == keys(loader(IndexShards(index, rank=0, world_size=2, seed=9)))
    with pytest.raises(ValueError, match="remainder must be one of"):
        IndexShards(index, remainder="pad")
