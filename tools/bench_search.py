"""Benchmark the nearest-neighbour search backends against the raw library call and naive torch.

    python tools/bench_search.py                       # the full grid (long on a small CPU)
    python tools/bench_search.py --n 16384 --d 8 32 --k 1024 16384

For each cell (N queries, D dimensions, K codes) and each backend it prints the median
time per lookup after a warm-up (at least --repeats lookups, more for fast cells),
GFLOP/s counted as 2*N*D*K / t (for faiss-ivf an "effective" rate: the exact search's
work over the IVF's time), and the peak extra memory of one lookup. Baselines measured in the same run, interleaved with the backends
so that a noisy shared machine slows all of them alike:
- raw faiss.knn: the call the faiss backend makes, on the same arrays and with the same
  algorithm choice (see faiss_blas_path); on CUDA faiss.knn_gpu;
- raw faiss.knn, default: the same call with faiss's own choice of algorithm (CPU);
- raw IndexFlatL2.search: a prebuilt index's search alone (CPU), for the cost of not
  keeping an index;
- naive: torch.cdist(x, codebook).argmin(1), where its (N, K) matrix fits.
Cells whose estimated time is over --max-seconds, or whose naive matrix is over
--naive-max-gib, are skipped and the output says so.

Peak memory (per call; the IVF index's own copy of the codebook is kept between calls
and not counted): on CPU the growth of the process's peak RSS during one call (Linux: the
peak is reset through /proc/self/clear_refs, and glibc is told to give every block of
1 MiB or more back to the OS on free, so memory freed by earlier calls cannot hide an
allocation); on CUDA torch.cuda.max_memory_allocated, which does not see faiss's own
GPU scratch memory.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.cli.memory import (  # noqa: E402
    MiB,
    peak_rss_bytes,
    prepare_cpu_memory_tracking,
    reset_peak_rss,
    rss_bytes,
)
from tokenizer.quantize.backends import BACKENDS, build_search  # noqa: E402
from tokenizer.quantize.faiss_support import (  # noqa: E402
    faiss_available,
    faiss_blas_path,
    faiss_has_gpu,
    import_faiss,
)
from tokenizer.quantize.ivf import FaissIVFSearch  # noqa: E402

# --- measurement ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _peak_extra_bytes(fn: Callable[[], object], device: torch.device, cpu_ok: bool) -> float:
    """Peak memory one call adds on top of what was live before it (NaN if unmeasurable)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    if not cpu_ok:
        return math.nan
    reset_peak_rss()
    before = rss_bytes()
    fn()
    return float(peak_rss_bytes() - before)


def _load() -> str:
    try:
        one, five, _ = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} CPUs"


# --- one cell -------------------------------------------------------------------------


Run = Callable[[torch.Tensor], object]  # queries (n, d) -> anything
Diagnostics = Callable[[], dict[str, float]]


@dataclass
class Contender:
    name: str
    # Binds a codebook: the full one for the measurement, a slice of it for the estimate.
    bind: Callable[[torch.Tensor], tuple[Run, Diagnostics]]
    ms: float = math.nan
    extra: float = math.nan  # bytes
    note: str = ""
    times: list[float] = field(default_factory=list)


