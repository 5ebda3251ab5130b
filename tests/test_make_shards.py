"""make_shards --input: every image decode-checked, every PIL format taken, bad and
non-image files skipped with their reasons, the output folder protected, progress shown."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from tokenizer.cli.status_line import StatusLine
from tokenizer.data.folder import BAD_IMAGE, BAD_SIDECAR, NON_IMAGE, FolderPacker
from tokenizer.data.images.check import BadImage, check_image
from tokenizer.data.images.modes import as_rgb
from tokenizer.data.tars import decode_image, read_tar
from tokenizer.data.writer import OutputNotEmpty, prepare_output, write_shards

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "make_shards.py"


def pixels(seed: int, size: tuple[int, int] = (48, 40), channels: int = 3) -> np.ndarray:
    # Smooth gradients plus noise: lossy encoders keep them close, and a cut file is
    # missing real data, not padding.
    rng = np.random.default_rng(seed)
    h, w = size
    ramp = np.linspace(0, 200, w, dtype=np.float64)[None, :, None] + np.zeros((h, 1, channels))
    return np.clip(ramp + rng.integers(0, 55, (h, w, channels)), 0, 255).astype(np.uint8)


def encoded(array: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    image = Image.fromarray(array.squeeze())
    if fmt == "GIF":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE)
    image.save(out, fmt, **options)
    return out.getvalue()


def rgb(data: bytes) -> np.ndarray:
    """What the training reader makes of a file (alpha composited, 16-bit by range)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(as_rgb(image))


# name -> (bytes written, field expected in the shard, stored as the file's own bytes?)
def good_files() -> dict[str, tuple[bytes, str, bool]]:
    return {
        "a.jpg": (encoded(pixels(1), "JPEG", quality=90), "jpg", True),
        "b.png": (encoded(pixels(2), "PNG"), "png", True),
        "c.webp": (encoded(pixels(3), "WEBP", lossless=True), "webp", True),
        "d.bmp": (encoded(pixels(4), "BMP"), "bmp", True),
        "e.gif": (encoded(pixels(5), "GIF"), "gif", True),
        "f.tiff": (encoded(pixels(6), "TIFF"), "tiff", True),
        "sub/g.JPEG": (encoded(pixels(7), "JPEG"), "jpeg", True),
        "h.jfif": (encoded(pixels(8), "JPEG"), "jpg", True),
        "p.ppm": (encoded(pixels(9), "PPM"), "png", False),
        "q.tga": (encoded(pixels(10, channels=4), "TGA"), "png", False),
        "r.ico": (encoded(pixels(11, size=(32, 32)), "ICO", sizes=[(32, 32)]), "png", False),
    }


