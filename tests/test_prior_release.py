"""The prior release: written from a model's weights, read back to the same weights and
the same samples; what is not a prior release, or not a whole one, is refused by name."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from two_grid_model import two_grid_tokenizer

from tokenizer.config import PriorConfig
from tokenizer.prior_release import read_prior_release, write_prior_release
from tokenizer.priors.grids import GridShape, build_grid_priors
from tokenizer.training.prior_run import load_prior_run

GRIDS = [GridShape("top", 16, (2, 2)), GridShape("bottom", 32, (4, 4))]
# Training-only keys set away from their defaults: a release must not carry them.
PRIOR = PriorConfig(dim=8, layers=2, kernel_size=3, tokenizer="/somewhere", unigram_samples=9)


def _release(tmp_path):
    torch.manual_seed(0)
    model = build_grid_priors(PRIOR, GRIDS)
    path = write_prior_release(tmp_path / "rel", PRIOR, GRIDS, "ab" * 32, model.state_dict())
    return model, path


def test_a_release_gives_back_the_weights_and_the_samples(tmp_path):
    model, path = _release(tmp_path)
    release = read_prior_release(path)
    assert release.grids == GRIDS and release.tokenizer_sha256 == "ab" * 32
    assert (release.prior.dim, release.prior.layers, release.prior.kernel_size) == (8, 2, 3)
    assert release.prior.tokenizer is None and release.prior.unigram_samples != 9
    loaded = load_prior_run(path)
    assert loaded.model.training is False and loaded.checkpoint == path
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], tensor, rtol=0, atol=0)
    model.eval()
    ours = model.sample(3, generator=torch.Generator().manual_seed(4))
    theirs = loaded.model.sample(3, generator=torch.Generator().manual_seed(4))
    assert all(torch.equal(ours[g], theirs[g]) for g in ("top", "bottom"))
    with pytest.raises(ValueError, match="has no checkpoints to choose from"):
        load_prior_run(path, checkpoint=path / "step_1")


def test_what_is_not_a_whole_prior_release_is_refused(tmp_path):
    tokenizer = two_grid_tokenizer().save_pretrained(tmp_path / "tokenizer")
    with pytest.raises(ValueError, match="expected 'vq-tokenizer-prior'"):
        load_prior_run(tokenizer)
    with pytest.raises(FileNotFoundError, match="neither the run directory of a prior"):
        load_prior_run(tmp_path)
    _, path = _release(tmp_path)
    body = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**body, "prior": {**body["prior"], "widht": 3}}))
    with pytest.raises(ValueError, match=r"prior\.widht is not a prior architecture key"):
        read_prior_release(path)
    (path / "config.json").write_text(json.dumps(body))
    weights = build_grid_priors(PriorConfig(dim=4, layers=2, kernel_size=3), GRIDS).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match="corrupt or comes from another release"):
        load_prior_run(path)
