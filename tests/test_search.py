"""TorchSearch against a brute-force float64 reference."""

from __future__ import annotations

import pytest
import torch

from tokenizer.quantize.search import SearchResult, TorchSearch, build_search


def _reference(queries: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) float64 squared distances, computed directly."""
    return torch.cdist(queries.double(), codebook.double()).pow(2)


def _assert_matches_reference(
    result: SearchResult, queries: torch.Tensor, codebook: torch.Tensor
) -> None:
    dist = _reference(queries, codebook)  # (N, K)
    n, k = dist.shape
    assert result.indices.shape == (n,) and result.indices.dtype == torch.int64
    assert result.distances.shape == (n,) and result.distances.dtype == torch.float32
    if n == 0:
        return
    # fp32 expansion error scales with the squared norms involved.
    scale = queries.double().pow(2).sum(1) + codebook.double().pow(2).sum(1).max()  # (N,)
    tol = 1e-5 * scale + 1e-6
    best = dist.min(dim=1).values  # (N,)
    chosen = dist.gather(1, result.indices.unsqueeze(1)).squeeze(1)  # (N,)
    # The chosen code is a nearest code, up to fp32 rounding...
    assert torch.all(chosen - best <= tol), (chosen - best).max()
    # ...and it is the same code wherever the nearest code is clearly the nearest.
    if k > 1:
        two = dist.topk(2, dim=1, largest=False).values  # (N, 2)
        clear = (two[:, 1] - two[:, 0]) > 2 * tol
        assert clear.float().mean() > 0.5  # the data must actually test something
        ref_idx = dist.argmin(dim=1)
        assert torch.equal(result.indices[clear], ref_idx[clear])
    torch.testing.assert_close(result.distances.double(), best, atol=float(tol.max()), rtol=0)


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


CASES = [
    # (N, K, D, chunk_size)
    (100, 16, 8, 0),  # auto: one chunk
    (100, 16, 8, 7),  # N not divisible by the chunk
    (100, 16, 8, 1),  # one row at a time
    (50, 33, 4, 1000),  # chunk larger than N
    (257, 64, 32, 64),
    (64, 512, 16, 10),
    (1, 5, 3, 0),
    (30, 1, 6, 4),  # a single code
]


@pytest.mark.parametrize("n,k,d,chunk", CASES)
@pytest.mark.parametrize("make", [_random, _clustered], ids=["random", "clustered"])
def test_matches_float64_reference(make, n: int, k: int, d: int, chunk: int) -> None:
    queries, codebook = make(n, k, d, seed=n * 1000 + k)
    result = TorchSearch(chunk_size=chunk)(queries, codebook)
    _assert_matches_reference(result, queries, codebook)


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


def test_auto_chunk_size_targets_64m_floats() -> None:
    search = TorchSearch()
    assert search.rows_per_chunk(1024) == 64 * 1024 * 1024 // 1024
    assert search.rows_per_chunk(2**26) == 1
    assert search.rows_per_chunk(2**28) == 1  # never zero rows
    assert TorchSearch(chunk_size=5).rows_per_chunk(2**28) == 5


def test_empty_queries() -> None:
    result = TorchSearch()(torch.empty(0, 4), torch.randn(8, 4))
    assert result.indices.shape == (0,) and result.distances.shape == (0,)


@pytest.mark.parametrize("query_dtype", [torch.float32, torch.bfloat16])
def test_fp32_under_bf16_autocast(query_dtype: torch.dtype) -> None:
    queries, codebook = _clustered(200, 64, 16, seed=5)
    queries = queries.to(query_dtype)
    search = TorchSearch(chunk_size=33)
    plain = search(queries, codebook)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = search(queries, codebook)
    assert mixed.distances.dtype == torch.float32
    assert torch.equal(mixed.indices, plain.indices)
    torch.testing.assert_close(mixed.distances, plain.distances)
    _assert_matches_reference(mixed, queries, codebook)


def test_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="codebook"):
        TorchSearch()(torch.randn(4, 3), torch.randn(5, 2))


def test_rejects_negative_chunk() -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        TorchSearch(chunk_size=-1)


def test_build_search() -> None:
    search = build_search("torch", chunk_size=12)
    assert isinstance(search, TorchSearch) and search.chunk_size == 12
    with pytest.raises(ValueError, match=r"'faiss-ivf'.*torch"):
        build_search("faiss-ivf")
