"""The tools' --help: the docstring examples print as written (a backslash-newline in a
plain string would join two example lines into one), and defaults that fit the machine."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from tokenizer.tokenize.corpus import default_num_workers

TOOLS = sorted((Path(__file__).resolve().parents[1] / "tools").glob("*.py"))


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: p.name)
def test_the_docstring_is_the_text_as_written(path: Path):
    source = path.read_text()
    node = ast.parse(source).body[0]
    assert isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant), path
    literal = ast.get_source_segment(source, node.value)
    written = literal.lstrip("rR")[3:-3]  # the text between the triple quotes
    assert node.value.value == written, f"{path.name}: escapes change the docstring"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, TOOLS[0].parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tokenize_dataset_help_prints_each_example_line_apart(capsys):
    with pytest.raises(SystemExit):
        _load("tokenize_dataset").parse_args(["--help"])
    lines = capsys.readouterr().out.splitlines()
    assert (
        "    accelerate launch tools/tokenize_dataset.py --tokenizer runs/demo/release \\" in lines
    )
    assert "        --input 'data/{000000..000099}.tar' --output codes/ [--format npy]" in lines


def test_default_workers_follow_the_cores_per_rank(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    for cores, want in ((1, 1), (2, 2), (3, 3), (16, 4)):
        monkeypatch.setattr("os.sched_getaffinity", lambda _pid, n=cores: set(range(n)))
        assert default_num_workers() == want
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    assert default_num_workers() == 1  # two ranks on two cores: one worker each
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(16)))
    assert default_num_workers() == 4
    assert _load("tokenize_dataset").parse_args(["--verify", "x"]).num_workers is None
