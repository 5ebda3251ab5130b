"""A model with two named code grids through the inference face: the registry builds it,
Tokenizer encodes and decodes every grid, a release round-trips it (in a fresh process
too, where importing the model's module is all the registration it takes)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from two_grid_model import ARCH, BOTTOM, TOP, TwoGridModel, two_grid_config, two_grid_tokenizer

from tokenizer import Tokenizer, build_model
from tokenizer.config import ConfigError, load_config
from tokenizer.models import arch_names, register_arch

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture
def tok() -> Tokenizer:
    return two_grid_tokenizer()


def test_the_registry_builds_a_registered_arch_and_names_the_choices_otherwise():
    assert {"vqvae", ARCH} <= set(arch_names())
    assert isinstance(build_model(two_grid_config()), TwoGridModel)
    with pytest.raises(ConfigError, match=r"unknown model\.arch 'vqvae9'; choices: vqvae, "):
        load_config(overrides=["model.arch=vqvae9"])
    with pytest.raises(ValueError, match="already registered"):
        register_arch("vqvae", TwoGridModel.from_config)


def test_encode_grids_and_decode_grids_give_every_grid_its_shape_and_k(tok):
    assert tok.grid_names == (TOP, BOTTOM)
    assert tok.codebook_sizes == {TOP: 16, BOTTOM: 32}
    assert tok.downsample_factors == {TOP: 8, BOTTOM: 4}
    assert tok.grid_shapes(32, 16) == {TOP: (4, 2), BOTTOM: (8, 4)}
    codes = tok.encode_grids(torch.rand(3, 3, 32, 16))
    assert {k: tuple(v.shape) for k, v in codes.items()} == {TOP: (3, 4, 2), BOTTOM: (3, 8, 4)}
    assert codes[BOTTOM].dtype == torch.int64 and int(codes[BOTTOM].max()) < 32
    images = tok.decode_grids(codes)
    assert images.shape == (3, 3, 32, 16) and 0 <= images.min() and images.max() <= 1
    # Each grid is checked against its own K: 20 is a bottom code, not a top one.
    tok.decode_grids({TOP: codes[TOP], BOTTOM: torch.full_like(codes[BOTTOM], 20)})
    with pytest.raises(ValueError, match=r"grid 'top': codes outside \[0, 16\)"):
        tok.decode_grids({TOP: torch.full_like(codes[TOP], 20), BOTTOM: codes[BOTTOM]})


def test_single_grid_methods_point_at_the_per_grid_ones(tok):
    with pytest.raises(ValueError, match="use encode_grids"):
        tok.encode(torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match="use decode_grids"):
        tok.decode(torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="use codebook_sizes"):
        tok.codebook_size  # noqa: B018
    with pytest.raises(ValueError, match="use grid_shapes"):
        tok.grid_shape(16, 16)


def test_a_release_round_trips_every_grid(tok, tmp_path):
    images = torch.rand(2, 3, 16, 16)
    release = tok.save_pretrained(tmp_path / "rel")
    config = json.loads((release / "config.json").read_text())
    assert config["grids"] == {
        TOP: {"codebook_size": 16, "downsample_factor": 8},
        BOTTOM: {"codebook_size": 32, "downsample_factor": 4},
    }
    assert "codebook_size" not in config  # a single number would describe one grid only
    loaded = Tokenizer.from_pretrained(release)
    assert loaded.fingerprint == tok.fingerprint
    want = tok.encode_grids(images)
    got = loaded.encode_grids(images)
    assert all(torch.equal(got[g], want[g]) for g in (TOP, BOTTOM))
    assert torch.equal(loaded.decode_grids(want), tok.decode_grids(want))

    # A hand edit of the repeated per-grid K alone does not pass unnoticed.
    config["grids"][BOTTOM]["codebook_size"] = 64
    (release / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="grids is .* but the model its config builds has"):
        Tokenizer.from_pretrained(release)


PROBE = """
import json, sys, torch
{register}
from tokenizer import Tokenizer
tok = Tokenizer.from_pretrained(sys.argv[1])
torch.manual_seed(3)
codes = tok.encode_grids(torch.rand(2, 3, 16, 16))
print(json.dumps({{k: v.tolist() for k, v in codes.items()}}))
"""


def _probe(release: Path, register: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", PROBE.format(register=register), str(release)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": f"{ROOT}:{TESTS}", "PATH": "/usr/bin:/bin"},
    )


def test_a_fresh_process_loads_the_release_once_the_arch_module_is_imported(tok, tmp_path):
    release = tok.save_pretrained(tmp_path / "rel")
    done = _probe(release, "import two_grid_model")
    assert done.returncode == 0, done.stderr
    torch.manual_seed(3)
    want = tok.encode_grids(torch.rand(2, 3, 16, 16))
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {k: v.tolist() for k, v in want.items()}
    # Without the import the arch is unknown, and the error says which ones are known.
    refused = _probe(release, "")
    assert refused.returncode != 0
    assert f"unknown model.arch '{ARCH}'; choices: vqvae" in refused.stderr