def _data(n: int, k: int, d: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # Queries near codes, as encoder outputs are once the codebook has trained; this is
    # what gives IVF its recall (on isotropic noise at D = 256 no index can do well).
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(k, d, generator=g)  # (K, d)
    owner = torch.randint(0, k, (n,), generator=g)  # (N,)
    queries = codebook[owner] + 0.2 * torch.randn(n, d, generator=g)  # (N, d)
    return queries.to(device), codebook.to(device)


def _raw_knn(e: torch.Tensor) -> tuple[Run, Diagnostics]:
    faiss, en = import_faiss("faiss"), e.numpy()

    def run(q: torch.Tensor) -> object:
        with faiss_blas_path(faiss, e.shape[1]):  # the algorithm the backend asks for
            return faiss.knn(q.numpy(), en, 1)

    return run, dict


def _raw_knn_default(e: torch.Tensor) -> tuple[Run, Diagnostics]:
    faiss, en = import_faiss("faiss"), e.numpy()
    return (lambda q: faiss.knn(q.numpy(), en, 1)), dict


def _raw_knn_gpu(e: torch.Tensor) -> tuple[Run, Diagnostics]:
    import faiss.contrib.torch_utils  # noqa: F401  (lets faiss take torch CUDA tensors)

    faiss = import_faiss("faiss")
    res = faiss.StandardGpuResources()
    return (lambda q: faiss.knn_gpu(res, q, e, 1)), dict


def _raw_flat(e: torch.Tensor) -> tuple[Run, Diagnostics]:
    faiss = import_faiss("faiss")
    flat = faiss.IndexFlatL2(e.shape[1])
    flat.add(e.numpy())

    def run(q: torch.Tensor) -> object:
        with faiss_blas_path(faiss, e.shape[1]):
            return flat.search(q.numpy(), 1)

    return run, dict


def _backend(name: str) -> Callable[[torch.Tensor], tuple[Run, Diagnostics]]:
    def bind(e: torch.Tensor) -> tuple[Run, Diagnostics]:
        search = build_search(name, ivf_rebuild_every=0)  # IVF: time the steady state
        return (lambda q: search(q, e)), search.diagnostics

    return bind


def _naive(e: torch.Tensor) -> tuple[Run, Diagnostics]:
    return (lambda q: torch.cdist(q, e).argmin(1)), dict


def _contenders(device: torch.device, backends: list[str]) -> list[Contender]:
    out: list[Contender] = []
    if faiss_available():
        if device.type == "cuda" and faiss_has_gpu(import_faiss("faiss")):
            out.append(Contender("raw faiss.knn_gpu", _raw_knn_gpu))
        elif device.type == "cpu":
            out.append(Contender("raw faiss.knn", _raw_knn))
            out.append(Contender("raw faiss.knn, default", _raw_knn_default))
            out.append(Contender("raw IndexFlatL2.search", _raw_flat))
    for name in backends:
        if name in ("faiss", "faiss-ivf") and not faiss_available():
            continue
        out.append(Contender(name, _backend(name)))
    out.append(Contender("naive cdist+argmin", _naive))
    return out


def bench_cell(n: int, d: int, k: int, device: torch.device, args: argparse.Namespace):
    x, e = _data(n, k, d, device)
    contenders = _contenders(device, args.backends)
    live: list[tuple[Contender, Run, Diagnostics]] = []
    exact_gflops = math.nan  # raw faiss's rate here: predicts the IVF's k-means time
    for c in contenders:
        if c.name.startswith("naive") and n * k * 4 > args.naive_max_gib * 2**30:
            c.note = f"skipped: its (N, K) matrix needs {n * k * 4 / 2**30:.0f} GiB"
            continue
        if c.name == "faiss-ivf":
            if k < args.ivf_min_k:
                c.note = f"skipped: K < {args.ivf_min_k}, where exact search is cheap"
                continue
            nlist = FaissIVFSearch().lists_for(k)
            build_s = 2 * 10 * min(k, 64 * nlist) * nlist * d / (exact_gflops * 1e9)
            if build_s > args.max_seconds:
                c.note = f"skipped: index build est. {build_s:.0f} s"
                continue
            run, diagnostics = c.bind(e)
            # The first call trains the index, searches and measures recall on the batch.
            c.note = f"first call {_seconds(lambda run=run: run(x), device) * 1e3:.0f} ms"
        else:
            # Predict the time from all the queries against a slice of the codebook (the
            # cost is linear in K; fewer queries could change the algorithm faiss picks).
            part = max(1, k // 32)
            probe, _ = c.bind(e[:part])
            short = min(_seconds(lambda p=probe: p(x), device) for _ in range(2))
            if short * k / part * (args.repeats + 2) > args.max_seconds:
                c.note = f"skipped: est. {short * k / part:.0f} s per lookup"
                continue
            run, diagnostics = c.bind(e)
            run(x)  # warm-up
        c.extra = _peak_extra_bytes(lambda run=run: run(x), device, args.cpu_memory)
        if c.name.startswith("raw faiss.knn"):
            exact_gflops = 2 * n * d * k / _seconds(lambda run=run: run(x), device) / 1e9
        live.append((c, run, diagnostics))
    # Interleaved rounds, so that load changes hit every contender alike; short lookups
    # get more rounds (up to about a second of the slowest), as their medians are noisier.
    slowest = max((_seconds(lambda run=run: run(x), device) for _, run, _ in live), default=1.0)
    rounds = max(args.repeats, min(args.max_repeats, int(1.0 / max(slowest, 1e-6))))
    for _ in range(rounds):
        for c, run, _ in live:
            c.times.append(_seconds(lambda run=run: run(x), device))
    for c, _, diagnostics in live:
        c.ms = statistics.median(c.times) * 1e3
        recall = diagnostics().get("search/recall")
        if recall is not None:
            c.note += f", recall@1 {recall:.3f}"
    return contenders


# --- report ---------------------------------------------------------------------------


def _fmt(value: float, width: int, decimals: int = 1) -> str:
    return f"{'-':>{width}}" if math.isnan(value) else f"{value:{width}.{decimals}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--d", type=int, nargs="+", default=[8, 32, 256])
    parser.add_argument("--k", type=int, nargs="+", default=[1024, 16384, 262144])
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3, help="at least this many, per cell")
    parser.add_argument("--max-repeats", type=int, default=30)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per contender and cell")
    parser.add_argument("--naive-max-gib", type=float, default=4.0)
    parser.add_argument("--ivf-min-k", type=int, default=16384)
    args = parser.parse_args()
    device = torch.device(args.device)
    args.cpu_memory = device.type == "cpu" and prepare_cpu_memory_tracking()

    print(f"device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads", end="")
    if faiss_available():
        faiss = import_faiss("faiss")
        print(f"; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} OpenMP threads", end="")
        print(f", GPU support: {faiss_has_gpu(faiss)}", end="")
    print(f"\nload average at start: {_load()}")
    header = f"{'N':>6} {'D':>4} {'K':>7}  {'contender':<23} {'ms':>10} {'GFLOP/s':>8} {'extra MiB':>9}  note"
    print(header)
    print("-" * len(header))
    results: dict[tuple[int, int, int], dict[str, Contender]] = {}
    for n in args.n:
        for d in args.d:
            for k in args.k:
                cell = {c.name: c for c in bench_cell(n, d, k, device, args)}
                results[n, d, k] = cell
                for c in cell.values():
                    gflops = 2 * n * d * k / (c.ms * 1e-3) / 1e9
                    extra = c.extra / MiB
                    print(
                        f"{n:>6} {d:>4} {k:>7}  {c.name:<23} {_fmt(c.ms, 10)} "
                        f"{_fmt(gflops, 8)} {_fmt(extra, 9)}  {c.note}",
                        flush=True,
                    )
                print()
    print(f"load average at end: {_load()}\n")
    _ratios(results, device)
    _overhead(device)