def cut(data: bytes) -> bytes:
    return data[: len(data) // 2]


def make_folder(root: Path) -> dict[str, tuple[bytes, str, bool]]:
    good = good_files()
    bad = {
        "empty.jpg": b"",
        "cut.jpg": cut(encoded(pixels(20, size=(96, 96)), "JPEG")),
        "cut.png": cut(encoded(pixels(21, size=(96, 96)), "PNG")),
        "text.png": b"this is a text file, not a PNG\n",
        "table.csv": b"a,b\n1,2\n",
        "a.txt": b"a caption for a",
        "b.json": json.dumps({"source": "b"}).encode(),
        "c.json": b"{not json",
        "orphan.txt": b"no image is called orphan",
    }
    for name, data in {**{n: v[0] for n, v in good.items()}, **bad}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return good


def read_back(out: Path) -> dict:
    errors: list[str] = []
    samples = {
        s.key: s for tar in sorted(out.glob("*.tar")) for s in read_tar(str(tar), errors.append)
    }
    assert errors == []
    return samples


def key_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def test_folder_packs_every_format_and_skips_what_does_not_decode(tmp_path: Path):
    folder, out = tmp_path / "photos", tmp_path / "shards"
    good = make_folder(folder)
    heard = []
    packer = FolderPacker(folder, workers=3, on_skip=heard.append)
    infos = write_shards(packer.samples(), out, samples_per_shard=4)
    assert [Path(i.path).name for i in infos] == ["000000.tar", "000001.tar", "000002.tar"]

    samples = read_back(out)
    assert sorted(samples) == sorted(key_of(n) for n in good)
    for name, (data, field, as_is) in good.items():
        sample = samples[key_of(name)]
        extra = {"a": {"txt"}, "b": {"json"}}.get(key_of(name), set())
        assert set(sample.fields) == {field} | extra, name
        decoded = np.asarray(decode_image(sample, resolution=96))
        if as_is:
            assert sample.fields[field] == data, name
        # Every stored image reads back as the file's own pixels (PNG re-encodes included).
        assert np.array_equal(decoded, rgb(data)), name
    assert samples["a"].fields["txt"] == b"a caption for a"
    assert json.loads(samples["b"].fields["json"]) == {"source": "b"}

    reasons = {
        s.path.relative_to(folder).as_posix(): (s.kind, s.reason) for s in packer.counts.skipped
    }
    assert set(reasons) == {
        "empty.jpg", "cut.jpg", "cut.png", "text.png", "table.csv", "orphan.txt", "c.json"
    }  # fmt: skip
    assert reasons["empty.jpg"] == (BAD_IMAGE, "empty file (0 bytes)")
    assert reasons["cut.jpg"][0] == BAD_IMAGE and "truncated" in reasons["cut.jpg"][1]
    assert reasons["cut.png"][0] == BAD_IMAGE and "truncated" in reasons["cut.png"][1]
    assert reasons["text.png"] == (BAD_IMAGE, "not an image PIL can identify (31 bytes)")
    assert reasons["table.csv"] == (NON_IMAGE, "not an image (extension '.csv')")
    assert reasons["orphan.txt"] == (NON_IMAGE, "a .txt with no image of the same name")
    assert (
        reasons["c.json"][0] == BAD_SIDECAR
        and "c.webp is stored without its json" in reasons["c.json"][1]
    )
    # on_skip hears of the images and sidecars as they are checked; non-images are known up front.
    assert sorted(s.path.name for s in heard) == [
        "c.json",
        "cut.jpg",
        "cut.png",
        "empty.jpg",
        "text.png",
    ]
    counts = packer.counts
    assert (counts.images_total, counts.images_done) == (len(good) + 4, len(good) + 4)
    assert (counts.stored, counts.reencoded) == (len(good), 3)


def test_one_worker_and_many_give_identical_shards(tmp_path: Path):
    make_folder(tmp_path / "photos")
    for workers in (1, 4):
        write_shards(FolderPacker(tmp_path / "photos", workers).samples(), tmp_path / f"w{workers}")
    assert (tmp_path / "w1" / "000000.tar").read_bytes() == (
        tmp_path / "w4" / "000000.tar"
    ).read_bytes()


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, -2, -1])
def test_truncated_jpeg_is_caught_at_any_cut(keep: float):
    # Decoding at 1/8 scale (JPEG draft) must still read up to the last byte.
    data = encoded(pixels(30, size=(256, 320)), "JPEG", quality=95)
    end = int(len(data) * keep) if keep > 0 else len(data) + int(keep)
    with pytest.raises(BadImage, match="truncated"):
        check_image(data[:end], "jpg")
    progressive = encoded(pixels(30, size=(256, 320)), "JPEG", progressive=True)
    end = int(len(progressive) * keep) if keep > 0 else len(progressive) + int(keep)
    with pytest.raises(BadImage, match="truncated"):
        check_image(progressive[:end], "jpg")


def test_reencoded_png_keeps_mode_and_16_bit_values():
    deep = (np.arange(40 * 48, dtype=np.uint16).reshape(40, 48) * 30).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(deep).save(out, "PPM")  # a 16-bit PGM
    checked = check_image(out.getvalue(), "pgm")
    assert checked.reencoded and checked.field == "png"
    with Image.open(io.BytesIO(checked.data)) as image:
        assert image.format == "PNG" and image.mode.startswith("I")
        assert np.array_equal(np.asarray(image).astype(np.uint16), deep)
    cmyk = io.BytesIO()
    Image.fromarray(pixels(31)).convert("CMYK").save(cmyk, "TIFF")
    # TIFF is a reader format: stored as it is, CMYK and all.
    assert check_image(cmyk.getvalue(), "tif").data == cmyk.getvalue()


def test_format_pil_identifies_but_cannot_decode_is_refused():
    # An MPEG sequence header: PIL reads the frame size and nothing else, so its "image"
    # would be blank pixels.
    mpeg = b"\x00\x00\x01\xb3" + bytes([0x03, 0x00, 0x20, 0x00]) + bytes(64)
    with pytest.raises(BadImage, match="identifies it as MPEG but cannot decode"):
        check_image(mpeg, "png")


