"""Turn a prior run's newest checkpoint into a prior release (config.json +
model.safetensors), which tools/sample_prior.py --prior takes like the run itself.

python tools/export_prior.py --run runs/demo/prior --output runs/demo/prior/release
"""

from __future__ import annotations

import argparse
import sys

from tokenizer.training.prior_run import export_prior_release


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="the prior's run directory")
    parser.add_argument("--checkpoint", default=None, help="a checkpoint folder (default: newest)")
    parser.add_argument("--output", required=True, help="release directory to write")
    args = parser.parse_args(argv)
    try:
        out = export_prior_release(args.run, args.output, args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {out.directory} from {out.checkpoint} (step {out.step}); it samples codes of "
        f"tokenizer {out.tokenizer_sha256}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
