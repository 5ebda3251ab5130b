"""`from tokenizer import Tokenizer` must stay light: codebases that only load a release
must not pay for (or need) the training engines, the demo builder or the stream."""

import json
import subprocess
import sys
from pathlib import Path

# Module prefixes a plain load must not import.
FORBIDDEN = (
    "accelerate",
    "deepspeed",
    "webdataset",
    "tensorboard",
    "skimage",
    "sklearn",
    "faiss",
    "tokenizer.data.demo",
    "tokenizer.data.stream",
    "tokenizer.training",
    "tokenizer.tokenize",
)

PROBE = """
import json, sys
from tokenizer import Tokenizer
tok = Tokenizer.from_pretrained(sys.argv[1], search="torch")
tok.decode(tok.encode(__import__("torch").rand(1, 3, 16, 16)))
print(json.dumps(sorted(sys.modules)))
"""


def test_loading_a_release_imports_no_engine_demo_or_stream():
    release = Path(__file__).parent / "fixtures" / "release_v1"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(release)],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in loaded if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert heavy == []
