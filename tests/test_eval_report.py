"""tools/eval_tokenizer.py --out: the report's numbers against direct computations on the
same images (PSNR, SSIM, LPIPS, codebook usage per grid, rFID from both Inception
formats against scipy's sqrtm), what it says without weights, and 2 processes writing
the report 1 process writes."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from eval_helpers import (
    eval_tool,
    write_lpips_files,
    write_state_dict_inception,
    write_torchscript_inception,
)
from PIL import Image
from test_fid import scipy_fid
from tokenize_helpers import Sources, save_tiny_release, tiny_two_grid_tokenizer, write_sources

from tokenizer import Tokenizer
from tokenizer.evaluation.fid import FeatureStats, stats_distance
from tokenizer.evaluation.metrics import psnr_per_image, ssim_per_image, to_uint8
from tokenizer.evaluation.networks import load_inception
from tokenizer.evaluation.reader import iter_keyed_batches
from tokenizer.losses.perceptual_setup import load_lpips

pytestmark = pytest.mark.slow  # each test starts the tool in fresh processes


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("eval_report")
    backbone, heads = write_lpips_files(root / "lpips")
    return {
        "root": root,
        "release": save_tiny_release(root / "release"),
        # 3 shards of 6 (shard 1: one undecodable sample, one without an image).
        "sources": write_sources(root / "eval", num_shards=3, per_shard=6),
        "torchscript": write_torchscript_inception(root / "inception-2015-12-05.pt"),
        "backbone": backbone,
        "heads": heads,
    }


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def _direct(tok: Tokenizer, sources: Sources, resolution: int) -> dict:
    """Everything the report computes, computed here on one batch of every image."""
    batches = list(iter_keyed_batches(sources.paths, resolution, 1000))
    keys = [k for b in batches for k in b.keys]
    x = torch.cat([b.images for b in batches])  # (N, 3, R, R) in [-1, 1]
    with torch.no_grad():
        recon = tok.model(x).reconstruction.clamp(-1, 1)
    order = np.argsort(keys, kind="stable")
    return {
        "keys": [keys[i] for i in order],
        "x": x[order],
        "recon": recon[order],
        "psnr": psnr_per_image(x, recon)[order].tolist(),
        "ssim": ssim_per_image(x, recon)[order].tolist(),
        "codes": tok.model.encode_codes(x),
    }


# A random tiny tokenizer reconstructs nearly one image for all: a singular covariance,
# which scipy's sqrtm warns about (and pytorch-fid's formula still handles).
@pytest.mark.filterwarnings("ignore:Matrix is singular")
def test_report_numbers_equal_direct_computations(files):
    out = files["root"] / "report_ts"
    done = eval_tool(
        "--tokenizer", str(files["release"]), "--input", files["sources"].pattern,
        "--batch-size", "4", "--out", str(out), "--no-progress",
        "--inception", str(files["torchscript"]),
        "--lpips-backbone", str(files["backbone"]), "--lpips-heads", str(files["heads"]),
    )  # fmt: skip
    report = _report(out)
    tok = Tokenizer.from_pretrained(files["release"])
    direct = _direct(tok, files["sources"], 16)
    per_image = report["per_image"]
    assert [r["key"] for r in per_image] == direct["keys"] == sorted(files["sources"].good_keys)
    np.testing.assert_allclose([r["psnr"] for r in per_image], direct["psnr"], rtol=1e-5)
    np.testing.assert_allclose([r["ssim"] for r in per_image], direct["ssim"], rtol=1e-5, atol=1e-6)
    lpips, _ = load_lpips(str(files["backbone"]), str(files["heads"]))
    expected_lpips = lpips(direct["x"], direct["recon"]).tolist()
    np.testing.assert_allclose([r["lpips"] for r in per_image], expected_lpips, rtol=1e-4)
    metrics = report["metrics"]
    assert metrics["num_images"] == 16
    assert metrics["psnr"] == pytest.approx(np.mean(direct["psnr"]), rel=1e-6)
    assert metrics["lpips"] == pytest.approx(np.mean(expected_lpips), rel=1e-4)
    # rFID: the extractor's features of the uint8 originals and reconstructions, and
    # pytorch-fid's formula with scipy's sqrtm.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        extractor = torch.jit.load(str(files["torchscript"]))
    with torch.no_grad():
        real = extractor(to_uint8(direct["x"]), return_features=True).double().numpy()
        fake = extractor(to_uint8(direct["recon"]), return_features=True).double().numpy()
    assert report["rfid"]["computed"] and report["rfid"]["extractor"] == "torchscript"
    assert report["rfid"]["features"] == real.shape[1]
    assert metrics["rfid"] > 0
    assert metrics["rfid"] == pytest.approx(scipy_fid(real, fake), rel=1e-4)
    # Codebook usage over every image, and what was read and how.
    grid = report["codebook"]["tokens"]
    codes = direct["codes"]["tokens"]
    assert grid["codes_used"] == codes.unique().numel()
    assert grid["codes_counted"] == codes.numel() == 16 * 4 * 4
    counts = np.load(out / "code_counts_tokens.npy")
    np.testing.assert_array_equal(counts, np.bincount(codes.flatten().numpy(), minlength=32))
    assert report["tokenizer"]["fingerprint"] == tok.fingerprint
    assert report["data"]["shards"] == files["sources"].paths
    assert report["data"]["num_skipped"] == 2
    assert {s["key"]: s["reason"].split(":")[0] for s in report["data"]["skipped"]} == {
        "img1_002": "cannot decode png",
        "img1_003": "no image field (one of jpg, jpeg, png, webp, bmp, gif, tif, tiff)",
    }
    assert report["preprocessing"]["resolution"] == 16
    assert set(report["versions"]) >= {"python", "torch", "vq-tokenizer"}
    # The worst images, lowest PSNR first, and the figures report.md shows.
    lowest = sorted(zip(direct["psnr"], direct["keys"], strict=True))[:8]
    assert [w["key"] for w in report["worst"]] == [k for _, k in lowest]
    worst = Image.open(out / "worst.png")
    assert worst.size == (8 * 18 + 2, 2 * 18 + 2)  # 8 columns, originals above recons
    assert Image.open(out / "usage_tokens.png").size == (640, 360)
    markdown = (out / "report.md").read_text()
    assert "| PSNR |" in markdown and "![worst reconstructions](worst.png)" in markdown
    assert "(usage_tokens.png)" in markdown
    assert json.loads(done.stdout.strip().splitlines()[-1])["rfid"] == metrics["rfid"]


def test_pytorch_fid_state_dict_gives_the_same_rfid_as_its_features(files):
    weights = write_state_dict_inception(files["root"] / "pt_inception.pth", seed=1)
    out = files["root"] / "report_sd"
    eval_tool("--tokenizer", str(files["release"]), "--input", files["sources"].pattern,
              "--out", str(out), "--no-progress", "--inception", str(weights))  # fmt: skip
    report = _report(out)
    assert report["rfid"]["extractor"] == "pytorch-fid state dict"
    assert report["rfid"]["features"] == 2048
    direct = _direct(Tokenizer.from_pretrained(files["release"]), files["sources"], 16)
    network = load_inception(str(weights))
    real, fake = FeatureStats.zeros(2048), FeatureStats.zeros(2048)
    with torch.no_grad():
        real.add(network(to_uint8(direct["x"])))
        fake.add(network(to_uint8(direct["recon"])))
    assert report["metrics"]["rfid"] > 0
    assert report["metrics"]["rfid"] == pytest.approx(stats_distance(real, fake), rel=1e-4)
    assert report["lpips"] == {"computed": False, "reason": "no --lpips-backbone given"}
    assert report["metrics"]["lpips"] is None and report["per_image"][0]["lpips"] is None


def test_without_inception_the_report_says_why_and_where_to_get_it(files):
    out = files["root"] / "report_plain"
    done = eval_tool("--tokenizer", str(files["release"]), "--shards", files["sources"].pattern,
                     "--out", str(out), "--no-progress")  # fmt: skip
    report = _report(out)
    assert report["metrics"]["rfid"] is None and not report["rfid"]["computed"]
    assert report["rfid"]["reason"] == "no Inception weights given"
    how = report["rfid"]["how"]
    assert "--inception" in how
    assert "inception-2015-12-05.pt" in how and "pt_inception-2015-12-05-6726825d.pth" in how
    assert "rFID not computed: no Inception weights given" in (out / "report.md").read_text()
    assert "rFID: not computed" in done.stdout


def test_a_two_grid_tokenizer_reports_usage_per_grid(tmp_path):
    tok = tiny_two_grid_tokenizer(resolution=32)
    release = tok.save_pretrained(tmp_path / "release")
    sources = write_sources(tmp_path / "eval", num_shards=1, per_shard=5)
    out = tmp_path / "report"
    done = eval_tool("--tokenizer", str(release), "--input", sources.pattern, "--out", str(out),
                     "--no-progress")  # fmt: skip
    report = _report(out)
    assert set(report["codebook"]) == {"top", "bottom"}
    direct = _direct(Tokenizer.from_pretrained(release), sources, 32)
    for grid, shape in (("top", [4, 4]), ("bottom", [8, 8])):
        entry = report["codebook"][grid]
        codes = direct["codes"][grid]  # (5, h, w)
        assert entry["grid_shape"] == shape and entry["codebook_size"] == 32
        assert entry["codes_used"] == codes.unique().numel()
        assert entry["usage"] == pytest.approx(codes.unique().numel() / 32)
        assert (out / f"usage_{grid}.png").is_file()
        assert f"(usage_{grid}.png)" in (out / "report.md").read_text()
        # What the grid carries: the mean of the per-image PSNRs with its codes random.
        per_image = [e["random_codes_psnr"][grid] for e in report["per_image"]]
        assert entry["random_codes_psnr"] == pytest.approx(np.mean(per_image))
        drop = report["metrics"]["psnr"] - entry["random_codes_psnr"]
        assert entry["random_codes_psnr_drop"] == pytest.approx(drop)
    assert "PSNR, its codes random" in (out / "report.md").read_text()
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"usage/top", "usage/bottom", "perplexity/top", "perplexity/bottom"} <= set(summary)
    assert {"random_codes_psnr/top", "random_codes_psnr/bottom"} <= set(summary)


def _without_run(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "run"}


def test_two_processes_write_the_report_of_one(files):
    # Rank 0 reads shards 0 and 2 (12 images), rank 1 shard 1 (4 good of 6): unequal
    # shares. Every shard holds an even number of good images, so with batches of 2 each
    # image meets the same batch neighbours in both runs: per-image values are exact.
    common = (
        "--tokenizer", str(files["release"]), "--input", files["sources"].pattern,
        "--batch-size", "2", "--no-progress", "--inception", str(files["torchscript"]),
        "--lpips-backbone", str(files["backbone"]), "--lpips-heads", str(files["heads"]),
    )  # fmt: skip
    one, two = files["root"] / "one", files["root"] / "two"
    eval_tool(*common, "--out", str(one))
    eval_tool(*common, "--out", str(two), processes=2)
    a, b = _report(one), _report(two)
    assert (a["run"]["processes"], b["run"]["processes"]) == (1, 2)
    assert b["metrics"]["rfid"] == pytest.approx(a["metrics"]["rfid"], rel=1e-9)
    assert b["rfid"]["computed"] and a["metrics"]["num_images"] == 16
    for report in (a, b):
        report["metrics"].pop("rfid")
        report["rfid"].pop("value")
    # Counts, keys, skipped samples, per-image values and their means: exactly equal.
    assert _without_run(a) == _without_run(b)
    for name in ("code_counts_tokens.npy", "worst.png", "usage_tokens.png"):
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
