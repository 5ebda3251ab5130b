"""Training tasks by name (`train.task`): what one step of the one loop computes."""

from __future__ import annotations

from collections.abc import Callable

from accelerate import Accelerator

from tokenizer.config import Config, ConfigError
from tokenizer.training.task import TrainingTask
from tokenizer.training.tasks.tokenizer import TokenizerTask

_BUILDERS: dict[str, Callable[[Config, Accelerator], TrainingTask]] = {
    "tokenizer": TokenizerTask,
}


def task_names() -> list[str]:
    return list(_BUILDERS)


def build_task(cfg: Config, accelerator: Accelerator) -> TrainingTask:
    """The task `cfg.train.task` names, its parts built (same seed: same weights per rank)."""
    builder = _BUILDERS.get(cfg.train.task)
    if builder is None:
        raise ConfigError(
            f"train.task: unknown {cfg.train.task!r}; choices: {', '.join(_BUILDERS)}"
        )
    return builder(cfg, accelerator)
