"""Codebook synchronisation across 2 real processes over gloo (torch.distributed)."""

import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenizer.distributed import (
    CodebookMismatchError,
    LocalCollective,
    TorchCollective,
    check_same_state,
    state_fingerprint,
)
from tokenizer.quantize import VectorQuantizer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        fn(rank, Path(out_dir))
    except BaseException:
        (Path(out_dir) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _spawn(fn, tmp_path: Path) -> None:
    ctx = mp.spawn(_entry, args=(fn, _free_port(), str(tmp_path)), nprocs=2, join=False)
    try:
        while not ctx.join(timeout=120):
            pass
    except Exception as err:
        errors = "\n".join(p.read_text() for p in sorted(tmp_path.glob("error*.txt")))
        raise AssertionError(f"a rank failed:\n{errors}") from err


def _collectives(rank: int, out: Path) -> None:
    c = TorchCollective()
    assert (c.rank, c.world_size) == (rank, 2)
    total = c.all_reduce_sum(torch.tensor([1.0, rank + 1.0]))
    assert total.tolist() == [2.0, 3.0]
    sent = c.broadcast(torch.full((3,), float(rank + 7)), src=1)
    assert sent.tolist() == [8.0] * 3
    gathered = c.all_gather_cat(torch.full((2, 2), float(rank)))
    assert gathered[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_torch_collective_ops(tmp_path):
    _spawn(_collectives, tmp_path)


BATCH = torch.randn(2 * 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))  # (2b, D, h, w)


def _ema_quantizer(collective) -> VectorQuantizer:
    torch.manual_seed(3)
    q = VectorQuantizer(16, 3, ema=True, ema_decay=0.9)
    q.collective = collective
    return q.train()


def _ema_two_ranks(rank: int, out: Path) -> None:
    q = _ema_quantizer(TorchCollective())
    half = BATCH[rank * 4 : (rank + 1) * 4]  # this rank's b = 4 images
    for _ in range(3):
        q(half * 1.0)
    torch.save({k: v.clone() for k, v in q.state_dict().items()}, out / f"ema{rank}.pt")


def test_two_ranks_batch_b_equal_one_rank_batch_2b(tmp_path):
    _spawn(_ema_two_ranks, tmp_path)
    single = _ema_quantizer(LocalCollective())
    for _ in range(3):
        single(BATCH)
    r0 = torch.load(tmp_path / "ema0.pt")
    r1 = torch.load(tmp_path / "ema1.pt")
    for name in ("embed", "cluster_size", "embed_sum"):
        assert torch.equal(r0[name], r1[name]), name  # bit-identical across ranks
        torch.testing.assert_close(r0[name], single.state_dict()[name], rtol=1e-5, atol=1e-6)
    # The EMA statistics did move, so the comparison is not between two initial states.
    assert not torch.equal(r0["cluster_size"], torch.ones(16))


def _divergence(rank: int, out: Path) -> None:
    c = TorchCollective()
    q = _ema_quantizer(c)
    assert check_same_state(c, q, step=5, repair=False) == []
    if rank == 1:
        q.embed_sum[3] += 1.0  # a planted divergence on one rank
    try:
        check_same_state(c, q, step=7, repair=False)
        raise AssertionError("strict mode did not raise")
    except CodebookMismatchError as err:
        assert "step 7" in str(err) and "[1]" in str(err)
    assert check_same_state(c, q, step=8, repair=True) == [1]
    assert check_same_state(c, q, step=9, repair=False) == []
    (out / f"fp{rank}.txt").write_text(str(state_fingerprint(q)))


def test_fingerprint_catches_and_repairs_divergence(tmp_path):
    _spawn(_divergence, tmp_path)
    assert (tmp_path / "fp0.txt").read_text() == (tmp_path / "fp1.txt").read_text()


def test_fingerprint_sees_every_buffer():
    q = _ema_quantizer(LocalCollective())
    before = state_fingerprint(q)
    for name, buffer in q.named_buffers():
        if buffer.is_floating_point():
            saved = buffer.clone()
            buffer.view(-1)[0] += 1e-3
            assert state_fingerprint(q) != before, name
            buffer.copy_(saved)
    assert state_fingerprint(q) == before


def test_single_process_check_is_a_no_op():
    q = _ema_quantizer(LocalCollective())
    assert check_same_state(LocalCollective(), q, step=1, repair=False) == []


@pytest.fixture(autouse=True)
def _fewer_threads():
    # Two processes on two cores: one thread each avoids oversubscription.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_average_gradients_gives_every_rank_the_mean():
    import threading

    from collective_helpers import ThreadCollective, _World

    from tokenizer.distributed import average_gradients

    world = _World(2)
    modules = []
    for rank in range(2):
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
        m(torch.full((4, 3), float(rank + 1))).sum().backward()
        if rank == 1:
            m[1].bias.grad = None  # a parameter this rank's loss did not reach
        modules.append(m)
    expected = {
        n: sum(
            (dict(m.named_parameters())[n].grad if dict(m.named_parameters())[n].grad is not None
             else torch.zeros_like(p)) for m in modules
        ) / 2
        for n, p in modules[0].named_parameters()
    }  # fmt: skip
    threads = [
        threading.Thread(target=average_gradients, args=(ThreadCollective(world, r), modules[r]))
        for r in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for m in modules:
        for n, p in m.named_parameters():
            torch.testing.assert_close(p.grad, expected[n], msg=n)
