"""The checks every prior makes of its conditioning inputs, with messages that name the
argument: a coarser grid's codes (`condition`) and class labels (`class_labels`)."""

from __future__ import annotations

from torch import Tensor


def _integers(t: Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex())


def check_condition(condition: Tensor | None, expected: tuple[int, ...] | None) -> Tensor | None:
    """`expected`: the (B, h', w') shape the prior takes, None for a prior that takes none."""
    if expected is None:
        if condition is not None:
            raise ValueError("condition given, but this prior has condition_codebook_size=0")
        return None
    if condition is None:
        raise ValueError(f"condition is required: integer codes of a coarser grid, {expected}")
    if tuple(condition.shape) != tuple(expected) or not _integers(condition):
        raise ValueError(
            f"condition must be integer codes of shape {tuple(expected)}, got "
            f"{condition.dtype} {tuple(condition.shape)}"
        )
    return condition


def check_class_labels(class_labels: Tensor | None, num_classes: int, batch: int) -> Tensor | None:
    """Labels (B,) for a class-conditional prior (num_classes > 0), None otherwise."""
    if not num_classes:
        if class_labels is not None:
            raise ValueError("class_labels given, but this prior has num_classes=0")
        return None
    if class_labels is None:
        raise ValueError(f"class_labels is required: integers of shape ({batch},)")
    if tuple(class_labels.shape) != (batch,) or not _integers(class_labels):
        raise ValueError(
            f"class_labels must be integers of shape ({batch},), got "
            f"{class_labels.dtype} {tuple(class_labels.shape)}"
        )
    return class_labels
