"""The raw samples one reader (slot) takes from a list of shards, in a given order.

Whole shards slot.take(order), or with fewer shards than readers every shard, keeping the
samples whose running index falls to this slot. A resumed reader must pass over the
samples it consumed before: it reads their tar headers and seeks past their payloads
(tars.scan_tar), and skips whole shards without opening them when it knows how many
samples they hold (their sizes, learned by the reader itself in an earlier pass and kept
in the checkpoint: tar headers are small, but seeking to each one is a random read that
on a cold disk costs about what reading a small payload would).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence

from tokenizer.data.slots import Slot
from tokenizer.data.tars import RawSample, SampleRef, scan_tar

# (shard index, samples in it): reported once a shard has been read to its end cleanly.
OnSize = Callable[[int, int], None]


class _ShardHeaders:
    """Where the samples of one shard lie, read from its headers when first needed."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._samples: list[RawSample | SampleRef] | None = None

    def sample(self, n: int) -> RawSample:
        if self._samples is None:
            errors: list[str] = []
            # Payloads stay unread (a compressed tar cannot seek: its samples come whole).
            self._samples = list(scan_tar(self.path, errors.append, lambda _: False))
            if errors:
                raise OSError(f"{errors[0]} (it was read without errors before the resume)")
        if n >= len(self._samples):
            raise OSError(
                f"shard {self.path}: {len(self._samples)} samples, but it held more before "
                "the resume: a shard changed under the same name; the run cannot resume exactly"
            )
        found = self._samples[n]
        return found.load() if isinstance(found, SampleRef) else found


class CountedRef(SampleRef):
    """The n-th sample of a shard skipped whole (its size known): found only if loaded,
    as the few samples still in the shuffle buffer at a resume are."""

    def __init__(self, headers: _ShardHeaders, n: int) -> None:
        super().__init__("", headers.path, {})
        self.headers, self.n = headers, n

    def load(self) -> RawSample:
        return self.headers.sample(self.n)


def slot_samples(
    shards: Sequence[str],
    order: Sequence[int],
    slot: Slot,
    on_error: Callable[[str], None],
    lazy_until: int = 0,
    sizes: Mapping[int, int] | None = None,
    on_size: OnSize | None = None,
) -> Iterator[RawSample | SampleRef]:
    """The raw samples of `slot` from `shards` read in `order` (see the module docstring).

    The first `lazy_until` samples come as SampleRefs, their payloads not read: a resumed
    stream skips them (or loads the few it still needs). `sizes`: shard index -> samples,
    for whole shards that fall entirely within those first samples and need not be opened;
    `on_size(j, n)` reports the size of each shard j read to its end without an error."""
    taken = 0
    sizes = sizes or {}

    def wanted(_: int) -> bool:
        return taken >= lazy_until

    if len(shards) >= slot.count:
        for j in slot.take(order):
            size = sizes.get(j)
            if size is not None and taken + size <= lazy_until:
                headers = _ShardHeaders(shards[j])
                for n in range(size):
                    taken += 1
                    yield CountedRef(headers, n)
                continue
            errors: list[str] = []

            def note(message: str, errors: list[str] = errors) -> None:
                errors.append(message)
                on_error(message)

            samples = scan_tar(shards[j], note, wanted)
            while True:
                try:
                    raw = next(samples)
                except StopIteration as stop:
                    if on_size is not None and not errors:
                        on_size(j, stop.value)
                    break
                taken += 1
                yield raw
        return
    running = 0
    for j in order:

        def mine(n: int, base: int = running) -> bool | None:
            return wanted(n) if slot.owns(base + n) else None

        samples = scan_tar(shards[j], on_error, mine)
        while True:
            try:
                raw = next(samples)
            except StopIteration as stop:
                running += stop.value
                break
            taken += 1
            yield raw
