r"""Memory and time of one tokenizer training step, with and without gradient checkpointing.

    python tools/bench_memory.py                                   # LlamaGen VQ-16 widths
    python tools/bench_memory.py --ch 16 --ch-mult 1 1 2 2 4 --resolutions 256 512 1024
    python tools/bench_memory.py --device cuda --batch 8 --precision bf16
    python tools/bench_memory.py --resolutions 256 --steps 5 --repeats 3 \
        --reference ../LlamaGen/tokenizer/tokenizer_image/vq_model.py

A step is what the tokenizer task does: forward, MSE + the quantizer's VQ terms
(tokenizer.losses.reconstruction.vqvae_loss), backward, AdamW; with --discriminator also
what the adversarial task adds (a PatchGAN of --disc-ndf / --disc-layers: the generator's
hinge term through the frozen discriminator, then its own step on real and fake images). Every (resolution,
checkpointing) pair runs in a fresh process, so each peak is its own: --steps - 1 timed
steps (the first a warm-up that also allocates the gradients and AdamW's state), then
one step measured for memory. Attention sits in the coarsest level at every resolution (as in LlamaGen VQ-16 at
256 px), so the network is the same at all of them.

Columns, per image of the batch where it says so:
- step peak: peak memory during the step above what was live before it (CPU: the growth
  of the process's peak RSS, glibc told to unmap big blocks on free; CUDA:
  torch.cuda.max_memory_allocated above memory_allocated);
- activations: memory the forward keeps for the backward (live at the end of the forward
  above before it), the part checkpointing shrinks;
- s/img: the median timed step after the warm-up (the warm-up itself with --steps 2),
  over the batch size; timed under the default allocator, since unmapping every big
  block on free makes steps about 3x slower on CPU.
The last lines give checkpointed / plain for activations, step peak and time.

--reference FILE adds the field's reference beside ours at the same widths: LlamaGen's
VQModel (FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py, a file of
plain torch: bring a checkout, nothing is downloaded), trained the same way (MSE + its
codebook and commitment terms, AdamW; it has no checkpointing, so plain only). With
--repeats R every configuration runs R times, ours and the reference interleaved so that
a machine busy with other work slows both alike; the rows are medians over the repeats,
and the last lines give ours / reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenizer.cli.memory import (  # noqa: E402
    MiB,
    peak_rss_bytes,
    prepare_cpu_memory_tracking,
    release_freed_memory,
    reset_peak_rss,
    rss_bytes,
)
from tokenizer.config import load_config  # noqa: E402
from tokenizer.losses.adversarial import discriminator_loss, generator_loss  # noqa: E402
from tokenizer.losses.reconstruction import vqvae_loss  # noqa: E402
from tokenizer.models import build_model  # noqa: E402
from tokenizer.nn.discriminator import PatchDiscriminator  # noqa: E402


@dataclass
class Measurement:
    resolution: int
    checkpointing: bool
    model: str  # "ours" or "reference"
    batch: int
    parameters: int  # of both models with --discriminator
    step_peak_mib: float  # above the memory live before the step
    activations_mib: float  # kept by the forward for the backward
    seconds_per_image: float  # median over the timed steps after the first


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Memory:
    """Live and peak memory of the device: CUDA's allocator, else the process RSS."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cpu":
            if not prepare_cpu_memory_tracking():
                raise SystemExit("peak RSS needs Linux (/proc/self/clear_refs)")
            release_freed_memory()  # what the timed steps freed leaves the RSS

    def live(self) -> int:
        _sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return rss_bytes()

    def reset_peak(self) -> None:
        _sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak(self) -> int:
        _sync(self.device)
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return peak_rss_bytes()


def _reference_model(args: argparse.Namespace) -> torch.nn.Module:
    """LlamaGen's VQModel at the bench's codebook, from the file --reference names."""
    spec = importlib.util.spec_from_file_location("reference_vq_model", args.reference)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--reference {args.reference}: not a Python file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.VQModel(
        module.ModelArgs(
            codebook_size=args.codebook_size,
            codebook_embed_dim=args.code_dim,
            encoder_ch_mult=list(args.ch_mult),
            decoder_ch_mult=list(args.ch_mult),
            # Its usage buffer is a Parameter written in place, refused by autograd in the
            # torch we pin; it is bookkeeping, not part of the step's compute.
            codebook_show_usage=False,
        )
    )


class _ReferenceOutput:
    """The reference's (reconstruction, losses) as the step below reads ours."""

    def __init__(self, images: torch.Tensor, model: torch.nn.Module) -> None:
        self.reconstruction, (vq_loss, commit_loss, entropy_loss, _) = model(images)
        mse = torch.nn.functional.mse_loss(self.reconstruction, images)
        self.total = mse + vq_loss + commit_loss + entropy_loss


