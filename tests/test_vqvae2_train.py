"""VQ-VAE-2 through every tool on 2 CPU ranks: both codebooks identical on both ranks
(k-means init, EMA, restarts), a stopped and resumed run equal to a straight one, then
export -> a release in a fresh process -> tokenize_dataset -> IndexShards -> --verify,
the codes of both grids equal to encode_grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import SYNC
from training_helpers import accelerate, losses, make_shards, run, write_config

from tokenizer import Tokenizer
from tokenizer.data.index.format import read_manifest
from tokenizer.data.index.reader import IndexShards
from tokenizer.data.index.verify import verify_index
from tokenizer.data.tars import decode_image, read_tar

pytestmark = pytest.mark.slow
DUMP = "tests/scripts/train_and_dump.py"
GRIDS = ("top", "bottom")
# 32 px: bottom 8x8 (f=4), top 4x4; each grid its own K.
VQVAE2 = (
    "model.arch=vqvae2",
    "model.level_codebook_sizes=[32,64]",
    "distributed.check_every=1",
)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    return make_shards(tmp_path_factory.mktemp("shards"))


def test_two_ranks_keep_both_codebooks_identical(tmp_path, shards):
    cfg = write_config(
        tmp_path, shards, tmp_path / "ddp", "train.max_steps=12", *SYNC, "quantizer.init=kmeans",
        *VQVAE2,
    )  # fmt: skip
    accelerate("ddp.yaml", DUMP, "--dump", str(tmp_path / "dump"), "--config", str(cfg))
    states = [load_file(str(tmp_path / "dump" / f"quantizer_rank{r}.safetensors")) for r in (0, 1)]
    assert {name.split(".")[0] for name in states[0]} == set(GRIDS)
    for name in states[0]:
        assert torch.equal(states[0][name], states[1][name]), f"{name} differs between ranks"
    for grid in GRIDS:
        assert bool(states[0][f"{grid}.initialized"]), grid
        assert int(states[0][f"{grid}.restart_count"]) > 0, grid  # restarts fired, alike
    assert states[0]["top.embed"].shape[0] == 32 and states[0]["bottom.embed"].shape[0] == 64


def test_resume_release_tokenize_index_and_verify_both_grids(tmp_path, shards):
    def config(name: str):
        return write_config(
            tmp_path, shards, tmp_path / name, "train.max_steps=8", "checkpoint.every=4",
            "quantizer.init=data", "quantizer.restart_threshold=0.125", *VQVAE2,
        )  # fmt: skip

    accelerate("ddp.yaml", "launch/train.py", "--config", str(config("straight")))
    resumed = config("resumed")
    accelerate("ddp.yaml", "launch/train.py", "--config", str(resumed), "--stop-after", "4")
    accelerate("ddp.yaml", "launch/train.py", "--config", str(resumed))
    for key in ("loss", "loss/commitment", "codebook/top/usage", "codebook/bottom/perplexity"):
        a, b = losses(tmp_path / "straight", key), losses(tmp_path / "resumed", key)
        assert sorted(a) == list(range(1, 9)), key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (key, step)

    release = tmp_path / "release"
    run("tools/export_tokenizer.py", "--run", str(tmp_path / "resumed"), "--output", str(release))
    index = tmp_path / "index"
    done = run("tools/tokenize_dataset.py", "--tokenizer", str(release), "--input", shards["eval"],
               "--output", str(index), "--no-progress", "--num-workers", "0")  # fmt: skip
    assert "codes: grid top: uint16 [4, 4], K=32; grid bottom: uint16 [8, 8], K=64" in done.stdout
    manifest = read_manifest(index)
    assert [(g.name, g.shape, g.codebook_size) for g in manifest.grids] == [
        ("top", [4, 4], 32),
        ("bottom", [8, 8], 64),
    ]
    tok = Tokenizer.from_pretrained(release)
    samples = list(IndexShards(index, tokenizer=tok))
    assert len(samples) == 16
    images = {s.key: decode_image(s, 32) for s in read_tar(shards["eval"], on_error=print)}
    keys = [s.key for s in samples]
    want = tok.encode_grids(tok.preprocess([images[k] for k in keys], 32))
    for grid in GRIDS:
        got = np.stack([s.grids[grid] for s in samples])
        np.testing.assert_array_equal(got, want[grid].numpy(), err_msg=grid)
    assert len(np.unique(want["bottom"].numpy())) > 4  # a trained grid, not one code
    assert verify_index(index).ok
    assert run("tools/tokenize_dataset.py", "--verify", str(index)).returncode == 0
