"""Train a tokenizer: `accelerate launch launch/train.py --config configs/demo.yaml [key=value ...]`."""

from __future__ import annotations

import argparse
import faulthandler
import sys

from tokenizer.cli.lifecycle import close_distributed, exit_rank, exit_with_launcher
from tokenizer.config import ConfigError, load_config
from tokenizer.data.shard_specs import ShardSpecError
from tokenizer.training.loop import train


def main(argv: list[str] | None = None, task: str | None = None, doc: str = __doc__) -> int:
    """`task`: the train.task this entry point always runs (launch/train_prior.py)."""
    exit_with_launcher()  # a rank never outlives its launcher
    faulthandler.enable()  # a rank that dies on a signal (SIGSEGV, SIGABRT) says where
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument(
        "--config",
        action="append",
        required=True,
        help="YAML config; repeat to merge several (later wins)",
    )
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="save a checkpoint and exit after this step (for time-sliced jobs); "
        "the LR schedule still runs to train.max_steps",
    )
    parser.add_argument(
        "overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100"
    )
    args = parser.parse_args(argv)
    overrides = [*args.overrides, *([f"train.task={task}"] if task else [])]
    try:
        cfg = load_config(*args.config, overrides=overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    try:
        train(cfg, stop_after=args.stop_after)
    except ConfigError as err:  # a missing weight file, a task the engine cannot run
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except ShardSpecError as err:  # raised before any training: no traceback needed
        print(f"error: {err}", file=sys.stderr)
        return 2
    close_distributed()
    return 0


if __name__ == "__main__":
    exit_rank(main())
