"""One weight hash: the release's weights_sha256 keeps its value, and the number ranks
compare is derived from it."""

import torch

from tokenizer.distributed import state_fingerprint
from tokenizer.fingerprint import fingerprint_int63, weights_fingerprint

# Computed by tokenizer/release.py's weights_fingerprint before it moved (commit 715fff1):
# releases already written record digests of this kind, so the value must not change.
FIXED_DIGEST = "aa73c653aee8637fc5b3bcc933e304999dc911da9419f45bede9f5681130a2f8"


def _fixed_state() -> dict[str, torch.Tensor]:
    return {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a.codes": torch.tensor([1, 2, 3], dtype=torch.int64),
        "c.half": torch.linspace(-1, 1, 4).to(torch.bfloat16),
    }


def test_weights_fingerprint_keeps_its_value() -> None:
    assert weights_fingerprint(_fixed_state()) == FIXED_DIGEST


def test_fingerprint_ignores_order_and_layout_but_not_dtype() -> None:
    state = _fixed_state()
    shuffled = {k: state[k] for k in reversed(list(state))}
    shuffled["b.weight"] = state["b.weight"].t().contiguous().t()  # same values, strided
    assert weights_fingerprint(shuffled) == FIXED_DIGEST
    state["b.weight"] = state["b.weight"].double()
    assert weights_fingerprint(state) != FIXED_DIGEST


def test_rank_fingerprint_is_the_weight_hash_as_an_int63() -> None:
    module = torch.nn.Linear(3, 2)
    module.register_buffer("counts", torch.arange(4))
    value = fingerprint_int63(module.state_dict())
    assert value == int(weights_fingerprint(module.state_dict())[:16], 16) >> 1
    assert 0 <= value < 2**63
    assert state_fingerprint(module) == value