def _our_model(args: argparse.Namespace) -> torch.nn.Module:
    f = 2 ** (len(args.ch_mult) - 1)
    cfg = load_config(
        overrides=[
            "model.arch=vqgan",
            f"model.ch={args.ch}",
            f"model.ch_mult=[{','.join(map(str, args.ch_mult))}]",
            f"model.num_res_blocks={args.num_res_blocks}",
            f"model.attn_resolutions=[{args.resolution // f}]",
            f"model.grad_checkpointing={str(args.checkpointing).lower()}",
            f"quantizer.codebook_size={args.codebook_size}",
            f"quantizer.code_dim={args.code_dim}",
            "quantizer.l2_normalize=true",
            f"data.resolution={args.resolution}",
        ]
    )
    return build_model(cfg)


def measure(args: argparse.Namespace) -> Measurement:
    """One (model, resolution, checkpointing) configuration, in this process."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    reference = args.model == "reference"
    model = (_reference_model(args) if reference else _our_model(args)).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    images = torch.rand(args.batch, 3, args.resolution, args.resolution, device=device) * 2 - 1
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16")

    disc = None
    if args.discriminator:
        disc = PatchDiscriminator(3, args.disc_ndf, args.disc_layers, "batch").to(device).train()
        disc_optimizer = torch.optim.AdamW(disc.parameters(), lr=1e-4, betas=(0.5, 0.9))

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if reference:
                out = _ReferenceOutput(images, model)
                loss = out.total
            else:
                out = model(images)
                loss = vqvae_loss(images, out, "mse").total
            if disc is not None:
                disc.requires_grad_(False)
                loss = loss + 0.5 * generator_loss(disc(out.reconstruction), "hinge")
                disc.requires_grad_(True)
        return loss, out.reconstruction.detach()

    def backward(loss: torch.Tensor, fake: torch.Tensor) -> None:
        loss.backward()
        optimizer.step()
        if disc is not None:
            disc_optimizer.zero_grad(set_to_none=True)
            with autocast:
                d_loss = discriminator_loss(disc(images), disc(fake), "hinge")
            d_loss.backward()
            disc_optimizer.step()

    # Timed steps first, under the default allocator: the unmap-on-free setting that makes
    # the RSS exact costs page faults on every big allocation (3x slower steps here).
    seconds = []
    for _ in range(args.steps - 1):
        _sync(device)
        start = time.perf_counter()
        backward(*forward())
        _sync(device)
        seconds.append(time.perf_counter() - start)

    # Then one step for memory (its time is not counted).
    memory = _Memory(device)
    before = memory.live()
    memory.reset_peak()
    loss, fake = forward()
    activations = memory.live() - before
    backward(loss, fake)
    del loss, fake
    peak = memory.peak() - before
    return Measurement(
        resolution=args.resolution,
        checkpointing=args.checkpointing,
        model=args.model,
        batch=args.batch,
        parameters=sum(p.numel() for m in (model, disc) if m is not None for p in m.parameters()),
        step_peak_mib=peak / MiB,
        activations_mib=activations / MiB,
        seconds_per_image=statistics.median(seconds[1:] or seconds) / args.batch,
    )


def _child_command(
    args: argparse.Namespace, model: str, resolution: int, checkpointing: bool
) -> list[str]:
    command = [sys.executable, __file__, "--child", "--resolutions", str(resolution)]
    if model == "reference":
        command += ["--reference", str(args.reference), "--child-reference"]
    command += ["--ch", str(args.ch), "--ch-mult", *map(str, args.ch_mult)]
    command += ["--num-res-blocks", str(args.num_res_blocks), "--batch", str(args.batch)]
    command += ["--codebook-size", str(args.codebook_size), "--code-dim", str(args.code_dim)]
    command += ["--steps", str(args.steps), "--device", args.device]
    command += ["--precision", args.precision]
    if args.discriminator:
        command += ["--discriminator", "--disc-ndf", str(args.disc_ndf)]
        command += ["--disc-layers", str(args.disc_layers)]
    return command + (["--checkpointing"] if checkpointing else [])


def _run_child(
    args: argparse.Namespace, model: str, resolution: int, checkpointing: bool
) -> Measurement | str:
    try:
        done = subprocess.run(
            _child_command(args, model, resolution, checkpointing),
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=args.timeout or None,
        )
    except subprocess.TimeoutExpired:
        return f"over --timeout {args.timeout} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return f"failed: {tail}"
    return Measurement(**json.loads(done.stdout.strip().splitlines()[-1]))


_LABELS = {
    ("ours", False): "plain",
    ("ours", True): "checkpointed",
    ("reference", False): "reference",
}


def _row(m: Measurement) -> str:
    mode = _LABELS[m.model, m.checkpointing]
    return (
        f"{m.resolution:>6} {mode:>13} {m.step_peak_mib:>12.0f} {m.activations_mib:>12.0f} "
        f"{m.step_peak_mib / m.batch:>11.0f} {m.seconds_per_image:>8.2f}"
    )


def _median(runs: list[Measurement]) -> Measurement:
    """Each figure's median over repeats of one configuration."""
    first = runs[0]
    return Measurement(
        resolution=first.resolution,
        checkpointing=first.checkpointing,
        model=first.model,
        batch=first.batch,
        parameters=first.parameters,
        step_peak_mib=statistics.median(m.step_peak_mib for m in runs),
        activations_mib=statistics.median(m.activations_mib for m in runs),
        seconds_per_image=statistics.median(m.seconds_per_image for m in runs),
    )


