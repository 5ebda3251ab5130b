"""The release directory: what the fingerprint covers, refusal of broken files, file
modes, compatibility with format_version 1 as first written, and search backends."""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tokenizer import Tokenizer, build_model, load_config
from tokenizer.config import QuantizerConfig
from tokenizer.fingerprint import weights_fingerprint
from tokenizer.quantize.faiss_support import faiss_available
from tokenizer.quantize.ivf import FaissIVFSearch
from tokenizer.quantize.search import FaissSearch, TorchSearch
from tokenizer.release import (
    INFERENCE_NEUTRAL_KEYS,
    read_release,
    release_fingerprint,
)

FIXTURES = Path(__file__).parent / "fixtures"
V1_RELEASE = FIXTURES / "release_v1"  # written at commit 1d6ae0a: tests/fixtures/make_release_v1.py
NEEDS_FAISS = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")


@pytest.fixture(scope="module")
def expected() -> dict:
    return json.loads((FIXTURES / "release_v1_expected.json").read_text())


@pytest.fixture
def pixels(expected) -> torch.Tensor:
    return torch.tensor(expected["pixels"], dtype=torch.uint8)  # (2, 3, 16, 16)


@pytest.fixture
def release(tmp_path) -> Path:
    """A writable copy of the v1 fixture, re-saved by today's code."""
    return Tokenizer.from_pretrained(V1_RELEASE).save_pretrained(tmp_path / "rel")


def edit_config(directory: Path, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


# ---------------------------------------------------------------------- format_version 1


def assert_same_codes_but_ties(tok: Tokenizer, pixels: torch.Tensor, codes, expected) -> None:
    """codes == expected, except where the two codes are equally near the encoder's vector
    within fp32 rounding (measured in float64): another CPU's kernels may round such a tie
    the other way, and no index could rely on one side of it."""
    codes, expected = torch.as_tensor(codes), torch.as_tensor(expected)
    differ = codes != expected  # (B, h, w)
    if not differ.any():
        return
    q = tok.model.quantizer
    with torch.no_grad():
        z = tok.model.encode(pixels.float() / 127.5 - 1.0)  # (B, D, h, w)
        x = q._to_lookup(z.permute(0, 2, 3, 1)[differ].float()).double()  # (n, d)
        book = q.codebook.double()  # (K, d)
    d_got = (x - book[codes[differ]]).pow(2).sum(1)
    d_want = (x - book[expected[differ]]).pow(2).sum(1)
    gap = (d_got - d_want).abs()
    assert differ.float().mean() <= 0.05, f"{int(differ.sum())} codes differ"
    # fp32 distances ||x||^2 + ||e||^2 - 2 x.e round at about 1e-7 of the norms.
    scale = x.pow(2).sum(1) + book[expected[differ]].pow(2).sum(1)
    assert (gap <= 1e-6 * scale).all(), f"not ties: gaps {gap.tolist()}"


def test_a_release_written_by_the_first_version_1_code_gives_its_codes(expected, pixels):
    tok = Tokenizer.from_pretrained(V1_RELEASE)
    codes = tok.encode(pixels)
    assert_same_codes_but_ties(tok, pixels, codes, expected["codes"])
    assert len(set(codes.flatten().tolist())) > 8  # a fixture that tells codes apart
    decoded = tok.decode(codes[:1]).flatten()
    assert torch.allclose(decoded, torch.tensor(expected["decoded"]), atol=1e-5)
    # The weights are the ones written then (the old fingerprint covered them alone).
    weights = load_file(str(V1_RELEASE / "model.safetensors"))
    assert weights_fingerprint(weights) == expected["weights_fingerprint"]
    # Pinned: index manifests record this value, so a change of the fingerprint rule
    # (release_fingerprint) makes every existing index refuse its tokenizer.
    assert tok.fingerprint == "b1df7249d6fdc277b2e25464f1e8df593d94def0f5ab236cb49ffcbc4d3fff43"


def test_a_release_saved_again_keeps_its_codes_and_fingerprint(release, expected, pixels):
    original = Tokenizer.from_pretrained(V1_RELEASE)
    again = Tokenizer.from_pretrained(release)
    assert_same_codes_but_ties(again, pixels, again.encode(pixels), expected["codes"])
    assert again.fingerprint == original.fingerprint
    config = json.loads((release / "config.json").read_text())
    assert config["format_version"] == 1
    assert config["weights_sha256"] == expected["weights_fingerprint"]


# ---------------------------------------------------------------------- fingerprint


def test_flipping_l2_normalize_changes_the_codes_and_the_fingerprint(tmp_path, pixels):
    # The fixture's codebook rows have unit length, where normalising the encoder's
    # vectors cannot change the nearest code: give the rows lengths 0.5 .. 2 first.
    tok = Tokenizer.from_pretrained(V1_RELEASE)
    q = tok.model.quantizer
    with torch.no_grad():
        q.embed.add_(q.embed_offset).mul_(torch.linspace(0.5, 2.0, q.codebook_size)[:, None])
        q.embed.sub_(q.embed_offset)
    tok.model.quantizer.l2_normalize = False  # so that the release keeps the lengths
    tok.config = dataclasses.replace(
        tok.config, quantizer=dataclasses.replace(tok.config.quantizer, l2_normalize=False)
    )
    release = tok.save_pretrained(tmp_path / "rel")
    edit_config(release, lambda c: c["quantizer"].update(l2_normalize=True))
    before = Tokenizer.from_pretrained(release)
    edit_config(release, lambda c: c["quantizer"].update(l2_normalize=False))
    after = Tokenizer.from_pretrained(release)
    # Same weights, other codes: the fingerprint must follow the codes, not the weights.
    assert weights_fingerprint(after.model.state_dict()) == weights_fingerprint(
        before.model.state_dict()
    )
    assert not torch.equal(after.encode(pixels), before.encode(pixels))
    assert after.fingerprint != before.fingerprint


def _other_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, list):
        return [*value, 1]
    raise AssertionError(f"no other value for {value!r}")


