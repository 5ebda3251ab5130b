"""Search backends against a brute-force float64 reference; IVF recall and rebuilds."""

from __future__ import annotations

import sys

import pytest
import torch

from tokenizer.config import QuantizerConfig
from tokenizer.quantize.backends import build_search, search_from_config
from tokenizer.quantize.faiss_support import faiss_available
from tokenizer.quantize.ivf import FaissIVFSearch
from tokenizer.quantize.search import FaissSearch, SearchResult, TorchSearch

NEEDS_FAISS = pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
EXACT = ["torch", pytest.param("faiss", marks=NEEDS_FAISS), "auto"]
ALL = [*EXACT, pytest.param("faiss-ivf", marks=NEEDS_FAISS)]


def _reference(queries: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 squared distances, computed directly."""
    return torch.cdist(queries.double(), codebook.double()).pow(2)


def _assert_matches_reference(
    result: SearchResult, queries: torch.Tensor, codebook: torch.Tensor
) -> None:
    dist = _reference(queries.cpu(), codebook.cpu())  # (N, K)
    indices, distances = result.indices.cpu(), result.distances.cpu()
    n, k = dist.shape
    assert indices.shape == (n,) and indices.dtype == torch.int64
    assert distances.shape == (n,) and distances.dtype == torch.float32
    if n == 0:
        return
    # fp32 expansion error scales with the squared norms involved.
    scale = queries.cpu().double().pow(2).sum(1) + codebook.cpu().double().pow(2).sum(1).max()
    tol = 1e-5 * scale + 1e-6  # (N,)
    best = dist.min(dim=1).values  # (N,)
    chosen = dist.gather(1, indices.unsqueeze(1)).squeeze(1)  # (N,)
    # The chosen code is a nearest code, up to fp32 rounding...
    assert torch.all(chosen - best <= tol), (chosen - best).max()
    # ...and it is the same code wherever the nearest code is clearly the nearest.
    if k > 1:
        two = dist.topk(2, dim=1, largest=False).values  # (N, 2)
        clear = (two[:, 1] - two[:, 0]) > 2 * tol
        assert clear.float().mean() > 0.5  # the data must actually test something
        ref_idx = dist.argmin(dim=1)
        assert torch.equal(indices[clear], ref_idx[clear])
    torch.testing.assert_close(distances.double(), best, atol=float(tol.max()), rtol=0)


def _random(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)


def _clustered(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Queries sit close to codes far from the origin: the ||x||^2 - 2x.e + ||e||^2
    # expansion then cancels heavily, which is where a sloppy fp32 search goes wrong.
    g = torch.Generator().manual_seed(seed)
    codebook = 20.0 + 3.0 * torch.randn(k, d, generator=g)
    owner = torch.randint(0, k, (n,), generator=g)
    queries = codebook[owner] + 0.3 * torch.randn(n, d, generator=g)
    return queries, codebook


def _normalised(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    # As the quantizer searches with l2_normalize: unit codes, unit queries near them.
    g = torch.Generator().manual_seed(seed)
    codebook = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    owner = torch.randint(0, k, (n,), generator=g)
    noisy = codebook[owner] + 0.1 * torch.randn(n, d, generator=g) / d**0.5
    return torch.nn.functional.normalize(noisy, dim=1), codebook


CASES = [
    # (N, K, D, chunk_size)
    (100, 16, 8, 0),  # auto: one chunk
    (100, 16, 8, 7),  # N not divisible by the chunk
    (100, 16, 8, 1),  # one row at a time
    (50, 33, 4, 1000),  # chunk larger than N
    (257, 64, 32, 64),
    (64, 512, 16, 10),
    (300, 2048, 8, 0),
    (40, 300, 256, 16),
    (1, 5, 3, 0),
    (30, 1, 6, 4),  # a single code
]
DATA = [_random, _clustered, _normalised]
DATA_IDS = ["random", "clustered", "l2-normalised"]


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("n,k,d,chunk", CASES)
@pytest.mark.parametrize("make", DATA, ids=DATA_IDS)
def test_exact_backends_match_float64_reference(
    backend: str, make, n: int, k: int, d: int, chunk: int
) -> None:
    queries, codebook = make(n, k, d, seed=n * 1000 + k)
    result = build_search(backend, chunk_size=chunk)(queries, codebook)
    _assert_matches_reference(result, queries, codebook)


@NEEDS_FAISS
@pytest.mark.parametrize("make", DATA, ids=DATA_IDS)
def test_faiss_and_torch_agree_on_a_larger_case(make) -> None:
    queries, codebook = make(4096, 4096, 16, seed=11)
    ref = TorchSearch()(queries, codebook)
    got = FaissSearch()(queries, codebook)
    _assert_matches_reference(got, queries, codebook)
    # Both expand ||x - e||^2 in fp32, so they may differ only on near-ties.
    assert (got.indices == ref.indices).float().mean() > 0.99


@NEEDS_FAISS
@pytest.mark.parametrize("n,d", [(1, 8), (3, 8), (5, 64)])
def test_faiss_few_queries_against_many_codes(n: int, d: int) -> None:
    # Fewer queries than threads and K >= 10000: faiss splits the codebook across threads.
    queries, codebook = _random(n, 20000, d, seed=12)
    _assert_matches_reference(FaissSearch()(queries, codebook), queries, codebook)


@NEEDS_FAISS
@pytest.mark.parametrize("d,forced", [(8, True), (32, True), (64, False)])
def test_faiss_blas_threshold_is_scoped_to_the_call(
    d: int, forced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import faiss

    seen: list[int] = []
    real_knn = faiss.knn

    def spy(*args, **kwargs):
        seen.append(faiss.cvar.distance_compute_blas_threshold)
        return real_knn(*args, **kwargs)

    monkeypatch.setattr(faiss, "knn", spy)
    before = faiss.cvar.distance_compute_blas_threshold
    queries, codebook = _random(100, 50, d, seed=13)
    _assert_matches_reference(FaissSearch()(queries, codebook), queries, codebook)
    # Small d: the fast fused path for any batch size; large d: faiss's own choice.
    assert seen == [0 if forced else before]
    assert faiss.cvar.distance_compute_blas_threshold == before


def test_chunking_does_not_change_the_result() -> None:
    queries, codebook = _random(301, 40, 12, seed=3)
    whole = TorchSearch(chunk_size=10_000)(queries, codebook)
    for chunk in (1, 7, 100, 300, 301):
        part = TorchSearch(chunk_size=chunk)(queries, codebook)
        assert torch.equal(part.indices, whole.indices)
        torch.testing.assert_close(part.distances, whole.distances)


def test_distance_tiles_are_bounded_by_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    tiles: list[tuple[int, ...]] = []
    real_addmm = torch.addmm

    def spy(*args, **kwargs):
        out = real_addmm(*args, **kwargs)
        tiles.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch, "addmm", spy)
    queries, codebook = _random(103, 20, 5, seed=4)
    TorchSearch(chunk_size=10)(queries, codebook)
    assert [t[0] for t in tiles] == [10] * 10 + [3]
    assert all(t[1] == 20 for t in tiles)


def test_auto_chunk_size_targets_4m_floats_on_cpu_64m_on_gpu() -> None:
    search = TorchSearch()
    assert search.rows_per_chunk(1024) == 4 * 1024 * 1024 // 1024
    assert search.rows_per_chunk(1024, "cuda:1") == 64 * 1024 * 1024 // 1024
    assert search.rows_per_chunk(2**26, "cuda") == 1
    assert search.rows_per_chunk(2**28) == 1  # never zero rows
    assert TorchSearch(chunk_size=5).rows_per_chunk(2**28) == 5


@pytest.mark.parametrize("backend", ALL)
def test_empty_queries(backend: str) -> None:
    result = build_search(backend)(torch.empty(0, 4), torch.randn(8, 4))
    assert result.indices.shape == (0,) and result.distances.shape == (0,)
    assert result.indices.dtype == torch.int64 and result.distances.dtype == torch.float32


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fp32_under_bf16_autocast(backend: str, query_dtype: torch.dtype) -> None:
    queries, codebook = _clustered(200, 64, 16, seed=5)
    queries = queries.to(query_dtype)
    plain = build_search(backend, chunk_size=33, ivf_nprobe=64)(queries, codebook)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = build_search(backend, chunk_size=33, ivf_nprobe=64)(queries, codebook)
    assert mixed.distances.dtype == torch.float32
    assert torch.equal(mixed.indices, plain.indices)
    torch.testing.assert_close(mixed.distances, plain.distances)
    _assert_matches_reference(mixed, queries, codebook)


@pytest.mark.parametrize("backend", ALL)
def test_rejects_bad_inputs(backend: str) -> None:
    search = build_search(backend)
    with pytest.raises(ValueError, match="codebook"):
        search(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="empty"):
        search(torch.randn(4, 3), torch.randn(0, 3))
    with pytest.raises(ValueError, match="device"):
        search(torch.randn(4, 3), torch.randn(5, 3, device="meta"))


@NEEDS_FAISS
def test_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        TorchSearch(chunk_size=-1)
    with pytest.raises(ValueError, match="ivf_nprobe"):
        build_search("faiss-ivf", ivf_nprobe=0)
    with pytest.raises(ValueError, match="ivf_rebuild_every"):
        build_search("faiss-ivf", ivf_rebuild_every=-1)


@NEEDS_FAISS
def test_build_search() -> None:
    search = build_search("torch", chunk_size=12)
    assert isinstance(search, TorchSearch) and search.chunk_size == 12
    assert isinstance(build_search("faiss"), FaissSearch)
    assert isinstance(build_search("auto"), FaissSearch)  # faiss is installed here
    ivf = build_search(
        "faiss-ivf", ivf_nlist=7, ivf_nprobe=3, ivf_rebuild_every=5, ivf_recall_samples=9
    )
    assert isinstance(ivf, FaissIVFSearch)
    assert (ivf.nlist, ivf.nprobe, ivf.rebuild_every, ivf.recall_samples) == (7, 3, 5, 9)
    with pytest.raises(ValueError, match=r"'faiss-lsh'.*torch.*faiss-ivf.*auto"):
        build_search("faiss-lsh")


@NEEDS_FAISS
def test_search_from_config() -> None:
    cfg = QuantizerConfig(
        search="faiss-ivf", ivf_nlist=11, ivf_nprobe=4, ivf_rebuild_every=6, ivf_recall_samples=50
    )
    ivf = search_from_config(cfg)
    assert isinstance(ivf, FaissIVFSearch)
    assert (ivf.nlist, ivf.nprobe, ivf.rebuild_every, ivf.recall_samples) == (11, 4, 6, 50)
    torch_search = search_from_config(QuantizerConfig(search="torch", search_chunk=3))
    assert isinstance(torch_search, TorchSearch) and torch_search.chunk_size == 3


@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_report_and_keep_nothing(backend: str) -> None:
    search = build_search(backend)
    search(*_random(10, 4, 3, seed=0))
    search.training_step()
    assert search.diagnostics() == {} and search.state_dict() == {}
    search.load_state_dict({"cells": torch.zeros(4)})  # resuming a faiss-ivf run: ignored


def test_missing_faiss_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss -> ImportError
    for backend in ("faiss", "faiss-ivf"):
        with pytest.raises(ImportError, match=rf"{backend}.*pip install faiss-cpu.*\.\[faiss\]"):
            build_search(backend)
    auto = build_search("auto", chunk_size=4)
    assert isinstance(auto, TorchSearch) and auto.chunk_size == 4


# --- faiss-ivf -------------------------------------------------------------------------


def _true_distances(
    queries: torch.Tensor, codebook: torch.Tensor, result: SearchResult
) -> torch.Tensor:
    return (queries - codebook[result.indices]).pow(2).sum(1)  # (N,) without expansion


def _blobs(n: int, k: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes in 32 tight clusters (a trained codebook is not uniform), queries near codes."""
    g = torch.Generator().manual_seed(seed)
    centres = 10.0 * torch.randn(32, d, generator=g)  # (32, d)
    codebook = centres[torch.randint(0, 32, (k,), generator=g)] + torch.randn(k, d, generator=g)
    owner = torch.randint(0, k, (n,), generator=g)
    queries = codebook[owner] + 0.3 * torch.randn(n, d, generator=g)
    return queries, codebook


@NEEDS_FAISS
def test_ivf_recall_is_reported_and_high() -> None:
    queries, codebook = _blobs(4000, 4096, 8, seed=1)
    search = FaissIVFSearch(nprobe=16, recall_samples=500)
    assert search.lists_for(4096) == 256  # about 4 sqrt(K)
    assert search.diagnostics() == {"search/rebuilds": 0.0}  # nothing measured yet
    result = search(queries, codebook)
    diag = search.diagnostics()
    assert diag["search/rebuilds"] == 1.0
    assert diag["search/recall"] > 0.9
    # The distances are the true ones to the returned codes.
    torch.testing.assert_close(result.distances, _true_distances(queries, codebook, result))


@NEEDS_FAISS
def test_ivf_recall_estimates_the_batch_recall() -> None:
    queries, codebook = _blobs(4000, 4096, 8, seed=1)
    search = FaissIVFSearch(nprobe=1, recall_samples=1000)  # one cell: misses happen
    result = search(queries, codebook)
    exact = TorchSearch()(queries, codebook)
    batch = result.distances <= _true_distances(queries, codebook, exact)  # (N,)
    assert batch.float().mean() < 0.95  # the case tests something
    # 1000 samples: the standard error of the estimate is about 0.01.
    assert abs(search.diagnostics()["search/recall"] - batch.float().mean().item()) < 0.05


@NEEDS_FAISS
def test_ivf_probing_every_cell_is_exact() -> None:
    queries, codebook = _clustered(500, 300, 8, seed=2)
    search = FaissIVFSearch(nlist=10, nprobe=10, recall_samples=100)
    _assert_matches_reference(search(queries, codebook), queries, codebook)
    assert search.diagnostics()["search/recall"] == 1.0


@NEEDS_FAISS
def test_ivf_rebuilds_every_n_training_steps_and_on_shape_change() -> None:
    queries, codebook = _blobs(256, 512, 8, seed=3)
    search = FaissIVFSearch(rebuild_every=3, recall_samples=64)
    rebuilds = []
    for _ in range(7):
        search(queries, codebook)
        search(queries, codebook)  # an evaluation forward: not a training step
        search.training_step()
        rebuilds.append(search.diagnostics()["search/rebuilds"])
    assert rebuilds == [1, 1, 1, 2, 2, 2, 3]  # steps 0, 3 and 6 rebuild
    search(queries, codebook[:500])  # K changed
    assert search.diagnostics()["search/rebuilds"] == 4
    search(queries[:, :4], codebook[:500, :4])  # d changed
    assert search.diagnostics()["search/rebuilds"] == 5
    never = FaissIVFSearch(rebuild_every=0)
    for _ in range(5):
        never(queries, codebook)
        never.training_step()
    assert never.diagnostics()["search/rebuilds"] == 1


@NEEDS_FAISS
def test_ivf_state_resumes_the_same_cells_and_schedule() -> None:
    queries, codebook = _blobs(2000, 1024, 8, seed=8)
    drift = 0.3 * torch.randn(codebook.shape, generator=torch.Generator().manual_seed(9))

    def run(search: FaissIVFSearch, steps: range) -> list[torch.Tensor]:
        out = []
        for t in steps:
            out.append(search(queries, codebook + t * drift).indices)
            search.training_step()
        return out

    straight = FaissIVFSearch(nprobe=1, rebuild_every=4, recall_samples=100)
    expected = run(straight, range(10))
    first = FaissIVFSearch(nprobe=1, rebuild_every=4, recall_samples=100)
    run(first, range(6))  # rebuilt at step 4: the cells come from a codebook of step 4
    state = {k: v.clone() for k, v in first.state_dict().items()}
    assert state["cells"].shape == (1024,) and int(state["steps_since_build"]) == 2
    resumed = FaissIVFSearch(nprobe=1, rebuild_every=4, recall_samples=100)
    resumed.load_state_dict(state)
    assert resumed.state_dict().keys() == state.keys()  # saved again before a search
    got = run(resumed, range(6, 10))
    # nprobe=1 misses often, so equal results mean equal cells, not luck; a fresh index
    # clustered at step 6 differs.
    for t, (a, b) in enumerate(zip(expected[6:], got, strict=True), start=6):
        assert torch.equal(a, b), f"step {t}"
    fresh = FaissIVFSearch(nprobe=1, rebuild_every=4, recall_samples=100)
    assert not torch.equal(fresh(queries, codebook + 6 * drift).indices, expected[6])
    assert resumed.diagnostics() == straight.diagnostics()  # rebuild count and recall
    # An exact backend's checkpoint (no state) leaves the IVF to cluster afresh.
    empty = FaissIVFSearch()
    empty.load_state_dict({})
    empty(queries, codebook)
    assert empty.diagnostics()["search/rebuilds"] == 1


@NEEDS_FAISS
def test_ivf_follows_a_moving_codebook_between_rebuilds() -> None:
    queries, codebook = _clustered(400, 256, 8, seed=4)
    search = FaissIVFSearch(nlist=8, nprobe=8, rebuild_every=100)
    search(queries, codebook)
    # Codes swap places: every stored vector is stale, though no rebuild is due.
    moved = codebook.flip(0).contiguous()
    result = search(queries, moved)
    assert search.diagnostics()["search/rebuilds"] == 1
    _assert_matches_reference(result, queries, moved)


@NEEDS_FAISS
def test_ivf_falls_back_to_exact_search_for_unfound_queries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    queries, codebook = _clustered(50, 64, 8, seed=5)
    search = FaissIVFSearch(nlist=4, nprobe=1)
    real = search._search

    def some_unfound(x: torch.Tensor) -> torch.Tensor:
        idx = real(x).clone()
        idx[::3] = -1  # what faiss returns when every probed cell is empty
        return idx

    monkeypatch.setattr(search, "_search", some_unfound)
    result = search(queries, codebook)
    assert bool((result.indices >= 0).all())
    _assert_matches_reference(
        SearchResult(result.indices[::3], result.distances[::3]), queries[::3], codebook
    )


# --- CUDA (runs where there is a GPU) ----------------------------------------------------


@CUDA
@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("make", DATA, ids=DATA_IDS)
def test_exact_backends_on_cuda(backend: str, make) -> None:
    queries, codebook = make(3000, 1024, 16, seed=6)
    result = build_search(backend)(queries.cuda(), codebook.cuda())
    assert result.indices.is_cuda and result.distances.is_cuda
    _assert_matches_reference(result, queries, codebook)


@CUDA
@NEEDS_FAISS
def test_ivf_on_cuda() -> None:
    queries, codebook = _blobs(4000, 4096, 8, seed=7)
    search = FaissIVFSearch(nprobe=256, recall_samples=500)  # every cell: exact
    result = search(queries.cuda(), codebook.cuda())
    assert result.indices.is_cuda
    _assert_matches_reference(result, queries, codebook)