def test_truncated_tolerance_on_is_refused(monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        check_image(encoded(pixels(0), "PNG"), "png")


def test_output_folder_refused_unless_replace_and_only_shards_deleted(tmp_path: Path):
    out = tmp_path / "out"
    assert prepare_output(out, replace=False).removed == []  # missing: fine
    out.mkdir()
    assert prepare_output(out, replace=False).removed == []  # empty: fine
    for name in ("000000.tar", "000007.tar", ".000001.tar.tmp-4242", "notes.txt", "1234567.tar"):
        (out / name).write_bytes(b"x")
    (out / "keep").mkdir()
    with pytest.raises(OutputNotEmpty) as refused:
        prepare_output(out, replace=False)
    message = str(refused.value)
    assert str(out) in message and "3 shard files" in message and "000007.tar" in message
    assert "3 other entries (1234567.tar, keep/, notes.txt)" in message
    assert len(list(out.iterdir())) == 6  # nothing touched

    prepared = prepare_output(out, replace=True)
    assert prepared.removed == [".000001.tar.tmp-4242", "000000.tar", "000007.tar"]
    assert prepared.kept == ["1234567.tar", "keep/", "notes.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["1234567.tar", "keep", "notes.txt"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_cli_reports_skips_refuses_a_used_output_and_replaces_stale_shards(tmp_path: Path):
    folder, out = tmp_path / "photos", tmp_path / "shards"
    good = make_folder(folder)
    first = run_cli("--input", str(folder), "--output", str(out), "--samples-per-shard", "2")
    assert first.returncode == 0, first.stderr
    assert f"skipped {folder / 'empty.jpg'}: empty file (0 bytes)" in first.stderr
    assert f"skipped {folder / 'text.png'}: not an image PIL can identify" in first.stderr
    assert "skipping 2 non-image files (1 .csv, 1 .txt)" in first.stderr
    # Not a terminal: progress comes as plain lines, the last one the final count.
    assert "\r" not in first.stderr
    assert f"{len(good) + 4}/{len(good) + 4} images checked" in first.stderr.splitlines()[-1]
    assert first.stdout.splitlines()[0] == (
        f"wrote {len(good)} samples in 6 shards (3 images re-encoded as PNG); skipped 7 files: "
        "4 images that do not decode, 2 non-image files (1 .csv, 1 .txt), "
        "1 unreadable .txt/.json sidecars"
    )
    assert f"shards: {out}/{{000000..000005}}.tar" in first.stdout

    again = run_cli("--input", str(folder), "--output", str(out))
    assert again.returncode == 2
    assert f"output folder {out} is not empty: it holds 6 shard files" in again.stderr
    assert "--replace" in again.stderr

    (out / "README").write_text("mine")
    replaced = run_cli("--input", str(folder), "--output", str(out), "--replace", "--no-progress")
    assert replaced.returncode == 0, replaced.stderr
    assert "images checked" not in replaced.stderr
    assert "wrote 11 samples in 1 shards" in replaced.stdout
    # The five stale shards of the first run are gone, the user's file is not.
    assert sorted(p.name for p in out.iterdir()) == ["000000.tar", "README"]
    assert len(read_back(out)) == len(good)


def test_cli_refuses_mixed_options_and_folders_without_images(tmp_path: Path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.csv").write_text("x")
    empty = run_cli("--input", str(tmp_path / "docs"), "--output", str(tmp_path / "out"))
    assert (
        empty.returncode == 1
        and "no images under" in empty.stderr
        and "1 other files" in empty.stderr
    )
    assert not (tmp_path / "out").exists()
    mixed = run_cli("--input", str(tmp_path), "--output", str(tmp_path / "o"), "--resolution", "32")
    assert mixed.returncode == 2 and "--resolution only apply to --sample-images" in mixed.stderr
    demo = run_cli("--sample-images", "--output", str(tmp_path / "o"), "--replace")
    assert demo.returncode == 2 and "--force" in demo.stderr


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_status_line_redraws_on_a_terminal_and_prints_lines_otherwise():
    tty = FakeTerminal()
    line = StatusLine(tty, interval=0)
    line.update("1/2 images")
    line.note("skipped x.jpg: empty file (0 bytes)")
    line.update("2/2 images")
    line.close()
    assert tty.getvalue() == (
        "1/2 images" + "\r" + " " * 10 + "\r" + "skipped x.jpg: empty file (0 bytes)\n2/2 images\n"
    )
    log = io.StringIO()
    line = StatusLine(log, interval=3600)
    line.update("first")
    line.update("too soon")  # within the interval: not printed
    line.close("last")
    assert log.getvalue() == "first\nlast\n"
    quiet = io.StringIO()
    line = StatusLine(quiet, enabled=False)
    line.update("x")
    line.note("a skip is still reported")
    line.close("y")
    assert quiet.getvalue() == "a skip is still reported\n"
