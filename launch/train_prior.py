"""Train a prior on index shards: `accelerate launch launch/train_prior.py --config
configs/prior_pixelcnn.yaml data.train_index=DIR data.eval_index=DIR [key=value ...]`.

The tokenizer trainer's loop, engines, checkpoints and exact resume, with train.task
prior: the prior section describes the model, data.train_index / data.eval_index the
codes (folders tools/tokenize_dataset.py wrote)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import main  # noqa: E402

from tokenizer.cli.lifecycle import exit_rank  # noqa: E402

if __name__ == "__main__":
    exit_rank(main(task="prior", doc=__doc__))
