"""The evaluation report: REPORT_DIR/report.json (every number, what was evaluated and
how), report.md (a table, the code-frequency plots, the worst reconstructions) and the
images it shows.

report.json holds nothing that depends on how many processes ran, except its `run`
section (processes, device, batch size, time): two runs of the same evaluation differ
there only.
"""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tokenizer.data.images.transforms import eval_preprocessing
from tokenizer.evaluation.image_grid import image_grid
from tokenizer.evaluation.networks import INCEPTION_HINT, InceptionFeatures
from tokenizer.evaluation.scoring import ImageScore, Scores
from tokenizer.evaluation.usage_plot import usage_plot
from tokenizer.quantize.codebook import perplexity, usage

REPORT_FORMAT = "vq-tokenizer-eval-report/1"
REPORT_JSON, REPORT_MD, WORST_PNG = "report.json", "report.md", "worst.png"


def usage_png(grid: str) -> str:
    return f"usage_{grid}.png"


@dataclass
class ReportContext:
    """What the scores were computed from, for the report to say."""

    tokenizer_dir: str
    fingerprint: str
    weights_sha256: str | None
    release_config: dict[str, Any]
    downsample_factors: dict[str, int]
    inputs: list[str]  # the patterns as given
    shards: list[str]  # what they resolved to
    resolution: int
    lpips_files: tuple[str, str] | None  # (backbone, heads)
    inception: InceptionFeatures | None
    processes: int
    device: str
    batch_size: int


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("vq-tokenizer", "accelerate", "numpy", "pillow"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def _codebook(scores: Scores, ctx: ReportContext) -> dict[str, Any]:
    grids = {}
    psnr = scores.mean("psnr")
    for name, counts in scores.counts.items():
        factor = ctx.downsample_factors[name]
        grids[name] = {
            "codebook_size": int(counts.numel()),
            "grid_shape": [ctx.resolution // factor, ctx.resolution // factor],
            "codes_counted": int(counts.sum()),
            "codes_used": int((counts > 0).sum()),
            "usage": usage(counts.double()).item(),
            "perplexity": perplexity(counts.double()).item(),
            "plot": usage_png(name),
        }
        randomised = [s.random_codes_psnr[name] for s in scores.images if s.random_codes_psnr]
        if randomised and psnr is not None:
            # What the grid carries: the PSNR lost when its codes are random, the other
            # grids' kept (near 0 dB: the decoder ignores this grid).
            mean = sum(randomised) / len(randomised)
            grids[name]["random_codes_psnr"] = mean
            grids[name]["random_codes_psnr_drop"] = psnr - mean
    return grids


def _rfid(scores: Scores, ctx: ReportContext) -> dict[str, Any]:
    if ctx.inception is None:
        return {"computed": False, "reason": "no Inception weights given", "how": INCEPTION_HINT}
    described = {
        "extractor": ctx.inception.format,
        "file": ctx.inception.path,
        "file_sha256": ctx.inception.sha256,
        "features": scores.fid_features,
        "reference": f"the {len(scores.images)} evaluated originals, preprocessed as the "
        "tokenizer's inputs; both sets as uint8, resized by the extractor itself",
        "resolution": ctx.resolution,
    }
    if scores.rfid is None:
        return {"computed": False, "reason": "fewer than 2 images", **described}
    return {"computed": True, "value": scores.rfid, **described}


def build_report(scores: Scores, ctx: ReportContext) -> dict[str, Any]:
    lpips = (
        {"computed": True, "backbone": ctx.lpips_files[0], "heads": ctx.lpips_files[1]}
        if ctx.lpips_files
        else {"computed": False, "reason": "no --lpips-backbone given"}
    )
    rfid = _rfid(scores, ctx)
    return {
        "format": REPORT_FORMAT,
        "metrics": {
            "num_images": len(scores.images),
            "psnr": scores.mean("psnr"),
            "ssim": scores.mean("ssim"),
            "lpips": scores.mean("lpips"),
            "rfid": rfid.get("value"),
        },
        "codebook": _codebook(scores, ctx),
        "lpips": lpips,
        "rfid": rfid,
        "tokenizer": {
            "path": ctx.tokenizer_dir,
            "fingerprint": ctx.fingerprint,
            "weights_sha256": ctx.weights_sha256,
            "config": ctx.release_config,
        },
        "data": {
            "inputs": ctx.inputs,
            "shards": ctx.shards,
            "num_images": len(scores.images),
            "num_skipped": len(scores.bad) + scores.tar_errors,
            "skipped": [{"key": b.key, "shard": b.shard, "reason": b.reason} for b in scores.bad],
            "broken_tars": scores.tar_errors,
        },
        "preprocessing": eval_preprocessing(ctx.resolution),
        "per_image": [_per_image(s) for s in scores.images],
        "worst": [{"key": w.key, "psnr": w.psnr} for w in scores.worst],
        "versions": _versions(),
        "run": {
            "processes": ctx.processes,
            "device": ctx.device,
            "batch_size": ctx.batch_size,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
    }


def _per_image(score: ImageScore) -> dict[str, Any]:
    entry = {"key": score.key, "psnr": score.psnr, "ssim": score.ssim, "lpips": score.lpips}
    if score.random_codes_psnr:
        entry["random_codes_psnr"] = score.random_codes_psnr
    return entry


def _figure(value: float | None, digits: int, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "not computed"
    return f"{value:.{digits}f}{unit}"


def _markdown(report: dict[str, Any]) -> str:
    m, data, tok = report["metrics"], report["data"], report["tokenizer"]
    rfid = report["rfid"]
    lines = [
        "# Tokenizer evaluation",
        "",
        f"Tokenizer `{tok['path']}` (fingerprint `{tok['fingerprint'][:16]}`), "
        f"{m['num_images']} images from {len(data['shards'])} shard(s) "
        f"({data['num_skipped']} skipped), {report['preprocessing']['resolution']} px "
        "(shorter side resized, centre crop).",
        "",
        "| metric | value |",
        "| --- | --- |",
        f"| PSNR | {_figure(m['psnr'], 2, ' dB')} |",
        f"| SSIM | {_figure(m['ssim'], 4)} |",
        f"| LPIPS (VGG) | {_figure(m['lpips'], 4)} |",
        f"| rFID | {_figure(m['rfid'], 2)} |",
        f"| images | {m['num_images']} |",
        "",
    ]
    if not rfid["computed"]:
        how = rfid.get("how", "")
        how = f" {how[0].upper()}{how[1:]}." if how else ""
        lines += [f"rFID not computed: {rfid['reason']}.{how}", ""]
    else:
        lines += [
            f"rFID against {rfid['reference']}; {rfid['extractor']} Inception "
            f"`{Path(rfid['file']).name}` (sha256 `{rfid['file_sha256'][:16]}`).",
            "",
        ]
    ablated = all("random_codes_psnr" in g for g in report["codebook"].values())
    columns = ["grid", "grid shape", "K", "used", "usage", "perplexity"]
    columns += ["PSNR, its codes random"] if ablated else []
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for name, g in report["codebook"].items():
        shape = "x".join(str(s) for s in g["grid_shape"])
        row = (
            f"| {name} | {shape} | {g['codebook_size']} | {g['codes_used']} | "
            f"{100 * g['usage']:.1f}% | {g['perplexity']:.1f} |"
        )
        if ablated:
            row += f" {g['random_codes_psnr']:.2f} dB ({-g['random_codes_psnr_drop']:+.2f}) |"
        lines.append(row)
    lines.append("")
    if ablated:
        lines += [
            "PSNR, its codes random: each grid's codes replaced by random ones, the other "
            "grids' kept; a drop near 0 dB means the decoder ignores that grid.",
            "",
        ]
    for name, g in report["codebook"].items():
        lines += [f"![code frequencies, grid {name}]({g['plot']})", ""]
    if report["worst"]:
        worst = ", ".join(f"`{w['key']}` {w['psnr']:.2f} dB" for w in report["worst"])
        lines += [
            f"Lowest PSNR (originals above their reconstructions): {worst}",
            "",
            f"![worst reconstructions]({WORST_PNG})",
            "",
        ]
    v = report["versions"]
    lines.append("Versions: " + ", ".join(f"{name} {version}" for name, version in v.items()) + ".")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], scores: Scores, directory: str | Path) -> Path:
    """Write report.json, report.md, one usage plot and counts file per grid and the
    worst-images grid into `directory`; returns report.json's path."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    for name, counts in scores.counts.items():
        usage_plot(counts.numpy(), f"grid {name}").save(out / usage_png(name))
        np.save(out / f"code_counts_{name}.npy", counts.numpy())
    if scores.worst:
        rows = [
            torch.stack([w.original for w in scores.worst]),
            torch.stack([w.reconstruction for w in scores.worst]),
        ]  # 2 x (N, 3, R, R) uint8
        image_grid([r.float() / 127.5 - 1.0 for r in rows]).save(out / WORST_PNG)
    (out / REPORT_MD).write_text(_markdown(report))
    path = out / REPORT_JSON
    path.write_text(json.dumps(report, indent=2) + "\n")
    return path