def _ratio_line(label: str, num: Measurement, den: Measurement) -> str:
    return (
        f"{num.resolution} px: {label} activations "
        f"{num.activations_mib / den.activations_mib:.3f}, step peak "
        f"{num.step_peak_mib / den.step_peak_mib:.3f}, time "
        f"{num.seconds_per_image / den.seconds_per_image:.2f}x"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--ch", type=int, default=128)
    parser.add_argument("--ch-mult", type=int, nargs="+", default=[1, 1, 2, 2, 4])
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--codebook-size", type=int, default=16384)
    parser.add_argument("--code-dim", type=int, default=8)
    parser.add_argument(
        "--steps",
        type=int,
        default=3,
        help="steps per configuration (>= 2): a warm-up, timed ones, one measured for memory",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--timeout", type=float, default=0, help="seconds per configuration (0: none)"
    )
    parser.add_argument(
        "--discriminator", action="store_true", help="add the PatchGAN and its step"
    )
    parser.add_argument("--disc-ndf", type=int, default=64)
    parser.add_argument("--disc-layers", type=int, default=3)
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="LlamaGen's tokenizer/tokenizer_image/vq_model.py: run its VQModel beside ours",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="runs per configuration; rows give medians"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.reference is not None:
        if not args.reference.is_file():
            parser.error(f"--reference {args.reference}: no such file")
        # LlamaGen's ModelArgs fixes these; other widths would compare unlike networks.
        if args.ch != 128 or args.num_res_blocks != 2 or args.discriminator:
            parser.error(
                "--reference runs at LlamaGen's ch=128, num_res_blocks=2, no discriminator"
            )

    if args.child:
        args.resolution = args.resolutions[0]
        args.model = "reference" if args.child_reference else "ours"
        print(json.dumps(asdict(measure(args))))
        return 0

    print(
        f"ch={args.ch} ch_mult={args.ch_mult} num_res_blocks={args.num_res_blocks} "
        f"K={args.codebook_size} d={args.code_dim} batch={args.batch} device={args.device} "
        f"{args.precision}{' + discriminator' if args.discriminator else ''}; "
        f"{args.steps} steps per configuration, medians of {args.repeats} runs (memory in MiB)"
    )
    print(
        f"{'px':>6} {'mode':>13} {'step peak':>12} {'activations':>12} {'peak/img':>11} "
        f"{'s/img':>8}"
    )
    configurations = [("ours", False), ("ours", True)]
    if args.reference is not None:
        configurations.append(("reference", False))
    results: dict[tuple[int, str, bool], Measurement] = {}
    for resolution in args.resolutions:
        runs: dict[tuple[str, bool], list[Measurement]] = {c: [] for c in configurations}
        for _ in range(args.repeats):
            for model, checkpointing in configurations:
                got = _run_child(args, model, resolution, checkpointing)
                if isinstance(got, str):
                    print(f"{resolution:>6} {_LABELS[model, checkpointing]:>13} {got}")
                else:
                    runs[model, checkpointing].append(got)
        for (model, checkpointing), done in runs.items():
            if done:
                results[resolution, model, checkpointing] = _median(done)
                print(_row(results[resolution, model, checkpointing]), flush=True)
    for resolution in args.resolutions:
        plain = results.get((resolution, "ours", False))
        ckpt = results.get((resolution, "ours", True))
        ref = results.get((resolution, "reference", False))
        if plain and ckpt and plain.activations_mib > 0:
            print(_ratio_line("checkpointed / plain", ckpt, plain))
        if plain and ref and ref.activations_mib > 0:
            print(_ratio_line("ours / reference", plain, ref))
            print(
                f"{resolution} px: parameters ours {plain.parameters:,}, reference {ref.parameters:,}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
