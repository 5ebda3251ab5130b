"""Train like launch/train.py, then save this rank's quantizer state for comparison.

accelerate launch ... tests/scripts/train_and_dump.py --dump DIR --config cfg.yaml [k=v ...]
"""

import argparse
import os
from pathlib import Path

from safetensors.torch import save_file

from tokenizer.cli.lifecycle import close_distributed, exit_rank
from tokenizer.config import load_config
from tokenizer.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", required=True)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    result = train(load_config(*args.config, overrides=args.overrides))
    rank = int(os.environ.get("RANK", "0"))
    # Every grid's quantizer: `quantizer.*` for one grid, `quantizer.<grid>.*` for several.
    state = result.model.quantizer.state_dict()
    out = Path(args.dump)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    save_file(tensors, str(out / f"quantizer_rank{rank}.safetensors"))
    close_distributed()


if __name__ == "__main__":
    main()
    exit_rank(0)
