"""Shard specs: paths, brace patterns, globs and lists of them, as train, eval and
tokenize read them; errors name the config key (or option) and the pattern."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenizer.data.shard_specs import (
    ShardSpecError,
    check_shards_exist,
    expand_shards,
    resolve_shards,
)
from tokenizer.data.writer import write_shards

ROOT = Path(__file__).resolve().parents[1]


def touch(root: Path, *names: str) -> list[str]:
    paths = []
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        paths.append(str(path))
    return paths


def test_a_glob_names_every_matching_file_sorted(tmp_path):
    # Created out of order: the listing order of the file system must not leak through.
    touch(tmp_path, "000002.tar", "000000.tar", "000001.tar", "notes.txt")
    (tmp_path / "sub.tar").mkdir()  # a folder is never a shard
    expected = [str(tmp_path / f"00000{i}.tar") for i in range(3)]
    assert expand_shards(f"{tmp_path}/*.tar") == expected
    assert expand_shards(f"{tmp_path}/00000?.tar") == expected
    assert expand_shards(f"{tmp_path}/00000[0-2].tar") == expected


def test_double_star_recurses(tmp_path):
    touch(tmp_path, "a/000000.tar", "a/b/000001.tar", "c/000002.tar", "top.tar")
    found = expand_shards(f"{tmp_path}/**/*.tar")
    rel = [str(Path(p).relative_to(tmp_path)) for p in found]
    assert rel == sorted(["a/000000.tar", "a/b/000001.tar", "c/000002.tar", "top.tar"])


def test_braces_are_expanded_before_globs_and_lists_mix_both(tmp_path):
    touch(tmp_path, "train/000000.tar", "train/000001.tar", "extra/x1.tar", "extra/x0.tar")
    spec = [f"{tmp_path}/{{train,extra}}/*.tar", f"{tmp_path}/train/{{000000..000001}}.tar"]
    rel = [str(Path(p).relative_to(tmp_path)) for p in expand_shards(spec)]
    # Each glob sorted, in the list's order; a shard named twice is kept once.
    assert rel == ["train/000000.tar", "train/000001.tar", "extra/x0.tar", "extra/x1.tar"]


def test_duplicates_are_dropped_keeping_the_first_place(tmp_path):
    a, b = touch(tmp_path, "a.tar", "b.tar")
    assert expand_shards([b, a, f"{tmp_path}/./b.tar", f"{tmp_path}/*.tar"]) == [b, a]


def test_plain_paths_and_brace_patterns_need_no_files():
    assert expand_shards("d/{000000..000002}.tar") == [f"d/00000{i}.tar" for i in range(3)]
    assert expand_shards(["a/{0..1}.tar", "b.tar"]) == ["a/0.tar", "a/1.tar", "b.tar"]
    assert expand_shards(None) == []


def test_an_existing_file_with_glob_characters_is_taken_literally(tmp_path):
    (odd,) = touch(tmp_path, "shard[1].tar")
    touch(tmp_path, "shard1.tar")  # what the glob "shard[1].tar" would match
    assert expand_shards(odd) == [odd]
    assert expand_shards(expand_shards(odd)) == [odd]


def test_a_glob_matching_nothing_names_the_key_the_pattern_and_the_missing_folder(tmp_path):
    pattern = f"{tmp_path}/nowhere/*.tar"
    with pytest.raises(
        ShardSpecError, match=r"data\.train_shards: .*nowhere/\*\.tar' matches no file"
    ) as err:
        resolve_shards(pattern, "data.train_shards", required=True)
    assert f"(no folder {tmp_path}/nowhere)" in str(err.value)
    touch(tmp_path, "here/a.txt")
    with pytest.raises(ShardSpecError, match=r"--input: .*here/\*\.tar' matches no file$"):
        resolve_shards([f"{tmp_path}/here/*.tar"], "--input", required=True)


def test_missing_shards_name_the_key_and_the_spec(tmp_path):
    (present,) = touch(tmp_path, "000000.tar")
    spec = f"{tmp_path}/{{000000..000002}}.tar"
    with pytest.raises(ShardSpecError) as err:
        resolve_shards(spec, "data.eval_shards", required=False)
    message = str(err.value)
    assert message.startswith(f"data.eval_shards='{spec}': 2 of 3 shards missing: ")
    assert f"{tmp_path}/000001.tar, {tmp_path}/000002.tar" in message
    assert "no folder" not in message  # the folder exists, the files do not
    assert resolve_shards(present, "data.eval_shards", required=False) == [present]
    # One pattern in a list (argparse's nargs="+") is shown as the pattern itself.
    with pytest.raises(ShardSpecError, match=rf"^--input='{tmp_path}/x\.tar': 1 of 1 shards"):
        resolve_shards([f"{tmp_path}/x.tar"], "--input", required=True)


def test_missing_shards_are_still_file_not_found_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"shards: 1 of 1 shards missing: .*x\.tar"):
        check_shards_exist([str(tmp_path / "x.tar")])
    check_shards_exist([])


def test_an_empty_spec_is_an_error_only_when_required():
    assert resolve_shards(None, "data.eval_shards", required=False) == []
    assert resolve_shards([], "data.eval_shards", required=False) == []
    with pytest.raises(ShardSpecError, match=r"data\.train_shards is empty: .*glob"):
        resolve_shards(None, "data.train_shards", required=True)


def test_a_spec_that_is_not_strings_is_refused_naming_the_key():
    with pytest.raises(TypeError, match=r"data\.train_shards: .*got 3"):
        expand_shards(3, "data.train_shards")
    with pytest.raises(TypeError, match=r"data\.train_shards: .*entries must be strings"):
        expand_shards(["a.tar", 3], "data.train_shards")


@pytest.mark.slow  # starts launch/train.py in a fresh process
def test_training_refuses_missing_eval_shards_naming_the_key_without_a_traceback(tmp_path):
    train_dir = tmp_path / "mine"
    write_shards(({"__key__": f"k{i}", "png": b"x"} for i in range(4)), train_dir, 2)
    eval_spec = f"{tmp_path}/held-out/{{000000..000001}}.tar"
    done = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            "configs/demo.yaml",
            f"data.train_shards={train_dir}/*.tar",
            f"data.eval_shards={eval_spec}",
            f"run.dir={tmp_path / 'run'}",
            "logging.tensorboard=false",
        ],  # fmt: skip
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: data.eval_shards='{eval_spec}': 2 of 2 shards missing: ")
    assert last.endswith(f"(no folder {tmp_path}/held-out)")
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written
