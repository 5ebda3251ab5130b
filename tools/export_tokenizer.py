"""Turn a run directory's newest checkpoint into a release directory.

python tools/export_tokenizer.py --run runs/demo --output runs/demo/release
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tokenizer.training.export import export_release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--run", required=True, help="run directory (holds config.yaml and checkpoints/)"
    )
    parser.add_argument(
        "--checkpoint", default=None, help="a checkpoint folder (default: the newest)"
    )
    parser.add_argument("--output", required=True, help="release directory to write")
    parser.add_argument(
        "--raw",
        action="store_true",
        help="release the last step's weights even when the run kept a weight EMA",
    )
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    try:
        out = export_release(Path(args.run), Path(args.output), checkpoint, raw=args.raw)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {out.directory} from {out.checkpoint} (step {out.step}, {out.weights} weights), "
        f"fingerprint {out.fingerprint}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