def test_every_config_value_but_the_neutral_ones_is_in_the_fingerprint(release):
    tok = Tokenizer.from_pretrained(release)
    config = tok.release_config()
    digest = weights_fingerprint(tok.model.state_dict())
    assert release_fingerprint(config, digest) == tok.fingerprint
    covered = []
    for section, values in config.items():
        for key, value in values.items() if isinstance(values, dict) else [(None, values)]:
            name = section if key is None else f"{section}.{key}"
            changed = json.loads(json.dumps(config))
            if key is None:
                changed[section] = _other_value(value)
            else:
                changed[section][key] = _other_value(value)
            same = release_fingerprint(changed, digest) == tok.fingerprint
            assert same == (name in INFERENCE_NEUTRAL_KEYS), name
            covered.append(name)
    # The ones the task names, and every model key, are among the covered.
    for name in ("quantizer.codebook_size", "quantizer.code_dim", "quantizer.lookup_dim"):
        assert name in covered and name not in INFERENCE_NEUTRAL_KEYS
    assert {"model.arch", "model.channels", "data.resolution"} <= set(covered)
    assert release_fingerprint(config, "0" * 64) != tok.fingerprint  # the weights count


# Another valid value of every key the fingerprint leaves out: each must give the same
# codes from the same weights, which is the claim that lets the fingerprint skip it.
NEUTRAL_VALUES = {
    "quantizer.beta": 1.0,
    "quantizer.ema_decay": 0.5,
    "quantizer.ema_epsilon": 0.1,
    "quantizer.init": "kmeans",
    "quantizer.kmeans_iters": 2,
    "quantizer.restart_threshold": 0.5,
    "quantizer.restart_unused_steps": 1,
    "quantizer.search": "faiss-ivf",
    "quantizer.search_chunk": 3,
    "quantizer.ivf_nlist": 2,
    "quantizer.ivf_nprobe": 1,
    "quantizer.ivf_rebuild_every": 1,
    "quantizer.ivf_recall_samples": 0,
}


def test_neutral_keys_are_real_config_keys_with_a_test_value():
    fields = {f"quantizer.{f.name}" for f in dataclasses.fields(QuantizerConfig)}
    assert INFERENCE_NEUTRAL_KEYS <= fields
    assert set(NEUTRAL_VALUES) == INFERENCE_NEUTRAL_KEYS


@pytest.mark.parametrize("name", sorted(NEUTRAL_VALUES))
def test_a_neutral_key_changes_neither_codes_nor_fingerprint(name, release, pixels):
    if name == "quantizer.search" and not faiss_available():
        pytest.skip("faiss is not installed")
    before = Tokenizer.from_pretrained(release)
    key = name.removeprefix("quantizer.")
    edit_config(release, lambda c: c["quantizer"].update({key: NEUTRAL_VALUES[name]}))
    after = Tokenizer.from_pretrained(release)
    assert getattr(after.quantizer_config, key) == NEUTRAL_VALUES[name]
    assert torch.equal(after.encode(pixels), before.encode(pixels))
    assert after.fingerprint == before.fingerprint


