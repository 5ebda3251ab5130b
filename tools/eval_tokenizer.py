r"""Evaluate a released tokenizer on held-out shards and write a report.

    python tools/eval_tokenizer.py --tokenizer runs/demo/release \
        --input 'data/demo/eval/{000000..000001}.tar' --out runs/demo/eval
    accelerate launch tools/eval_tokenizer.py --tokenizer RELEASE_DIR \
        --input 'val/{000000..000009}.tar' --resolution 256 --batch-size 32 --out REPORT_DIR \
        --lpips-backbone vgg16-397923af.pth --inception inception-2015-12-05.pt

Prints PSNR, SSIM, LPIPS, rFID and codebook usage and perplexity per code grid (the
last stdout line is them as JSON). --out REPORT_DIR writes report.json (every number,
per image too; the tokenizer's fingerprint; the shards, image and skipped counts; the
preprocessing; versions), report.md (a table, a code-frequency plot per grid, the
lowest-PSNR images above their reconstructions) and the images it shows.

--input (or --shards) takes tar paths, brace patterns and globs. Under accelerate
launch every rank scores its share of the shards (on CPU: --multi_gpu --num_processes
N); rank 0 writes the report, the same as one process writes. LPIPS needs
--lpips-backbone (torchvision's vgg16-397923af.pth; --lpips-heads defaults to the lpips
v0.1 heads an installed torchmetrics ships); rFID needs --inception: the TorchScript
inception-2015-12-05.pt of StyleGAN2-ADA / clean-fid, or pytorch-fid's
pt_inception-2015-12-05-6726825d.pth. Without them the report says they were not
computed, and why. A progress bar on stderr counts rank 0's images against the samples
its tar headers list; --no-progress turns it off.
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from datetime import timedelta
from pathlib import Path

# Runs as a script from the repository root without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tokenizer.api import Tokenizer  # noqa: E402
from tokenizer.cli.lifecycle import close_distributed, exit_rank, exit_with_launcher  # noqa: E402
from tokenizer.data.shard_specs import ShardSpecError, resolve_shards  # noqa: E402
from tokenizer.data.slots import reader_slot  # noqa: E402
from tokenizer.data.stream import iter_eval_batches  # noqa: E402
from tokenizer.data.tars import IMAGE_EXTENSIONS, split_name  # noqa: E402
from tokenizer.distributed import gather_objects  # noqa: E402
from tokenizer.evaluation.image_grid import save_image_grid  # noqa: E402
from tokenizer.evaluation.networks import load_inception  # noqa: E402
from tokenizer.evaluation.reader import iter_keyed_batches  # noqa: E402
from tokenizer.evaluation.report import ReportContext, build_report, write_report  # noqa: E402
from tokenizer.evaluation.scoring import Collectives, Scores, score_batches  # noqa: E402
from tokenizer.losses.perceptual_setup import LPIPSFileError, load_lpips  # noqa: E402
from tokenizer.losses.weight_files import WeightsFileError  # noqa: E402
from tokenizer.release import RELEASE_CONFIG  # noqa: E402
from tokenizer.training.engine import make_accelerator  # noqa: E402

# Ranks with unequal shares meet only at the end: the first one done waits for the last.
_MEET_TIMEOUT = timedelta(hours=12)


def count_samples(path: str) -> int:
    """Samples with an image field, from the tar headers alone (tarfile seeks past the
    data); a truncated tar counts what comes before the break."""
    keys: set[str] = set()
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                name = split_name(member.name) if member.isfile() else None
                if name is not None and name[1] in IMAGE_EXTENSIONS:
                    keys.add(name[0])
    except (tarfile.TarError, OSError):
        pass  # the evaluation itself reports the shard; the total is only a guide
    return len(keys)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokenizer", required=True, help="release directory")
    parser.add_argument(
        "--input",
        "--shards",
        dest="inputs",
        required=True,
        nargs="+",
        help="held-out shards: tar paths, brace patterns or globs",
    )
    parser.add_argument("--resolution", type=int, default=0, help="default: the tokenizer's own")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, per rank")
    parser.add_argument("--out", default=None, help="report folder (report.json, report.md)")
    parser.add_argument("--lpips-backbone", default=None, help="VGG16 weights: adds LPIPS")
    parser.add_argument("--lpips-heads", default=None, help="lpips v0.1 vgg.pth heads")
    parser.add_argument("--inception", default=None, help="FID Inception weights: adds rFID")
    parser.add_argument("--worst", type=int, default=8, help="lowest-PSNR images in the report")
    parser.add_argument("--grid", default=None, help="PNG: the first images above their recons")
    parser.add_argument("--grid-images", type=int, default=8)
    parser.add_argument("--device", default=None, help="default: the accelerator's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return parser.parse_args(argv)


def _summary(scores: Scores, report: dict) -> dict[str, float | int | None]:
    """The flat figures of the last stdout line: psnr, ssim, usage and perplexity (per
    grid `usage/<grid>` with several grids, and `random_codes_psnr/<grid>`: the PSNR with
    that grid's codes random), num_images, lpips and rfid (None: not computed)."""
    m, grids = report["metrics"], report["codebook"]
    out: dict[str, float | int | None] = {"psnr": m["psnr"], "ssim": m["ssim"]}
    for name, grid in grids.items():
        suffix = "" if len(grids) == 1 else f"/{name}"
        out[f"usage{suffix}"] = grid["usage"]
        out[f"perplexity{suffix}"] = grid["perplexity"]
        if "random_codes_psnr" in grid:
            out[f"random_codes_psnr{suffix}"] = grid["random_codes_psnr"]
    out.update(num_images=m["num_images"], lpips=m["lpips"], rfid=m["rfid"])
    return out


def _describe(report: dict) -> str:
    m = report["metrics"]

    def shown(value: float | None, fmt: str) -> str:
        return "not computed" if value is None else format(value, fmt)

    grids = "  ".join(
        f"{'' if len(report['codebook']) == 1 else f'{name} '}codebook usage: "
        f"{100 * g['usage']:.1f}% of {g['codebook_size']} codes  perplexity: {g['perplexity']:.1f}"
        + (
            f"  its codes random: {-g['random_codes_psnr_drop']:+.2f} dB"
            if "random_codes_psnr_drop" in g
            else ""
        )
        for name, g in report["codebook"].items()
    )
    return (
        f"held-out images: {m['num_images']} ({report['data']['num_skipped']} skipped)  "
        f"PSNR: {shown(m['psnr'], '.2f')} dB  SSIM: {shown(m['ssim'], '.4f')}  "
        f"LPIPS: {shown(m['lpips'], '.4f')}  rFID: {shown(m['rfid'], '.2f')}  {grids}"
    )


def _progress_total(shards: list[str], rank: int, world: int) -> int:
    if len(shards) >= world:
        return sum(count_samples(s) for s in reader_slot(rank, world).take(shards))
    return sum(count_samples(s) for s in shards) // world  # samples are dealt one by one


def main(argv: list[str] | None = None) -> int:
    exit_with_launcher()  # a rank never outlives its launcher
    args = parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    option = "--shards" if any(a.startswith("--shards") for a in given) else "--input"
    try:
        shards = resolve_shards(args.inputs, option, required=True)
    except ShardSpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    accelerator = make_accelerator(timeout=_MEET_TIMEOUT)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_rank = accelerator.is_main_process
    device = torch.device(args.device) if args.device else accelerator.device
    lpips = inception = heads = None
    try:
        if args.lpips_backbone:
            lpips, heads = load_lpips(args.lpips_backbone, args.lpips_heads, device)
        if args.inception:
            inception = load_inception(args.inception, device)
    except WeightsFileError as err:
        which = err.which if isinstance(err, LPIPSFileError) else "inception"
        option = {"backbone": "--lpips-backbone", "heads": "--lpips-heads"}.get(
            which, "--inception"
        )
        print(f"error: {option}: {err}", file=sys.stderr)
        return 2
    tok = Tokenizer.from_pretrained(args.tokenizer, device=device)
    resolution = args.resolution or tok.config.data.resolution
    show = main_rank and not args.no_progress
    total = _progress_total(shards, rank, world) if show else None
    with tqdm(total=total, unit="img", desc="eval", file=sys.stderr, disable=not show) as bar:
        scores = score_batches(
            tok.model,
            iter_keyed_batches(shards, resolution, args.batch_size, rank, world),
            device,
            lpips=lpips,
            inception=inception,
            collectives=Collectives(lambda t: accelerator.reduce(t, "sum"), gather_objects),
            worst=args.worst,
            on_batch=bar.update,
        )
        if total is not None and bar.n != total:
            # Samples the headers list but that cannot be decoded (logged as warnings).
            bar.set_postfix_str(f"{total - bar.n} unreadable", refresh=False)
            bar.total = bar.n
    if main_rank:
        raw = json.loads((Path(args.tokenizer) / RELEASE_CONFIG).read_text())
        context = ReportContext(
            tokenizer_dir=args.tokenizer,
            fingerprint=tok.fingerprint,
            weights_sha256=raw.get("weights_sha256"),
            release_config=tok.release_config(),
            downsample_factors=tok.downsample_factors,
            inputs=list(args.inputs),
            shards=shards,
            resolution=resolution,
            lpips_files=(args.lpips_backbone, heads) if lpips is not None else None,
            inception=inception,
            processes=world,
            device=str(device),
            batch_size=args.batch_size,
        )
        report = build_report(scores, context)
        print(_describe(report))
        if args.out:
            print(f"wrote {write_report(report, scores, args.out)}")
        if args.grid:
            batch = next(iter(iter_eval_batches(shards, resolution, args.grid_images)))
            recon = tok.decode_grids(tok.encode_grids((batch.images.to(device) + 1.0) / 2.0))
            save_image_grid([batch.images, recon.cpu() * 2.0 - 1.0], args.grid)
            print(f"wrote {args.grid}")
        print(json.dumps(_summary(scores, report)))
    close_distributed()
    return 0


if __name__ == "__main__":
    exit_rank(main())