def _ratios(
    results: dict[tuple[int, int, int], dict[str, Contender]], device: torch.device
) -> None:
    raw = "raw faiss.knn_gpu" if device.type == "cuda" else "raw faiss.knn"
    print("faiss backend time / raw faiss time (target <= 1.10):")
    for (n, d, k), cell in results.items():
        if raw in cell and "faiss" in cell and not math.isnan(cell["faiss"].ms):
            print(f"  N={n} D={d} K={k}: {cell['faiss'].ms / cell[raw].ms:.3f}")
    cell = results.get((16384, 8, 16384), {})
    naive, fast = cell.get("naive cdist+argmin"), cell.get("faiss")
    if naive and fast and not math.isnan(naive.ms) and not math.isnan(fast.ms):
        print(f"naive / faiss at N=16384 D=8 K=16384 (target >= 50): {naive.ms / fast.ms:.1f}x")
    else:
        print("naive / faiss: the grid lacks the cell N=16384 D=8 K=16384")
    if device.type == "cuda":
        print("faiss (GPU) / chunked torch time:")
        for (n, d, k), cell in results.items():
            if "faiss" in cell and "torch" in cell and not math.isnan(cell["faiss"].ms):
                print(f"  N={n} D={d} K={k}: {cell['faiss'].ms / cell['torch'].ms:.3f}")
    print("extra memory of one lookup (MiB), against the N x K fp32 matrix of a naive search:")
    for (n, d, k), cell in results.items():
        extras = [
            f"{c.name} {c.extra / MiB:.1f}"
            for c in cell.values()
            if c.name in BACKENDS and not math.isnan(c.extra)
        ]
        print(f"  N={n} D={d} K={k}: matrix {n * k * 4 / MiB:.0f}; " + ", ".join(extras))


def _overhead(device: torch.device, rounds: int = 10, calls: int = 200) -> None:
    """Per-call cost of the faiss backend over raw faiss.knn, where the search itself is tiny."""
    if device.type != "cpu" or not faiss_available():
        return
    faiss = import_faiss("faiss")
    x, e = _data(64, 64, 8, device)
    xn, en = x.numpy(), e.numpy()
    search = build_search("faiss")
    times: dict[str, list[float]] = {"raw faiss.knn": [], "faiss backend": []}
    for _ in range(rounds):  # alternating blocks: load changes hit both alike
        for _ in range(calls):
            times["raw faiss.knn"].append(_seconds(lambda: faiss.knn(xn, en, 1), device))
        for _ in range(calls):
            times["faiss backend"].append(_seconds(lambda: search(x, e), device))
    calls *= rounds
    medians = {name: statistics.median(t) * 1e6 for name, t in times.items()}
    print(
        f"per-call overhead at N=K=64, D=8 (median of {calls}): raw faiss.knn "
        f"{medians['raw faiss.knn']:.1f} us, faiss backend {medians['faiss backend']:.1f} us "
        f"(+{medians['faiss backend'] - medians['raw faiss.knn']:.1f} us per call)"
    )


if __name__ == "__main__":
    main()