def test_a_bf16_cast_changes_the_fingerprint_and_back_to_fp32_restores_it(release):
    tok = Tokenizer.from_pretrained(release)
    fp32 = tok.fingerprint
    assert Tokenizer.from_pretrained(release, dtype=torch.bfloat16).fingerprint != fp32
    assert tok.to(dtype=torch.bfloat16).fingerprint != fp32


# ---------------------------------------------------------------------- broken files


def test_corrupt_config_json_is_refused_naming_the_file(release):
    path = release / "config.json"
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON \(.*line \d+"):
        Tokenizer.from_pretrained(release)
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        Tokenizer.from_pretrained(release)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        Tokenizer.from_pretrained(release)


def test_truncated_or_altered_weights_are_refused_naming_the_file(release):
    path = release / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        Tokenizer.from_pretrained(release)
    path.write_bytes(data[:4])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors"):
        Tokenizer.from_pretrained(release)
    # Same length, one byte of a tensor changed: only the recorded digest can tell.
    altered = bytearray(data)
    altered[-1] ^= 0xFF
    path.write_bytes(bytes(altered))
    with pytest.raises(ValueError, match=r"model\.safetensors: its tensors hash to .* config"):
        Tokenizer.from_pretrained(release)


def test_weights_of_another_release_are_refused(release, tmp_path):
    other = Tokenizer.from_pretrained(release)
    with torch.no_grad():
        next(other.model.parameters()).add_(1e-3)  # same tensors, other values
    other.save_pretrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", release / "model.safetensors")
    with pytest.raises(ValueError, match="comes from another release"):
        Tokenizer.from_pretrained(release)


@pytest.mark.parametrize(
    ("version", "message"),
    [
        (
            2,
            r"format_version 2 is not one this code reads \(it reads format_version 1\): "
            r"written by a newer",
        ),
        (0, r"format_version 0 is not one this code reads \(it reads format_version 1\)$"),
        ("1", r"format_version '1' is not one"),
        (True, r"format_version True is not one"),
        (None, r"format_version None is not one"),
    ],
)
def test_an_unknown_format_version_is_refused(release, version, message):
    if version is None:
        edit_config(release, lambda c: c.pop("format_version"))
    else:
        edit_config(release, lambda c: c.update(format_version=version))
    with pytest.raises(ValueError, match=r"config\.json: " + message):
        read_release(release)


def test_bad_config_values_are_refused_naming_the_file(release):
    edit_config(release, lambda c: c["quantizer"].update(colour="blue"))
    with pytest.raises(ValueError, match=r"config\.json: .*unknown key 'quantizer.colour'"):
        Tokenizer.from_pretrained(release)
    edit_config(release, lambda c: (c["quantizer"].pop("colour"), c.update(codebook_size=99)))
    with pytest.raises(ValueError, match=r"config\.json: codebook_size is 99 .* has 16"):
        Tokenizer.from_pretrained(release)
    edit_config(release, lambda c: (c.update(codebook_size=16), c["quantizer"].update(search="x")))
    with pytest.raises(ValueError, match=r"config\.json: quantizer.search must be"):
        Tokenizer.from_pretrained(release)


# ---------------------------------------------------------------------- file modes


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_release_files_follow_the_umask(tmp_path, umask, mode):
    tok = Tokenizer.from_pretrained(V1_RELEASE)
    old = os.umask(umask)
    try:
        rel = tok.save_pretrained(tmp_path / "rel")
        tok.save_pretrained(rel)  # over an existing release too
    finally:
        os.umask(old)
    assert sorted(p.name for p in rel.iterdir()) == ["config.json", "model.safetensors"]
    for name in ("config.json", "model.safetensors"):
        assert (rel / name).stat().st_mode & 0o777 == mode, name


# ---------------------------------------------------------------------- encode / decode


def test_an_image_of_odd_size_is_refused_with_the_way_out(release):
    tok = Tokenizer.from_pretrained(release)
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (517, 333, 3), np.uint8))  # 333 wide
    with pytest.raises(ValueError) as info:
        tok.encode(image)
    message = str(info.value)
    assert "(517, 333) is not divisible by the downsampling factor 4" in message
    assert "tok.preprocess(images)" in message and "16x16" in message
    assert "multiple of 4 on each side (here (516, 332))" in message
    assert tok.encode(tok.preprocess(image)).shape == (1, 4, 4)  # the way out works
    assert tok.encode(np.asarray(image)[:516, :332]).shape == (1, 129, 83)  # so does this


