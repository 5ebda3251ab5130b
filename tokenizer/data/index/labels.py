"""Class labels of index samples, for class-conditional priors: each sample's `cls` field,
its class index as text (webdataset's convention, what ImageNet shards carry), which
tools/tokenize_dataset.py copies from the image shards."""

from __future__ import annotations

import torch

from tokenizer.data.index.reader import TokenBatch

CLASS_FIELD = "cls"


class LabelError(ValueError):
    """A sample's class label is missing or not an index in [0, num_classes)."""


def class_labels(batch: TokenBatch, num_classes: int, source: str) -> torch.Tensor:
    """(B,) int64 class indices of the batch's samples; every one must have a `cls` field
    in [0, num_classes). `source` (the index) names where a bad sample comes from."""
    labels = []
    for sample in batch.samples:
        data = sample.fields.get(CLASS_FIELD)
        if data is None:
            raise LabelError(
                f"{source}: sample {sample.key!r} has no {CLASS_FIELD} field; a "
                f"class-conditional prior (prior.num_classes={num_classes}) needs each "
                "sample's class index (webdataset's .cls) in the image shards it was "
                "tokenized from"
            )
        text = data.decode("utf-8", errors="replace").strip()
        try:
            label = int(text)
        except ValueError:
            label = None
        if label is None or not 0 <= label < num_classes:
            raise LabelError(
                f"{source}: sample {sample.key!r} has {CLASS_FIELD} {text[:40]!r}, not a class "
                f"index in [0, {num_classes}) (prior.num_classes={num_classes})"
            )
        labels.append(label)
    return torch.tensor(labels, dtype=torch.int64)