def test_decode_of_one_grid_gives_one_image(release, pixels):
    tok = Tokenizer.from_pretrained(release)
    codes = tok.encode(pixels)  # (2, 4, 4)
    one = tok.decode(codes[1])  # (h, w), as an index shard stores a sample
    assert one.shape == (3, 16, 16)
    # A batch of one may take other conv kernels than a batch of two: equal to rounding.
    assert torch.allclose(one, tok.decode(codes)[1], atol=1e-6)
    assert torch.equal(tok.decode(codes[1].numpy().astype(np.uint16)), one)
    for bad in (codes.flatten(), codes[None]):
        with pytest.raises(ValueError, match=r"\(B, h, w\) or one grid \(h, w\)"):
            tok.decode(bad)


# ---------------------------------------------------------------------- search backends


def _release_with_search(tmp_path: Path, search: str, **options) -> Path:
    """A release of K=256 codes, trained (as it claims) with `search`."""
    torch.manual_seed(3)
    cfg = load_config(
        overrides=[
            "model.channels=[4,8]",
            "model.res_channels=4",
            "model.num_res_blocks=1",
            "quantizer.codebook_size=256",
            "quantizer.code_dim=4",
            "quantizer.l2_normalize=true",
            "quantizer.init=data",
            "data.resolution=32",
            f"quantizer.search={search}",
            *(f"quantizer.{k}={v}" for k, v in options.items()),
        ]
    )
    # Built with the torch search: what the release says is what is under test.
    model = build_model(
        dataclasses.replace(cfg, quantizer=dataclasses.replace(cfg.quantizer, search="torch"))
    )
    # One training forward puts the codes on encoder outputs (init=data), so that images
    # use many codes (a random codebook sends them all to one).
    model.train()
    model(torch.rand(8, 3, 32, 32) * 2 - 1)
    return Tokenizer(model, cfg, search="torch").save_pretrained(tmp_path / search)


@NEEDS_FAISS
@pytest.mark.parametrize(
    ("search", "runs"), [("faiss", "faiss"), ("faiss-ivf", "faiss"), ("auto", "auto")]
)
def test_a_release_with_a_faiss_search_gives_the_exact_codes(tmp_path, search, runs):
    rel = _release_with_search(tmp_path, search, ivf_nlist=64, ivf_nprobe=1)
    images = torch.rand(4, 3, 32, 32)
    exact = Tokenizer.from_pretrained(rel, search="torch")
    assert isinstance(exact.model.quantizer.search, TorchSearch)
    want = exact.encode(images)  # (4, 8, 8)
    assert len(set(want.flatten().tolist())) > 50
    tok = Tokenizer.from_pretrained(rel)
    # Exact faiss, also for faiss-ivf ("auto" finds faiss installed).
    assert type(tok.model.quantizer.search) is FaissSearch and tok.search_backend == runs
    assert torch.equal(tok.encode(images), want)
    assert tok.fingerprint == exact.fingerprint
    if search == "faiss-ivf":
        # The IVF search the release was trained with would give other codes here: what
        # makes the exact search at inference a choice this test can see.
        z = tok.model.quantizer._to_lookup(
            tok.model.encode(images * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 4)
        )
        ivf = FaissIVFSearch(nlist=64, nprobe=1)(z, tok.codebook.float()).indices
        assert not torch.equal(ivf, want.flatten())


@pytest.mark.parametrize("trained", ["faiss", "faiss-ivf"])
def test_a_faiss_release_loads_without_faiss_when_told_to_search_in_torch(
    tmp_path, monkeypatch, trained
):
    rel = _release_with_search(tmp_path, trained)
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now fails
    with pytest.raises(ImportError, match=r"needs faiss.*or pass search='torch'"):
        Tokenizer.from_pretrained(rel, search="faiss")
    # The release's default falls back to the exact torch search: the same codes.
    fallback = Tokenizer.from_pretrained(rel)
    assert isinstance(fallback.model.quantizer.search, TorchSearch)
    assert fallback.search_backend == "torch"
    tok = Tokenizer.from_pretrained(rel, search="torch")
    images = torch.rand(1, 3, 32, 32)
    assert torch.equal(fallback.encode(images), tok.encode(images))
    assert isinstance(tok.model.quantizer.search, TorchSearch)
    assert tok.encode(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8)
    with pytest.raises(ValueError, match="searches exactly"):
        Tokenizer.from_pretrained(rel, search="faiss-ivf")
